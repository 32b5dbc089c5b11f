"""GPU benchmark of the attention mixers: forward + backward at a fixed token budget, KV-cache bytes per token, int8 error.

One run on a CUDA machine (bf16, 65,536 tokens per batch, 16 heads x 64, T = 2k / 8k / 32k):
    python benchmarks/attention.py --out benchmarks/results/attention_h100.md
Rows: causal SDPA (`attn`), FlexAttention sliding window 1024 (`sliding`), block top-k with blocks
of 64 and top 16 (`block_topk`: each query selecting for itself, or groups of 64 / 128 queries sharing one
selection, which runs block-sparse), `mla`, and for reference bidirectional SDPA beside bidirectional
`block_topk` with shared selections.
Each cell times the whole mixer (projections included): the median of `--iters` steps after
warm-up (FlexAttention compiles on its first call per shape), and the peak memory of a step.
A second table times the attention op alone on given q, k, v (`mmeff.ops.flex.attention`; for block_topk
its `attend`: selection, block mask and FlexAttention), the quantity the issue's SDPA and FlexAttention
figures measure.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmeff import blocks
from timing import cuda_median_ms  # benchmarks/timing.py, beside this script

ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "attn: causal SDPA": ("attn", {}),
    "sliding: window 1024, FlexAttention": ("sliding", {"window": 1024}),
    "block_topk: block 64, top 16, per query": ("block_topk", {"block": 64, "topk": 16}),
    "block_topk: block 64, top 16, groups of 64 queries": ("block_topk", {"block": 64, "topk": 16, "query_block": 64}),
    "block_topk: block 64, top 16, groups of 128 queries": ("block_topk", {"block": 64, "topk": 16, "query_block": 128}),
    "mla: latent dim/4 + rope key head_dim/2, SDPA": ("mla", {}),
    "attn: bidirectional SDPA": ("attn", {"causal": False}),
    "block_topk: groups of 128 queries, bidirectional": ("block_topk", {"block": 64, "topk": 16, "query_block": 128, "causal": False}),
}


def time_step(layer: nn.Module, x: torch.Tensor, warmup: int, iters: int) -> tuple[float, float]:
    """Median milliseconds of forward + backward, and peak GiB of one step."""
    grads: list[torch.Tensor] = []

    def step() -> None:
        x.grad = None
        out = layer(x)
        if not grads:
            grads.append(torch.randn_like(out))
        out.backward(grads[0])

    return cuda_median_ms(step, warmup, iters)


# The attention op alone: the causal rows whose op FlexAttention or SDPA runs on given q, k, v (mla projects inside).
CORE_ROWS = {label: row for label, row in ROWS.items() if row[0] != "mla" and row[1].get("causal", True)}


class Core(nn.Module):
    """The attention op of a mixer alone (its `attend`, no projections): x [3, B, H, T, D] holds q, k, v."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.layer._context = (None, None, None)  # what forward() sets for attend: no documents, prefix or cache
        return self.layer.attend(x[0], {"k": x[1], "v": x[2]}, 0, None)


