"""Decoding memory per layer per sequence: each mixer's real cache, measured, at 2k / 32k / 128k context.

Every registered token mixer is built at width 1024 (16 heads x 64 where it has heads), fed a
prompt through its decoding cache, then stepped token by token; `Cache.nbytes()` is read after
the prompt and after the steps. A cache that grows is reported per token and scaled to the
context; one that does not is the fixed-size state.

    python benchmarks/decode_state.py --out benchmarks/results/decode_state.md
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import torch

from mmeff import blocks

DIM, PROMPT, STEPS = 1024, 1100, 16  # a prompt past the 1,024-token windows, so their rings are full
CONTEXTS = (2048, 32768, 131072)
# Options so that every mixer has 16 heads of 64 (where it has heads) and GQA has 4 KV heads.
OPTIONS = {
    "attn": {"heads": 16},
    "attn (GQA, 4 kv heads)": {"heads": 16, "kv_heads": 4},
    "sliding": {"window": 1024},
    "sink": {"window": 1020, "sinks": 4},
    "longformer": {"window": 1024},
}


def measure(name: str, options: dict) -> tuple[int, float]:
    """(fixed bytes, bytes per token) of mixer `name`'s cache, from two readings."""
    kind = name.split(" ")[0]
    params = inspect.signature(blocks.entry(kind).cls.__init__).parameters
    if "heads" in params and "heads" not in options:
        options = {**options, "heads": 16}
    mixer = blocks.build(kind, DIM, causal=True, **options).eval()
    cache = blocks.Cache()
    x = torch.randn(1, PROMPT + STEPS, DIM)
    with torch.no_grad():
        mixer(x[:, :PROMPT], cache=cache)
        first = cache.nbytes()
        for t in range(PROMPT, PROMPT + STEPS):
            mixer(x[:, t : t + 1], cache=cache)
    per_token = (cache.nbytes() - first) / STEPS
    return int(first - per_token * PROMPT), per_token


def human(n: float) -> str:
    """Bytes in KiB/MiB/GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def main() -> None:
    """Measure every mixer and write a markdown table."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.manual_seed(0)
    names = [n for n in blocks.names("mixer")] + list(k for k in OPTIONS if " " in k)
    lines = [
        f"Width {DIM}, one layer, one sequence, the mixers' own cache dtypes (fp32 here); prompt {PROMPT} then "
        f"{STEPS} single-token steps. `grows` = bytes per generated token.\n",
        "| mixer | fixed | grows/token | " + " | ".join(f"T={t // 1024}k" for t in CONTEXTS) + " |",
        "|---|---:|---:|" + "---:|" * len(CONTEXTS),
    ]
    for name in names:
        try:
            fixed, per_token = measure(name, OPTIONS.get(name, {}))
        except Exception as e:  # noqa: BLE001  (a mixer without decoding support is reported, not fatal)
            lines.append(f"| {name} | error: {type(e).__name__}: {str(e)[:60]} | | " + " | " * len(CONTEXTS))
            continue
        cells = [human(fixed + per_token * t) for t in CONTEXTS]
        lines.append(f"| {name} | {human(fixed)} | {human(per_token)} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
