"""Training throughput of a 12-layer, width-1024 text LM on the GPU: gla / mamba2 / gated_deltanet vs attn at long T.

Each model: byte vocabulary, SwiGLU, fp32 weights under bf16 autocast, AdamW; one step = forward, next-token
loss, backward, optimizer step on B x T tokens. Median of `--iters` steps after `--warmup`.

    python benchmarks/lm_train_speed.py --out benchmarks/results/lm_train_speed_h100.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from mmeff import config
from mmeff.tasks.lm import LanguageModel
from timing import cuda_median_ms  # benchmarks/timing.py, beside this script

MIXERS = {"attn": {"heads": 16}, "gla": {"heads": 4}, "mamba2": {}, "gated_deltanet": {"heads": 8}}


def build(mixer: str, dim: int, depth: int, seq_len: int) -> LanguageModel:
    """A causal byte-level LM whose every layer is `mixer`."""
    cfg = config.parse(
        {
            "name": f"speed_{mixer}",
            "encoder": {"name": "text", "tokenizer": "byte", "seq_len": seq_len},
            "backbone": {"dim": dim, "pattern": [mixer], "depth": depth, "causal": True, "ffn": "swiglu",
                         "mixers": {mixer: MIXERS[mixer]}},
            "task": {"name": "lm"},
        }
    )
    return LanguageModel(cfg).cuda()


def step_ms(model: LanguageModel, tokens: torch.Tensor, warmup: int, iters: int) -> tuple[float, float]:
    """Median milliseconds of one training step and its peak GiB."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return cuda_median_ms(step, warmup, iters)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[16384])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--mixers", nargs="+", default=list(MIXERS))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    rows, base = [], {}
    for T in args.T:
        for mixer in args.mixers:
            torch.manual_seed(0)
            model = build(mixer, args.dim, args.depth, T)
            params = sum(q.numel() for q in model.parameters()) / 1e6
            tokens = torch.randint(0, 256, (args.batch, T + 1), device="cuda")
            try:
                ms, gib = step_ms(model, tokens, args.warmup, args.iters)
            except torch.cuda.OutOfMemoryError:
                rows.append(f"| {mixer} | {params:.0f}M | {T} | OOM | | | |")
                continue
            finally:
                del model
                torch.cuda.empty_cache()
            tok_s = args.batch * T / ms * 1e3
            base.setdefault(T, tok_s)  # the first mixer (attn) is the reference
            rows.append(f"| {mixer} | {params:.0f}M | {T} | {ms:.0f} | {tok_s:,.0f} | {tok_s / base[T]:.2f}x | {gib:.1f} |")
            print(rows[-1], flush=True)
    table = "\n".join(
        [
            f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.depth} layers, width {args.dim}, batch "
            f"{args.batch}, bf16 autocast, AdamW; median of {args.iters} steps.",
            "",
            "| mixer | params | T | ms / step | tokens/s | vs attn | peak GiB |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    print(table)
    if args.out:
        args.out.write_text(f"Command: `python benchmarks/lm_train_speed.py --out {args.out}`\n\n{table}\n")


if __name__ == "__main__":
    main()
