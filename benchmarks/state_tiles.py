"""The chunked recurrence's sequential passes (mmeff/kernels/chunk_h.py) per state tile and launch config, on the GPU.

`chunk_h.state_blocks` picks the [key, value] tile each program of the state passes holds: smaller tiles give more
programs (more SMs busy) and, under the delta rule, whose programs hold every key, more re-reads of the chunk's w
and k. This times, for the LM and ViT sizes of `lm_train_speed.py` and `vision_speed.py`, one forward + backward of
`mmeff.ops.linear_recurrence` (bf16) per (key tile, value tile, warps, stages): the GPU ms of `_fwd_h_kernel` (its
two calls: the forward's and the backward's recompute), of `_bwd_dh_kernel`, and of every kernel of the op
(torch.profiler, mean of --reps). The row `picked` is what state_blocks gives on this GPU with the kernels' pinned
launch config. Each workload's first row is the peer, in the same run on the same inputs: fla's chunked op
(chunk_gated_delta_rule, chunk_delta_rule, chunk_simple_gla or chunk_gla), its state passes being its kernels named
`*fwd_kernel_h*` and `*kernel_dh*`; the picked row's note gives its op ms over fla's. Rows are written as they come
(markdown + JSON), so a cut run keeps them.

    python benchmarks/state_tiles.py                  # benchmarks/results/state_tiles_<device>.{md,json}
    python benchmarks/state_tiles.py --workloads gated_deltanet-lm deltanet-lm

The value tiles of 32 under the delta rule (c060f51) came from a first form of this sweep in one call, beside another
sweep on the same GPU: gated_deltanet-lm's passes 0.69 + 0.51 ms (tiles 128 x 16) -> 0.34 + 0.28 ms (128 x 32);
its rows: benchmarks/results/state_tiles_draft_h200.md.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path
from typing import Any

import torch
import triton
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import device_tag, write_results  # noqa: E402

from mmeff.kernels import chunk_h  # noqa: E402
from mmeff.kernels.launch import clear  # noqa: E402
from mmeff.ops.recurrence import linear_recurrence  # noqa: E402

# name: (batch, length, heads, key, value, decay: None | "scalar" | "key", delta rule)
WORKLOADS: dict[str, tuple[int, int, int, int, int, str | None, bool]] = {
    "gated_deltanet-lm": (4, 4096, 8, 128, 256, "scalar", True),
    "deltanet-lm": (4, 4096, 8, 128, 128, None, True),
    "retnet-lm": (4, 4096, 8, 128, 256, "scalar", False),
    "gla-lm": (4, 4096, 4, 128, 256, "key", False),
    "gla-bi-224": (512, 196, 6, 64, 64, "key", False),  # ViT-S at 224 px, both routes stacked
    "gated_deltanet-bi-1024": (32, 4096, 6, 64, 128, "scalar", True),  # ViT-S at 1,024 px, both routes stacked
}
LAUNCHES = [(4, 2), (2, 2), (8, 2), (4, 3), (4, 1)]  # (num_warps, num_stages); the kernels' pinned one first


def inputs(batch: int, length: int, heads: int, K: int, V: int, decay: str | None, delta: bool) -> dict[str, Any]:
    """Random bf16 q, k (unit rows), v, fp32 log decays and betas, and the output gradient, on the GPU."""
    torch.manual_seed(0)
    dev = "cuda"
    q = torch.randn(batch, length, heads, K, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.nn.functional.normalize(torch.randn(batch, length, heads, K, device=dev), dim=-1)
    v = torch.randn(batch, length, heads, V, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = None
    if decay is not None:
        shape = (batch, length, heads) if decay == "scalar" else (batch, length, heads, K)
        g = (-0.1 * torch.rand(*shape, device=dev)).requires_grad_()
    beta = torch.rand(batch, length, heads, device=dev).requires_grad_() if delta else None
    do = torch.randn(batch, length, heads, V, device=dev, dtype=torch.bfloat16)
    return {"q": q, "k": k.to(torch.bfloat16).requires_grad_(), "v": v, "g": g, "beta": beta, "do": do}


def mmeff_op(t: dict[str, Any]) -> Any:
    """mmeff's chunked recurrence on the inputs: (o, final state)."""
    return linear_recurrence(t["q"], t["k"], t["v"], t["g"], t["beta"], scale=t["q"].shape[-1] ** -0.5)


def fla_op(t: dict[str, Any]) -> Any:
    """fla's chunked op of the same recurrence on the same inputs: (o, final state)."""
    q, k, v, g, beta, scale = t["q"], t["k"], t["v"], t["g"], t["beta"], t["q"].shape[-1] ** -0.5
    if beta is not None and g is not None:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        return chunk_gated_delta_rule(q, k, v, g, beta, scale=scale)
    if beta is not None:
        from fla.ops.delta_rule import chunk_delta_rule

        return chunk_delta_rule(q, k, v, beta, scale=scale)
    if g.dim() == 3:
        from fla.ops.simple_gla import chunk_simple_gla

        return chunk_simple_gla(q, k, v, g, scale=scale)
    from fla.ops.gla import chunk_gla

    return chunk_gla(q, k, v, g, scale=scale)


