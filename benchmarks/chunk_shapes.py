"""The chunked recurrence ops of mmeff.ops at the shapes mmeff's models run them: forward + backward time, each Triton
kernel's GPU time and registers, and the gradients kept, so that two builds of the kernels can be compared.

bf16, one call = the op's forward and the backward of its summed output; the median of --reps calls after a warm-up.
Shapes (`--shapes`):
  vit  the ViT-S bidirectional mixers at 224 px (benchmarks/vision_speed.py): 512 sequences (256 images, both scan
       directions) x 196 tokens; gla 6 heads, K 32, V 64 (expand_k 0.5); retnet and gated_deltanet 6 heads, K 64,
       V 128 (expand_v 2); mamba2's SSD 12 heads of 64 sharing one B and C of state 64
  lm   the LM rows at T 4,096, B 4 (benchmarks/lm_train_speed.py): gla 4 heads, K 128, V 256; retnet and
       gated_deltanet 8 heads, K 128, V 256; mamba2's SSD 32 heads of 64 sharing one B and C of state 128
  smoke  tiny sizes, for the CPU (the reference path: no kernels)

An A/B of a kernel change runs this once per build (a copy of the package first on PYTHONPATH) with --grads, then
compares the gradients (max |a - b| over max |b| per input):

    python benchmarks/chunk_shapes.py --shapes vit --grads /tmp/ab/old --name chunk_shapes_old
    PYTHONPATH=<copy> python benchmarks/chunk_shapes.py --shapes vit --grads /tmp/ab/new --name chunk_shapes_new
    python benchmarks/chunk_shapes.py --compare /tmp/ab/new /tmp/ab/old
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from mmeff import ops
from mmeff.kernels.launch import kept_builds
from timing import device_tag, median_ms, run_id, write_results  # beside this file

Case = tuple[str, int, int, int, int, int]  # (op, B, T, heads, K, V)
# name: (op, B, T, heads, K, V) per shape set; for ssd K is the state and heads share one B and C.
SHAPES: dict[str, list[Case]] = {
    "vit": [("gla", 512, 196, 6, 32, 64), ("retention", 512, 196, 6, 64, 128),
            ("gated_delta_rule", 512, 196, 6, 64, 128), ("ssd", 512, 196, 12, 64, 64)],
    "lm": [("gla", 4, 4096, 4, 128, 256), ("retention", 4, 4096, 8, 128, 256),
           ("gated_delta_rule", 4, 4096, 8, 128, 256), ("ssd", 4, 4096, 32, 128, 64)],
    "smoke": [("gla", 2, 40, 2, 16, 16), ("retention", 2, 40, 2, 16, 16), ("gated_delta_rule", 2, 40, 2, 16, 16),
              ("ssd", 2, 40, 4, 16, 16)],
}  # fmt: skip


def problem(op: str, B: int, T: int, H: int, K: int, V: int, device: torch.device
            ) -> tuple[Callable[[], Tensor], list[Tensor]]:  # fmt: skip
    """The op's call on seeded inputs (bf16 on CUDA, fp32 on the CPU) and the inputs it differentiates."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def leaf(*shape: int, fn: Callable[[Tensor], Tensor] = lambda x: x) -> Tensor:
        return fn(torch.randn(*shape, generator=gen)).to(device, dtype).requires_grad_()

    if op == "ssd":
        x, dt = leaf(B, T, H, V), leaf(B, T, H, fn=lambda t: F.softplus(t - 4))
        A = (-torch.rand(H, generator=gen) - 0.5).to(device).requires_grad_()
        Bm, Cm = leaf(B, T, 1, K), leaf(B, T, 1, K)
        return lambda: ops.ssd(x, dt, A, Bm, Cm), [x, dt, A, Bm, Cm]
    q, k, v = leaf(B, T, H, K), leaf(B, T, H, K, fn=lambda t: F.normalize(t, dim=-1)), leaf(B, T, H, V)
    if op == "gla":
        g = leaf(B, T, H, K, fn=lambda t: F.logsigmoid(t) / 16)
        return lambda: ops.gated_linear_attention(q, k, v, g)[0], [q, k, v, g]
    if op == "retention":
        log_decay = torch.log(1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float32))).to(device)
        return lambda: ops.retention(q, k, v, log_decay)[0], [q, k, v]
    g, beta = leaf(B, T, H, fn=lambda t: F.logsigmoid(t + 4)), leaf(B, T, H, fn=torch.sigmoid)
    return lambda: ops.gated_delta_rule(q, k, v, g, beta)[0], [q, k, v, g, beta]


def step(fn: Callable[[], Tensor], leaves: list[Tensor]) -> None:
    """One forward and the backward of the summed output, gradients cleared first."""
    for t in leaves:
        t.grad = None
    fn().float().sum().backward()


