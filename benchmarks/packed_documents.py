"""Do packed documents leak? Every registered token mixer, causal and bidirectional: a 2-layer backbone over rows
that pack several documents (the layout's `docs`) against the same backbone run on each document alone.

    python benchmarks/packed_documents.py [--out FILE.md]

Prints the max |packed - alone| per mixer; 0 up to float rounding (< 1e-4) means the documents stay apart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "blocks"))
from test_mixer_harness import OPTIONS  # noqa: E402  (the harness's small options of every mixer)

from mmeff import blocks  # noqa: E402
from mmeff.backbone import Backbone  # noqa: E402
from mmeff.blocks import Layout  # noqa: E402
from mmeff.config import BackboneConfig  # noqa: E402

LENGTHS = [[9, 4, 11], [24]]  # documents per row


def leak(name: str, causal: bool) -> float:
    """max |packed - alone| over every document of LENGTHS, for a 2-layer backbone of `name`."""
    options = {k: v for k, v in OPTIONS[name].items() if k != "bidirectional"}
    torch.manual_seed(0)
    cfg = BackboneConfig(dim=32, pattern=[name], depth=2, causal=causal, mixers={name: options})
    model = Backbone(cfg).eval()
    x = torch.randn(len(LENGTHS), 24, 32)
    docs = torch.tensor([sum(([d] * n for d, n in enumerate(row)), []) for row in LENGTHS])
    with torch.no_grad():
        packed = model(x, layout=Layout(docs=docs))
        worst = 0.0
        for b, row in enumerate(LENGTHS):
            start = 0
            for n in row:
                alone = model(x[b : b + 1, start : start + n])[0]
                worst = max(worst, (packed[b, start : start + n] - alone).abs().max().item())
                start += n
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    lines = ["| mixer | causal | bidirectional |", "|---|---:|---:|"]
    leaking = {True: 0, False: 0}
    for name in blocks.names("mixer"):
        cells = []
        for causal in (True, False):
            if not causal and OPTIONS[name].get("bidirectional", True) is False:
                cells.append("-")
                continue
            err = leak(name, causal)
            leaking[causal] += err >= 1e-4
            cells.append(f"{err:.1e}" + (" LEAK" if err >= 1e-4 else ""))
        lines.append(f"| {name} | {' | '.join(cells)} |")
        print(lines[-1], flush=True)
    lines.append(f"\nLeaking: {leaking[True]} causal, {leaking[False]} bidirectional (max |packed - alone| >= 1e-4).")
    text = f"Command: `python {' '.join(sys.argv)}` (CPU, fp32, torch {torch.__version__})\n\n" + "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
