"""MoE channel-mixer throughput (bf16, forward + backward): dropless grouped matmul vs per-expert loops vs dense SwiGLU.

Default problem: 65,536 tokens of width 1024, 64 fine-grained SwiGLU experts of hidden 512, top-8, plus one
shared expert; the dense SwiGLU has the same active size (hidden (8 + 1) * 512). The naive loop is the per-expert
loop of Hugging Face's Mixtral block (find each expert's tokens, run it, index_add the weighted outputs back); the
sorted loop is mmeff's CPU reference (tokens sorted by expert once, one matmul per expert). Also measures the device's
bf16 matmul rate (an 8192^3 torch.mm) and reports each variant's achieved fraction of it, and checks the
grouped path against the loop (outputs and all gradients, at 4096 tokens and at 16 tokens, where most
experts get none). One run, one markdown table:

    python benchmarks/moe.py --out benchmarks/results/moe_h100.md
    python benchmarks/moe.py --device cpu --tokens 512 --dim 64 --experts 8 --hidden 32 --top-k 2 --matmul 512  # smoke
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from mmeff import blocks
from mmeff.blocks.moe import MoE
from mmeff.ops import routing as rt


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 3) -> float:
    """Mean wall time of `fn` after `warmup` calls, synchronising the device around the timed loop."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def matmul_rate(device: torch.device, n: int, iters: int) -> float:
    """Measured bf16 FLOP/s of an n x n x n torch.mm."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / seconds_per_call(lambda: torch.mm(a, b), device, iters)


def train_step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of `module` on `x` (fresh input gradient each call)."""

    def step() -> None:
        module.zero_grad(set_to_none=True)
        inp = x.detach().requires_grad_()
        module(inp).backward(grad)

    return step


class NaiveLoop(nn.Module):
    """The naive per-expert loop over the weights of `moe` (swiglu experts, token choice)."""

    def __init__(self, moe: MoE) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, flat = self.moe, x.reshape(-1, x.shape[-1])
        scores = rt.router_scores(m._logits(flat), m.score)
        weights, experts = rt.topk_route(scores, m.top_k, m.expert_bias, m.renormalize)
        y = torch.zeros_like(flat)
        for e in range(m.num_experts):
            token, slot = torch.where(experts == e)
            gate, up = (flat[token] @ m.w_in[e]).chunk(2, dim=-1)
            out = (torch.nn.functional.silu(gate) * up) @ m.w_out[e]
            y = y.index_add(0, token, out * weights[token, slot, None].to(out.dtype))
        if m.shared is not None:
            y = y + m.shared(flat)
        return y.view(x.shape)


def parity(grouped: MoE, loop: MoE, x: torch.Tensor) -> float:
    """Largest |grouped - loop| over the output and all gradients, relative to the largest loop magnitude."""
    results = []
    for module in (grouped, loop):
        module.zero_grad(set_to_none=True)
        inp = x.detach().requires_grad_()
        y = module(inp)
        y.backward(torch.ones_like(y))
        results.append([t.float() for t in [y, inp.grad, *(p.grad for p in module.parameters())]])
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item() for a, b in zip(*results))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--shared", type=int, default=1)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--matmul", type=int, default=8192, help="size of the square matmul measuring the device rate")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, help="also write the markdown table here")
    args = p.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    bf16 = dict(device=device, dtype=torch.bfloat16)
    moe_options = dict(num_experts=args.experts, top_k=args.top_k, hidden=args.hidden, shared_experts=args.shared)
    grouped = blocks.build("moe", args.dim, impl="grouped", **moe_options).to(**bf16)
    loop = copy.deepcopy(grouped)
    loop.impl = "loop"
    active = (args.top_k + args.shared) * args.hidden
    dense = blocks.build("swiglu", args.dim, hidden=active).to(**bf16)

    # 16 tokens leave most experts without tokens: their weight gradients must come out zero, as the loop's do
    error = max(parity(grouped, loop, torch.randn(1, n, args.dim, **bf16)) for n in (16, min(args.tokens, 4096)))
    x = torch.randn(1, args.tokens, args.dim, **bf16)
    grad = torch.randn_like(x)
    peak = matmul_rate(device, args.matmul, args.iters)
    flops = 3 * 2 * args.tokens * 3 * args.dim * active  # forward + backward (x3) of the active expert matmuls
    naive = NaiveLoop(loop)
    error = max(error, parity(grouped, naive, torch.randn(1, min(args.tokens, 4096), args.dim, **bf16)))
    variants = {
        "MoE dropless, grouped matmul": grouped,
        "MoE dropless, per-expert loop over sorted tokens": loop,
        "MoE, naive per-expert loop (Mixtral style)": naive,
        f"dense SwiGLU, hidden {active}": dense,
    }
    rows = []
    for label, module in variants.items():
        seconds = seconds_per_call(train_step(module, x, grad), device, args.iters)
        rows.append((label, args.tokens / seconds, seconds * 1e3, flops / seconds))
    load, loop_rate, dense_rate = grouped.stats()["load_max_over_mean"], rows[2][1], rows[3][1]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [
        f"# MoE channel mixer, bf16 forward + backward on {name} (torch {torch.__version__})",
        "",
        f"{args.tokens} tokens, width {args.dim}, {args.experts} experts of hidden {args.hidden}, top-{args.top_k}, "
        f"{args.shared} shared; expert load max/mean {load:.2f}. Measured bf16 matmul ({args.matmul}^3): "
        f"{peak / 1e12:.1f} TFLOP/s. Grouped vs the loops, largest difference relative to the largest value (output "
        f"and gradients): {error:.2e}.",
        "",
        "| variant | tokens/s | ms / step | TFLOP/s (active experts) | fraction of measured matmul rate | vs dense | vs naive loop |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, rate, ms, flop_rate in rows:
        lines.append(
            f"| {label} | {rate:,.0f} | {ms:.2f} | {flop_rate / 1e12:.1f} | {flop_rate / peak:.2f} | "
            f"{rate / dense_rate:.0%} | {rate / loop_rate:.2f}x |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)


if __name__ == "__main__":
    main()
