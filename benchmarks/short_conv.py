"""Causal depthwise short convolution (+ SiLU) on the GPU: mmeff's Triton kernel vs PyTorch's F.conv1d vs fla's.

bf16 x [B, T, C], fp32 weight [C, 4] and bias, forward and forward + backward (gradients of x, weight and
bias), median of --iters calls. C: 2304 (the 12-layer LM's mamba2: 2 x 1024 + 2 x 128), 4096 (its
gated_deltanet: q, k of 1024 and v of 2048), 12288 (pytorch/pytorch#192902's case); --B 512 --T 196 --C 896 is
mamba2-bi's ViT-S at 224 px (both directions of a batch of 256). The floor is the memory traffic: x read and y
written forward; x, dy read and dx written backward. --out writes the table and its records (.json beside it).

    python benchmarks/short_conv.py --out benchmarks/results/short_conv_h100.md
    python benchmarks/short_conv.py --B 512 --T 196 --C 896 --out benchmarks/results/short_conv_vision_h100.md
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path
from typing import Callable, Dict

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import cuda_median_ms, write_results  # noqa: E402

from mmeff.kernels.conv import CausalConv  # noqa: E402
from mmeff.ops.conv import causal_conv1d_reference  # noqa: E402

PEAK_BYTES = 3.0e12


def implementations() -> Dict[str, Callable]:
    """name -> fn(x, weight, bias) -> y, for every implementation that imports here."""
    impls: Dict[str, Callable] = {
        "mmeff": lambda x, w, b: CausalConv.apply(x, w, b, True),
        "torch F.conv1d": lambda x, w, b: causal_conv1d_reference(x, w, b, "silu"),
    }
    try:
        sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
        from fla.modules.causal_conv1d import causal_conv1d as fla_conv

        impls["fla"] = lambda x, w, b: fla_conv(x, w, b, activation="silu")[0]
    except ImportError as exc:
        print(f"fla not measured: {exc}")
    return impls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--T", type=int, default=16384)
    parser.add_argument("--C", type=int, nargs="+", default=[2304, 4096, 12288])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    lines = [
        f"Device: {device}; torch {torch.__version__}. bf16 x [{args.B}, {args.T}, C], kernel width 4, SiLU; "
        f"median of {args.iters}.",
        "",
        "| C | implementation | fwd ms | fwd+bwd ms | vs F.conv1d (fwd+bwd) | % of 3.0 TB/s (fwd+bwd) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    impls = implementations()
    records = []
    for channels in args.C:
        gen = torch.Generator(device="cuda").manual_seed(channels)
        x = torch.randn(args.B, args.T, channels, device="cuda", generator=gen).bfloat16().requires_grad_()
        w = (torch.randn(channels, 4, device="cuda", generator=gen) / 2).requires_grad_()
        b = torch.randn(channels, device="cuda", generator=gen).requires_grad_()
        dy = torch.randn_like(x)
        floor = 5 * x.numel() * x.element_size()  # x, dy read and dx written backward; x read and y written forward
        times = {}
        for name, fn in impls.items():
            try:
                fwd, _ = cuda_median_ms(lambda: fn(x, w, b), 3, args.iters)
                total, _ = cuda_median_ms(lambda: torch.autograd.grad(fn(x, w, b), (x, w, b), dy), 3, args.iters)
                times[name] = (fwd, total)
            except Exception as exc:  # a peer that refuses this input is reported, not fatal
                lines.append(f"| {channels} | {name} | {type(exc).__name__}: {str(exc)[:80]} | | | |")
        for name, (fwd, total) in times.items():
            ratio = times["torch F.conv1d"][1] / total
            pct = 100 * floor / (total * 1e-3) / PEAK_BYTES
            lines.append(f"| {channels} | {name} | {fwd:.3f} | {total:.3f} | {ratio:.1f}x | {pct:.0f} |")
            records.append({"B": args.B, "T": args.T, "C": channels, "impl": name, "fwd_ms": fwd, "fwd_bwd_ms": total,
                            "vs_conv1d": ratio, "pct_of_bandwidth": pct, "device": device})
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_results(args.out.with_suffix(""), {"records": records}, text)


if __name__ == "__main__":
    main()
