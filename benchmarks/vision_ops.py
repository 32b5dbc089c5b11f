"""The vision ViT's own ops, each backend timed alone: non-causal linear attention and the grid conv of `local_conv`.

One forward + backward of one layer's op at the ViT-S shapes of benchmarks/vision_speed.py (about 65k tokens: batch
256 / 64 / 16 / 4 at 224 / 512 / 1,024 / 2,048 px; 6 heads of 64; bf16; q, k, v as views of one qkv projection, the
gradient reaching it), every backend in the same process:

    global_linear_attention (elu+1 features, normalised)   triton: mmeff.kernels.noncausal   torch: the GEMM path
    depthwise_conv2d (3x3, with bias)                      triton: mmeff.kernels.conv2d      torch: F.conv2d (cuDNN)

Each row has its median milliseconds and the bytes its inputs and outputs must move at least (q, k, v, o and their
gradients; x, y and theirs), as a bandwidth against `copy` (a device-to-device copy measured in the same run). Writes
benchmarks/results/vision_ops_<device>.{md,json,png}; `--smoke` runs tiny shapes on the CPU (a check that it runs).

    python benchmarks/vision_ops.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import copy_bandwidth, device_tag, error_note, median_ms, save_figure, write_results  # noqa: E402

from mmeff.ops import global_linear_attention  # noqa: E402
from mmeff.ops.conv import depthwise_conv2d  # noqa: E402

SIZES = {224: 256, 512: 64, 1024: 16, 2048: 4}  # px -> batch
HEADS, HEAD_DIM, PATCH = 6, 64, 16


def cases(px: int, batch: int, device: torch.device, dtype: torch.dtype) -> dict[str, tuple[Callable[[str], None], int]]:
    """op name -> (run one forward + backward on a backend, minimum bytes moved)."""
    side = px // PATCH
    tokens, width = side * side, HEADS * HEAD_DIM
    gen = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(batch, tokens, 3 * width, device=device, dtype=dtype, generator=gen).requires_grad_()
    grad = torch.randn(batch, tokens, HEADS, HEAD_DIM, device=device, dtype=dtype, generator=gen)
    weight = torch.randn(width, 3, 3, device=device, generator=gen).requires_grad_()
    bias = torch.zeros(width, device=device).requires_grad_()
    unit = batch * tokens * width * qkv.element_size()

    def attention(backend: str) -> None:
        qkv.grad = None
        q, k, v = (t.unflatten(-1, (HEADS, HEAD_DIM)) for t in qkv.chunk(3, -1))
        o = global_linear_attention(q, k, v, HEAD_DIM**-0.5, None, True, 1e-6, "elu", backend=backend)
        o.backward(grad)

    def conv(backend: str) -> None:
        qkv.grad = None
        y = depthwise_conv2d(qkv[..., -width:], weight, bias, (side, side), backend=backend)
        y.backward(grad.flatten(2))

    # q, k, v and o, then dq, dk, dv and do; x and y, then dx and dy
    return {"global_linear_attention": (attention, 8 * unit), "depthwise_conv2d": (conv, 4 * unit)}


def table(records: list[dict[str, Any]], device: str, copy_gbs: float) -> str:
    """Markdown of the records."""
    lines = [f"Device: {device}; device-to-device copy {copy_gbs:,.0f} GB/s (read + write) in the same run.", "",
             "| op | px | batch | backend | ms (fwd + bwd) | min GB | GB/s | of copy | vs torch | note |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in records:
        ms = r["ms"]
        cells = [f"{ms:.3f}", f"{r['gbyte']:.2f}", f"{r['gbyte'] / ms * 1e3:,.0f}", f"{r['gbyte'] / ms * 1e3 / copy_gbs:.0%}",
                 f"{r['vs_torch']:.2f}x" if r.get("vs_torch") else ""] if ms else [""] * 5  # fmt: skip
        lines.append(f"| {r['op']} | {r['px']} | {r['batch']} | {r['backend']} | " + " | ".join(cells) + f" | {r.get('note') or ''} |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """Milliseconds per px, one line per (op, backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for op in dict.fromkeys(r["op"] for r in records):
        for backend, style in (("triton", "-"), ("torch", "--")):
            points = [(r["px"], r["ms"]) for r in records if r["op"] == op and r["backend"] == backend and r["ms"]]
            if points:
                ax.plot(*zip(*points), style, marker="o", label=f"{op} ({backend})")
    ax.set(xscale="log", yscale="log", xlabel="image px (about 65k tokens)", ylabel="ms, forward + backward",
           title=records[0]["device"] if records else "")  # fmt: skip
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--px", type=int, nargs="+", default=list(SIZES), help="image sizes (224 512 1024 2048)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, fp32")
    p.add_argument("--out-dir", type=Path, help="default: benchmarks/results (--smoke: a temporary folder)")
    args = p.parse_args()
    if any(px not in SIZES for px in args.px):
        raise SystemExit(f"vision_ops: --px takes {', '.join(map(str, SIZES))}, got {' '.join(map(str, args.px))}")
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    sizes = {32: 2} if args.smoke else {px: SIZES[px] for px in args.px}
    out = args.out_dir or (Path(tempfile.gettempdir()) / "vision_ops_smoke" if args.smoke else Path(__file__).parent / "results")
    stem = out / f"vision_ops_{device_tag(device)}"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    copy_gbs = copy_bandwidth(device, 1 << 28 if device.type == "cuda" else 1 << 20) / 1e9
    records: list[dict[str, Any]] = []
    for px, batch in sizes.items():
        for op, (run, nbytes) in cases(px, batch, device, dtype).items():
            found = {}
            for backend in ("triton", "torch"):
                record = {"op": op, "px": px, "batch": batch, "backend": backend, "gbyte": nbytes / 1e9, "ms": None,
                          "device": name, "torch": torch.__version__}  # fmt: skip
                try:
                    record["ms"] = median_ms(lambda: run(backend), device, args.warmup, args.reps)[0]
                    found[backend] = record["ms"]
                except Exception as e:  # one backend failing (no CUDA here, an OOM) still leaves the other's row
                    record["note"] = error_note(e)
                records.append(record)
                print(record, flush=True)
            for r in records[-2:]:
                if r["ms"] and found.get("torch"):
                    r["vs_torch"] = found["torch"] / r["ms"]
            write_results(stem, {"copy_gbs": copy_gbs, "records": records}, table(records, name, copy_gbs))
    plot(records, stem.with_suffix(".png"))
    print(f"wrote {stem}.{{md,json,png}}")


if __name__ == "__main__":
    main()
