"""Multi-query associative recall (Arora et al., 2023 'Zoology'): which attention mixers recall keys that lie beyond their window.

A sequence starts with `pairs` key-value pairs (keys from the first half of the vocabulary, values
from the second); later the keys come back one at a time, at gaps drawn from a power law, among
random filler tokens, and the model must predict each key's value right after it. The context (T)
is longer than the sparse mixers' windows. Each mixer is trained briefly at equal width on CPU:
    python benchmarks/mqar.py --out benchmarks/results/mqar.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmeff.backbone import Backbone
from mmeff.config import BackboneConfig

IGNORE = -100


def mqar(n: int, seq_len: int, vocab: int, pairs: int, gen: torch.Generator, power_a: float = 0.01) -> tuple[Tensor, Tensor]:
    """`n` MQAR sequences: inputs [n, seq_len] and labels (the value after each queried key, IGNORE elsewhere)."""
    half = vocab // 2
    context = 2 * pairs
    space = (seq_len - context) // 2  # query slots, at even offsets after the context
    if space < pairs or pairs >= half:
        raise ValueError(f"seq_len={seq_len} and vocab={vocab} leave no room for {pairs} pairs")
    keys = torch.rand(n, half - 1, generator=gen).argsort(-1)[:, :pairs] + 1  # distinct, never 0
    values = torch.rand(n, half, generator=gen).argsort(-1)[:, :pairs] + half
    # Gaps follow p(g) ~ a * g^(a-1) (Zoology's power law): most queries come soon after the context.
    weights = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial(weights.expand(n, -1), pairs, replacement=False, generator=gen)
    inputs = torch.randint(vocab, (n, seq_len + 1), generator=gen)
    inputs[:, 0:context:2], inputs[:, 1:context:2] = keys, values
    queries = context + 2 * gaps
    inputs.scatter_(1, queries, keys)
    labels = torch.full((n, seq_len + 1), IGNORE)
    labels.scatter_(1, queries + 1, values)
    return inputs[:, :-1], labels[:, 1:]


class RecallModel(nn.Module):
    """Token embedding -> causal backbone of one mixer -> vocabulary logits."""

    def __init__(self, vocab: int, dim: int, depth: int, mixer: str, options: dict[str, Any]) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.backbone = Backbone(BackboneConfig(dim=dim, pattern=[mixer], depth=depth, causal=True, mixers={mixer: options}))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.backbone(self.embed(tokens)))


def accuracy(model: nn.Module, inputs: Tensor, labels: Tensor, batch: int = 256) -> float:
    """Fraction of queried values predicted exactly."""
    model.eval()
    hits = total = 0
    with torch.no_grad():
        for i in range(0, len(inputs), batch):
            pred = model(inputs[i : i + batch]).argmax(-1)
            asked = labels[i : i + batch] != IGNORE
            hits += int((pred == labels[i : i + batch])[asked].sum())
            total += int(asked.sum())
    model.train()
    return hits / total


def train(mixer: str, options: dict[str, Any], test: tuple[Tensor, Tensor], args: argparse.Namespace) -> tuple[float, float, int]:
    """Train one model on fresh batches; (test accuracy, seconds, parameters)."""
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = RecallModel(args.vocab, args.dim, args.depth, mixer, {"heads": args.heads, **options})
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    start = time.perf_counter()
    for _ in range(args.steps):
        inputs, labels = mqar(args.batch, args.seq_len, args.vocab, args.pairs, gen)
        loss = F.cross_entropy(model(inputs).flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    seconds = time.perf_counter() - start
    return accuracy(model, *test), seconds, sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/mqar.md"))
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixers", nargs="*", help="only these rows (default: all)")
    args = parser.parse_args()
    w = args.window
    mixers: dict[str, tuple[str, dict[str, Any], str]] = {
        "attn": ("attn", {}, "all earlier"),
        "sliding": ("sliding", {"window": w}, f"{w} latest"),
        "longformer": ("longformer", {"window": w, "global_tokens": 4}, f"{w} latest + first 4"),
        "block_topk": ("block_topk", {"block": w // 2, "topk": 2}, f"own block + top 2 blocks of {w // 2} (<= {3 * (w // 2)})"),
    }
    test = mqar(1000, args.seq_len, args.vocab, args.pairs, torch.Generator().manual_seed(args.seed + 1))
    lines = [
        f"# MQAR: {args.pairs} key-value pairs, T={args.seq_len}, vocab {args.vocab}; "
        f"{args.depth} layers of width {args.dim} ({args.heads} heads), {args.steps} steps of {args.batch} on CPU",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s); seconds are wall-clock.",
        "",
        "| mixer | keys a query sees | parameters | test recall accuracy | train seconds |",
        "|---|---|---|---|---|",
    ]
    for label, (mixer, options, sees) in mixers.items():
        if args.mixers and label not in args.mixers:
            continue
        acc, seconds, params = train(mixer, options, test, args)
        lines.append(f"| {label} | {sees} | {params:,} | {acc:.3f} | {seconds:.0f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
