"""Decoding speed and memory of a text LM on the GPU: attn vs mamba2 vs gla at 2k and 16k tokens of context.

One LM per mixer (width 1024, 12 layers, SwiGLU, byte vocabulary, bf16, about the same parameters), a prompt
of C tokens prefilled through `mmeff.generate.generate`, then N greedy tokens decoded step by step through
each mixer's cache. Reports decode tokens/s (batch 1 and batch 8), prefill seconds, the cache's bytes and the
peak GPU memory of the whole call.

    python benchmarks/decode_speed.py --out benchmarks/results/decode_speed_h100.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mmeff import config
from mmeff.generate import Sampling, generate
from mmeff.tasks.lm import LanguageModel

DIM, DEPTH = 1024, 12
MIXERS = {
    "attn": {"heads": 16},
    "mamba2": {},
    "gla": {"heads": 4},
}


def build(mixer: str, device: torch.device) -> LanguageModel:
    """A byte-level causal LM whose every layer is `mixer`."""
    cfg = config.parse(
        {
            "name": f"decode_{mixer}",
            "encoder": {"name": "text", "tokenizer": "byte", "seq_len": 32768},
            "backbone": {"dim": DIM, "pattern": [mixer], "depth": DEPTH, "causal": True, "ffn": "swiglu",
                         "mixers": {mixer: MIXERS[mixer]}},
            "task": {"name": "lm"},
        }
    )
    return LanguageModel(cfg).to(device=device, dtype=torch.bfloat16).eval()


def measure(model: LanguageModel, context: int, batch: int, new: int) -> dict[str, float]:
    """Prefill `context` random byte ids per sequence, decode `new` greedy tokens; seconds, tokens/s, bytes."""
    prompts = torch.randint(0, 256, (batch, context)).tolist()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        generate(model, prompts[:1], Sampling(max_new_tokens=4, greedy=True))  # compile / autotune
        torch.cuda.reset_peak_memory_stats()
        g = generate(model, prompts, Sampling(max_new_tokens=new, greedy=True), eos_id=-1)
        cache = model.new_cache()
        model.hidden(model.embed(torch.tensor(prompts[:1], device="cuda")), cache=cache)
        cache_bytes = sum(c.nbytes() for c in cache)
    return {
        "prefill_s": g.prefill_seconds,
        "tok_s": g.decode_tokens / g.decode_seconds,
        "cache_mib": cache_bytes / 2**20,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 16384])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    device = torch.device("cuda")
    rows = []
    for mixer in MIXERS:
        model = build(mixer, device)
        params = sum(q.numel() for q in model.parameters()) / 1e6
        for context in args.contexts:
            for batch in args.batches:
                t0 = time.perf_counter()
                m = measure(model, context, batch, args.new)
                rows.append(
                    f"| {mixer} | {params:.0f}M | {context} | {batch} | {m['prefill_s']:.3f} | {m['tok_s']:.0f} | "
                    f"{m['cache_mib']:.1f} | {m['peak_gib']:.2f} |"
                )
                print(rows[-1], f"({time.perf_counter() - t0:.0f}s)", flush=True)
        del model
    head = (
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}; width {DIM}, {DEPTH} layers, bf16, greedy, "
        f"{args.new} new tokens after the prompt. Cache = one sequence's decoding state after the prompt.\n\n"
        "| mixer | params | context | batch | prefill s | decode tokens/s | cache MiB/seq | peak GiB |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    table = "\n".join([head, *rows]) + "\n"
    print(table)
    if args.out:
        args.out.write_text(f"`python benchmarks/decode_speed.py --out {args.out}`\n\n{table}")


if __name__ == "__main__":
    main()