def kernel_ms(op: Any, t: dict[str, Any], reps: int) -> dict[str, float]:
    """GPU ms per forward + backward of `op` (mmeff_op or fla_op): the state passes' kernels and all of the op's."""

    def step() -> None:
        o, _ = op(t)
        o.backward(t["do"])

    step()
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    per = {e.key: e.self_device_time_total / 1e3 / reps for e in prof.key_averages() if e.self_device_time_total > 0}
    fwd = ("_fwd_h_kernel", "fwd_kernel_h")  # mmeff's; fla's (chunk_fwd_kernel_h, chunk_gated_delta_rule_fwd_kernel_h_*)
    bwd = ("_bwd_dh_kernel", "kernel_dh")  # mmeff's; fla's (chunk_bwd_kernel_dh, *_bwd_kernel_dhu_*)
    return {"fwd_h_ms": sum(ms for key, ms in per.items() if any(n in key for n in fwd)),
            "bwd_dh_ms": sum(ms for key, ms in per.items() if any(n in key for n in bwd)),
            "op_ms": sum(per.values())}  # fmt: skip


PICK = chunk_h.state_blocks


def configure(tiles: tuple[int, int] | None, launch: tuple[int, int]) -> None:
    """Tiles for every state pass (None: state_blocks' own) and one launch config for both kernels."""
    chunk_h.state_blocks = PICK if tiles is None else (lambda *a: tiles)
    for kernel in (chunk_h._fwd_h_kernel.fn, chunk_h._bwd_dh_kernel.fn):  # the autotuners
        kernel.configs = [triton.Config({}, num_warps=launch[0], num_stages=launch[1])]
        kernel.cache = {}
    clear()  # and the compiled kernels kept for direct launches


def table(rows: list[dict[str, Any]], device: str) -> str:
    lines = [
        f"Device: {device}; torch {torch.__version__}, Triton {triton.__version__}. One forward + backward of mmeff's "
        "`linear_recurrence` (bf16), and first in each workload of fla's op on the same inputs, GPU ms a step "
        "(`_fwd_h_kernel`: its two calls).",
        "",
        "| workload | tiles (key x value) | warps | stages | fwd_h ms | bwd_dh ms | state passes ms | op ms | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        passes = r["fwd_h_ms"] + r["bwd_dh_ms"]
        tiles = "fla (its own)" if r["tiles"] is None else f"{r['tiles'][0]} x {r['tiles'][1]}"
        lines.append(f"| {r['workload']} | {tiles} | {r['warps'] or ''} | {r['stages'] or ''} | "
                     f"{r['fwd_h_ms']:.3f} | {r['bwd_dh_ms']:.3f} | {passes:.3f} | {r['op_ms']:.3f} | {r['note']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, help="path stem of .md/.json (default benchmarks/results/state_tiles_<device>)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("state_tiles: needs a CUDA GPU (the state passes' Triton kernels)")
    device = torch.cuda.get_device_name()
    out = args.out or Path("benchmarks/results") / f"state_tiles_{device_tag(torch.device('cuda'))}"
    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        print(table(rows[-1:], device).splitlines()[-1], flush=True)
        write_results(out, {"device": device, "torch": torch.__version__, "rows": rows}, table(rows, device))

    for name in args.workloads:
        batch, length, heads, K, V, decay, delta = WORKLOADS[name]
        t = inputs(batch, length, heads, K, V, decay, delta)
        peer = {"workload": name, "tiles": None, "warps": None, "stages": None, **timed(fla_op, t, args.reps)}
        record({**peer, "note": peer["note"] or f"fla {fla_version()}"})
        picked = PICK(K, V, batch * heads, not delta, torch.device("cuda"))
        keys = sorted({K, picked[0], *([K // 2, 32] if not delta else [])}, reverse=True)
        candidates = [(bk, bv) for bk in keys for bv in (16, 32, 64) if bk <= K and bv <= V]
        for tiles, launch in [(None, LAUNCHES[0])] + list(itertools.product(candidates, LAUNCHES)):
            configure(tiles, launch)
            ms = timed(mmeff_op, t, args.reps)
            note = ms.pop("note")
            if tiles is None and not note:
                ratio = ms["op_ms"] / peer["op_ms"]
                note = "picked" + ("" if math.isnan(ratio) else f"; op ms {ratio:.2f}x fla's")
            record({"workload": name, "tiles": tiles or picked, "warps": launch[0], "stages": launch[1], **ms, "note": note})


def timed(op: Any, t: dict[str, Any], reps: int) -> dict[str, Any]:
    """kernel_ms of `op` and an empty note, or NaNs and the error's name: a config that fails to build or launch,
    or a peer that is not installed, is a row of its own."""
    try:
        return {**kernel_ms(op, t, reps), "note": ""}
    except Exception as e:  # noqa: BLE001
        return {**dict.fromkeys(("fwd_h_ms", "bwd_dh_ms", "op_ms"), float("nan")), "note": f"{type(e).__name__}: {e}"[:120]}


def fla_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flash-linear-attention")
    except PackageNotFoundError:
        return "(version unknown)"


if __name__ == "__main__":
    main()