def picked(rows: dict[str, tuple[str, dict[str, Any]]], args: argparse.Namespace) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, mixer, options) of the rows that `--rows` asks for (all without it)."""
    return [(label, name, options) for label, (name, options) in rows.items() if not args.rows or any(r in label for r in args.rows)]


def core_table(args: argparse.Namespace) -> list[str]:
    """Forward + backward of the attention op alone, per mask, at each T."""
    lines = ["| attention op | " + " | ".join(f"T={T}" for T in args.lengths) + " |", "|---" * (len(args.lengths) + 1) + "|"]
    baseline: dict[int, float] = {}
    dim = args.heads * args.head_dim
    for label, name, options in picked(CORE_ROWS, args):
        cells = []
        for T in args.lengths:
            torch.manual_seed(0)
            shape = (3, args.tokens // T, args.heads, T, args.head_dim)
            x = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            ms, _ = time_step(Core(blocks.build(name, dim, heads=args.heads, **options)), x, args.warmup, args.iters)
            del x
            baseline.setdefault(T, ms)
            cells.append(f"{ms:.1f} ms ({baseline[T] / ms:.2f}x)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return lines


def speed_table(args: argparse.Namespace) -> list[str]:
    dim = args.heads * args.head_dim
    lines = ["| mixer | " + " | ".join(f"T={T} (B={args.tokens // T})" for T in args.lengths) + " |"]
    lines.append("|---" * (len(args.lengths) + 1) + "|")
    baseline: dict[int, float] = {}
    for label, name, options in picked(ROWS, args):
        cells = []
        for T in args.lengths:
            torch.manual_seed(0)
            layer = blocks.build(name, dim, heads=args.heads, **options).cuda().to(torch.bfloat16)
            x = torch.randn(args.tokens // T, T, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            try:
                ms, gib = time_step(layer, x, args.warmup, args.iters)
            except torch.cuda.OutOfMemoryError:
                cells.append("OOM")
                continue
            finally:
                del layer, x
                torch.cuda.empty_cache()
            baseline.setdefault(T, ms)  # the first row, causal SDPA
            cells.append(f"{ms:.1f} ms ({baseline[T] / ms:.2f}x), {gib:.1f} GiB")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return lines


def cache_table(args: argparse.Namespace) -> list[str]:
    """KV-cache bytes per token (bf16) at equal width, measured from a prefilled cache."""
    dim, T = args.heads * args.head_dim, 64
    rows = {
        f"attn (MHA, {args.heads} KV heads)": ("attn", {}),
        "attn (GQA, 4 KV heads)": ("attn", {"kv_heads": 4}),
        "attn (MQA, 1 KV head)": ("attn", {"kv_heads": 1}),
        "mla": ("mla", {}),
    }
    lines = ["| cache | bytes / token | vs MHA |", "|---|---|---|"]
    full = None
    for label, (name, options) in rows.items():
        layer = blocks.build(name, dim, heads=args.heads, **options).cuda().to(torch.bfloat16).eval()
        cache = blocks.Cache()
        with torch.no_grad():
            layer(torch.randn(1, T, dim, device="cuda", dtype=torch.bfloat16), cache)
        per_token = cache.nbytes() / T
        full = full or per_token
        if name == "mla":
            label = f"mla (latent {layer.kv_rank} + rope key {layer.rope_dim})"
        lines.append(f"| {label} | {per_token:.0f} | {full / per_token:.1f}x smaller |")
    return lines


def quant_error(args: argparse.Namespace) -> list[str]:
    """Relative error ||quant_attn - attn|| / ||attn|| of the same weights on random inputs."""
    dim = args.heads * args.head_dim
    lines = ["| quant_attn vs attn | relative L2 error |", "|---|---|"]
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        exact = blocks.build("attn", dim, heads=args.heads).cuda().to(dtype)
        quant = blocks.build("quant_attn", dim, heads=args.heads).cuda().to(dtype)
        quant.load_state_dict(exact.state_dict())
        x = torch.randn(4, 2048, dim, device="cuda", dtype=dtype)
        with torch.no_grad():
            a, b = exact(x).float(), quant(x).float()
        lines.append(f"| T=2048, {str(dtype).removeprefix('torch.')} | {float((b - a).norm() / a.norm()):.4f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="markdown file to write")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per batch (B = tokens // T)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rows", nargs="*", help="only the rows whose label contains one of these (default: all)")
    parser.add_argument("--tables", nargs="*", default=["speed", "core", "cache", "quant"], help="which tables to make")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/attention.py needs a CUDA GPU")
    header = [
        f"# Attention mixers: forward + backward, bf16, {args.tokens} tokens per batch, {args.heads} heads x {args.head_dim}",
        "",
        f"Device: {torch.cuda.get_device_name()}, torch {torch.__version__}. Cells: median step time (speed-up over causal SDPA), peak memory.",
        "",
    ]
    makers = {"speed": speed_table, "core": core_table, "cache": cache_table, "quant": quant_error}
    body = [line for name in args.tables for line in makers[name](args) + [""]]
    text = "\n".join(header + body) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
