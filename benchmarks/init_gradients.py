"""Gradients at initialisation: how much larger each bidirectional token mixer's gradients are than attention's.

One batch of digit canvases through a vision config at initialisation, with the mixer of every layer swapped for
each registered mixer that has a bidirectional form (its defaults; `heads` from the config's mixer), then binary
cross-entropy and backward. Per layer, the root mean square of the gradient reaching that layer's input (the
residual stream), and the ratio to the config's own model (canvas_vit.yaml: softmax attention) at the first
layer. A ratio far above 1 is a model whose first layers get amplified gradients before any training step:
on the H200, canvas_gla with identity q/k features (61x here) trained 1,200 steps to chance, and with elu+1
(1.35x) to timm's accuracy (benchmarks/results/canvas_train_h200.md). A tool for finding that failure, not a
verdict on a mixer: the ratio says nothing of what training does later.

    python benchmarks/init_gradients.py                               # 256 px canvases made in a temporary folder
    python benchmarks/init_gradients.py --root data/digit_canvas --mixers gla retnet deltanet

Writes benchmarks/results/init_gradients.{md,json} (records: row, mixer, options, layer_rms, first_ratio).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmeff import blocks, config
from mmeff.config import RunConfig
from mmeff.data.pipeline import make_loader
from mmeff.tasks import build_model, transforms
from timing import write_results  # benchmarks/timing.py, beside this script


def bidirectional_mixers() -> list[str]:
    """Registered mixers that build with causal=false (the ones a vision backbone can use)."""
    found = []
    for name in blocks.names("mixer"):
        try:
            blocks.build(name, 64, causal=False)
        except ValueError:  # ConfigError included: a causal-only mixer (sink) says so
            continue
        found.append(name)
    return found


def variant(cfg: RunConfig, mixer: str, options: dict[str, Any]) -> RunConfig:
    """`cfg` with every layer's mixer swapped for `mixer` (with `options`; `heads` kept from the config's mixer where
    `mixer` has heads)."""
    data = config.to_dict(cfg)
    base = data["backbone"]["mixers"].get(data["backbone"]["pattern"][0], {})
    takes = blocks.registry.options(blocks.entry(mixer).cls)
    mine = {"heads": base["heads"]} if "heads" in base and (takes is None or "heads" in takes) else {}
    data["backbone"] = {**data["backbone"], "pattern": [mixer], "mixers": {mixer: {**mine, **options}}}
    return config.parse(data)


def layer_gradients(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[float]:
    """RMS of the loss gradient at each backbone layer's input, for one batch."""
    inputs: list[torch.Tensor] = []

    def keep(_module: nn.Module, args: tuple[Any, ...]) -> None:
        args[0].retain_grad()
        inputs.append(args[0])

    hooks = [layer.register_forward_pre_hook(keep) for layer in model.backbone.layers]
    try:
        logits = model(batch["input"])
        F.binary_cross_entropy_with_logits(logits.float(), batch["label"]).backward()
    finally:
        for h in hooks:
            h.remove()
    return [x.grad.pow(2).mean().sqrt().item() for x in inputs]


def parse_row(text: str) -> tuple[str, dict[str, Any]]:
    """'gla' or 'gla:feature_map=identity,conv_size=4' -> (mixer, options)."""
    mixer, _, rest = text.partition(":")
    items = [item for item in rest.split(",") if item]
    bad = [item for item in items if "=" not in item]
    if bad:
        raise SystemExit(f"init_gradients: --mixers {text!r}: {bad[0]!r} is not KEY=VALUE")
    return mixer, {k: config.yaml_load(v) for k, v in (item.split("=", 1) for item in items)}


def write(records: list[dict[str, Any]], header: str, path: Path) -> None:
    """`path`.json and `path`.md, each replaced atomically."""
    depth = len(records[0]["layer_rms"])
    lines = ["| row | first layer / baseline | " + " | ".join(f"layer {i} RMS" for i in range(depth)) + " |",
             "|---|---:|" + "---:|" * depth]  # fmt: skip
    for r in records:
        lines.append(f"| {r['row']} | {r['first_ratio']:.2f}x | " + " | ".join(f"{v:.2e}" for v in r["layer_rms"]) + " |")
    write_results(path, {"records": records}, header + "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=Path(__file__).parents[1] / "configs/vision/canvas_vit.yaml")
    p.add_argument("--root", type=Path, help="digit-canvas shards (default: made in a temporary folder at --size)")
    p.add_argument("--size", type=int, default=256, help="canvas side in px when the shards are made here")
    p.add_argument("--mixers", nargs="*", help="rows: MIXER or MIXER:KEY=VALUE,... (default: every bidirectional mixer)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--dim", type=int)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--name", default="init_gradients")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            from mmeff.data import build_shards

            root = Path(tmp) / "canvas"
            build_shards(None, root, source="digit-canvas", size=args.size, train=args.batch, val=1, test=1)
        sets = [f"data.root={root}", "data.num_workers=0", f"data.batch_size={args.batch}", f"backbone.depth={args.depth}"]
        sets += [f"encoder.image_size={args.size}"] if args.root is None else []
        sets += [f"backbone.dim={args.dim}"] if args.dim else []
        cfg = config.load(args.config, sets)
        batch = next(iter(make_loader(cfg.data, "train", transforms(cfg)[1], train=False)))
    rows = [("baseline", cfg)] + [(text, variant(cfg, *parse_row(text))) for text in (args.mixers or bidirectional_mixers())]
    records: list[dict[str, Any]] = []
    for text, row_cfg in rows:
        torch.manual_seed(row_cfg.seed)
        rms = layer_gradients(build_model(row_cfg), batch)
        mixer = row_cfg.backbone.pattern[0]
        first = rms[0] / records[0]["layer_rms"][0] if records else 1.0
        records.append({"row": text if text != "baseline" else f"{mixer} ({args.config.stem})", "mixer": mixer,
                        "options": config.to_dict(row_cfg.backbone.mixers).get(mixer, {}), "layer_rms": rms,
                        "first_ratio": first})  # fmt: skip
        print(f"{records[-1]['row']:40s} first layer {first:7.2f}x  " + " ".join(f"{v:.2e}" for v in rms), flush=True)
    header = (f"Gradients at initialisation (benchmarks/init_gradients.py): {args.config.name}, depth {args.depth}, "
              f"width {cfg.backbone.dim}, {cfg.encoder.image_size} px digit canvases, one batch of {args.batch}, "
              f"torch {torch.__version__}, CPU fp32. RMS of the loss gradient at each layer's input; first layer / "
              "baseline: the first layer's over the config's own model.\n\n"
              f"    python benchmarks/init_gradients.py {' '.join(sys.argv[1:])}\n\n")  # fmt: skip
    write(records, header, args.out_dir / args.name)


if __name__ == "__main__":
    main()
