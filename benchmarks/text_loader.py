"""Text data throughput: shard writer and loader tokens/s versus a tiny CPU LM's training step (markdown table)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmeff.backbone import Backbone
from mmeff.config import BackboneConfig, DataConfig
from mmeff.data import make_loader, read_index
from mmeff.data.sources import python_docs
from mmeff.data.text import write_text_shards
from mmeff.encoders.text import ByteTokenizer, TextEncoderConfig, Tokenizer, make_transform, train_bpe


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def time_writer(docs: list[tuple[str, str]], out: Path, tokenizer: Tokenizer, seq_len: int) -> tuple[int, float]:
    """(tokens written, padding excluded; seconds) of tokenizing, packing and writing `docs`."""
    start = time.perf_counter()
    write_text_shards(docs, out, tokenizer, seq_len=seq_len)
    seconds = time.perf_counter() - start
    return sum(read_index(out)["meta"]["tokens"].values()), seconds


def time_loader(root: Path, seq_len: int, batch_size: int, workers: int, batches: int) -> float:
    """Seconds per batch of the train loader (after its first batch, which includes worker start-up)."""
    cfg = DataConfig(root=str(root), batch_size=batch_size, num_workers=workers)
    loader = iter(make_loader(cfg, "train", make_transform(TextEncoderConfig(seq_len=seq_len), True), train=True))
    next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return (time.perf_counter() - start) / batches


class TinyLM(nn.Module):
    """Embedding -> backbone -> tied output head, the shape of the LM task."""

    def __init__(self, vocab_size: int, cfg: BackboneConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, cfg.dim)
        self.backbone = Backbone(cfg)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.embed(tokens)) @ self.embed.weight.T


def time_step(vocab_size: int, seq_len: int, batch_size: int, steps: int) -> float:
    """Seconds per forward + backward + AdamW step of a 4-layer dim-256 attention LM."""
    model = TinyLM(vocab_size, BackboneConfig(dim=256, pattern=["attn"], depth=4, mixers={"attn": {"heads": 4}}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1))

    def step() -> None:
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    """Run every measurement and print the markdown report."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=200, help="loader batches timed")
    p.add_argument("--steps", type=int, default=3, help="model steps timed")
    p.add_argument("--bpe-vocab", type=int, default=4096)
    args = p.parse_args()
    cpus, load = len(os.sched_getaffinity(0)), os.getloadavg()[0]  # nproc; other processes' share of the CPUs
    torch.set_num_threads(cpus)

    docs = list(python_docs.documents())
    batch_tokens = args.batch_size * args.seq_len
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        byte_root = Path(tmp) / "byte"
        for name, tok, root in [("byte", ByteTokenizer(), byte_root), ("bpe", None, Path(tmp) / "bpe")]:
            if tok is None:
                start = time.perf_counter()
                tok = train_bpe((text for _, text in docs), args.bpe_vocab)
                rows.append((f"BPE training ({args.bpe_vocab} ids, corpus read once)", None, time.perf_counter() - start))
            tokens, seconds = time_writer(docs, root, tok, args.seq_len)
            rows.append((f"shard writer, {name} tokenizer ({tokens:,} tokens)", tokens / seconds, seconds))
        for workers in (0, 1):
            seconds = time_loader(byte_root, args.seq_len, args.batch_size, workers, args.batches)
            stage = f"loader, num_workers={workers} (batch {args.batch_size}x{args.seq_len + 1})"
            rows.append((stage, batch_tokens / seconds, seconds))
    seconds = time_step(ByteTokenizer().vocab_size, args.seq_len, args.batch_size, args.steps)
    stage = f"tiny LM train step (4 x attn, dim 256, batch {args.batch_size}x{args.seq_len})"
    rows.append((stage, batch_tokens / seconds, seconds))

    print("# Text data throughput\n")
    print(f"Command: `python {' '.join(sys.argv)}`  ")
    print(f"Machine: {cpus} CPUs (nproc), {cpu_model()}; load average {load:.1f} at the start  ")
    print(f"Software: Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads)  ")
    print(f"Corpus: python-docs (stdlib docstrings), {len(docs)} documents, {sum(len(t.encode()) for _, t in docs)} bytes\n")
    print("| stage | tokens/s | seconds (per batch or step; total for writer and BPE) |")
    print("|---|---:|---:|")
    for stage, rate, seconds in rows:
        print(f"| {stage} | {f'{rate:,.0f}' if rate else '-'} | {seconds:.4f} |")


if __name__ == "__main__":
    main()