def kernel_ms(fn: Callable[[], Tensor], leaves: list[Tensor], calls: int = 5) -> dict[str, float]:
    """GPU ms a call of each Triton kernel of mmeff's (torch.profiler over `calls` calls)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step(fn, leaves)
        torch.cuda.synchronize()
    return {e.key: round(e.device_time_total / 1e3 / calls, 4) for e in prof.key_averages()
            if e.key.startswith("_") and e.key.endswith("_kernel") and e.device_time_total > 0}  # fmt: skip


def registers() -> dict[str, list[list[int]]]:
    """Registers a thread and spilled bytes of each of mmeff's kernels compiled so far, one pair per distinct build."""
    pairs = {name: {(b.n_regs, b.n_spills) for b in builds if getattr(b, "n_regs", None) is not None}
             for name, builds in kept_builds().items()}  # fmt: skip
    return {name: [list(p) for p in sorted(found)] for name, found in pairs.items() if found}


def measure(case: Case, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One op at one shape: its record, and its gradients saved under --grads."""
    op, B, T, H, K, V = case
    fn, leaves = problem(op, B, T, H, K, V, device)
    ms, peak = median_ms(lambda: step(fn, leaves), device, args.warmup, args.reps)
    record = {"op": op, "B": B, "T": T, "heads": H, "K": K, "V": V, "ms": round(ms, 4), "peak_gib": peak}
    if device.type == "cuda":
        record["kernels"] = kernel_ms(fn, leaves)
    if args.grads:
        step(fn, leaves)
        args.grads.mkdir(parents=True, exist_ok=True)
        torch.save([t.grad.float().cpu() for t in leaves], args.grads / f"{op}_{B}x{T}.pt")
    return record


def compare(new: Path, old: Path) -> list[dict[str, Any]]:
    """Per saved case in both folders: max |new - old| over max |old|, each input's gradient."""
    rows = []
    for path in sorted(new.glob("*.pt")):
        if not (old / path.name).is_file():
            raise SystemExit(f"chunk_shapes --compare: {old / path.name} missing (the case {path.stem} of {new})")
        a, b = torch.load(path), torch.load(old / path.name)
        errs = [((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item() for x, y in zip(a, b)]
        rows.append({"case": path.stem, "rel_err": errs})
    return rows


def table(records: list[dict[str, Any]]) -> str:
    """Markdown: a table per run (earlier runs' records kept in the file), newest first."""
    lines = []
    for run in sorted({r["run"] for r in records}, reverse=True):
        rows = [r for r in records if r["run"] == run]
        lines += [f"{rows[0]['device']} ({rows[0]['versions']}), run {run}: `{rows[0]['command']}`", "",
                  "| op | B x T | heads | K | V | fwd+bwd ms | kernels, GPU ms a call | registers, spilled bytes |",
                  "|---|---|---:|---:|---:|---:|---|---|"]  # fmt: skip
        for r in rows:
            kernels = ", ".join(f"{k} {v:.3f}" for k, v in r.get("kernels", {}).items())
            regs = ", ".join(f"{k} {v}" for k, v in r.get("registers", {}).items())
            cells = [r["op"], f"{r['B']} x {r['T']}", r["heads"], r["K"], r["V"], f"{r['ms']:.3f}", kernels, regs]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", choices=sorted(SHAPES), default="vit")
    p.add_argument("--ops", nargs="+", help="only these ops (gla retention gated_delta_rule ssd)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--grads", type=Path, help="folder to save each case's gradients in (for --compare)")
    p.add_argument("--compare", type=Path, nargs=2, metavar=("NEW", "OLD"), help="compare two --grads folders and exit")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--name", help="file stem (default chunk_shapes_<device>)")
    args = p.parse_args()
    if args.compare:
        for row in compare(*args.compare):
            print(json.dumps(row), flush=True)
        return
    if args.ops and not set(args.ops) <= {c[0] for c in SHAPES[args.shapes]}:
        raise SystemExit(f"chunk_shapes: --ops {' '.join(args.ops)}: choose from gla retention gated_delta_rule ssd")
    device = torch.device(args.device)
    stem = args.out_dir / (args.name or f"chunk_shapes_{device_tag(device)}")
    json_path = stem.with_name(stem.name + ".json")
    records = json.loads(json_path.read_text())["records"] if json_path.is_file() else []  # earlier runs stay
    run = {"run": run_id(records), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "versions": f"torch {torch.__version__}, triton {triton.__version__}",
           "command": " ".join(["python", "benchmarks/chunk_shapes.py", *sys.argv[1:]])}  # fmt: skip
    for case in SHAPES[args.shapes]:
        if args.ops and case[0] not in args.ops:
            continue
        record = {**measure(case, args, device), **run}
        if device.type == "cuda":
            record["registers"] = {k: v for k, v in registers().items() if k in record["kernels"]}
        records.append(record)
        write_results(stem, {"records": records}, table(records))  # row by row: a cut run keeps its rows
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
