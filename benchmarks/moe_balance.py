"""Expert load balance of the digits MoE under each balancing method (none / Switch loss / z-loss / aux-free bias).

Trains configs/vision/digits_moe.yaml once per method (one training at a time, CPU), then runs the exported
model over the test split and reports, per method, the max/mean expert load (assignments of the whole test
set per expert; 1.0 is perfectly balanced) averaged over the MoE layers and of the worst layer, with test
accuracy. Writes a markdown table:

    python benchmarks/moe_balance.py --out benchmarks/results/moe_balance.md
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from mmeff import checkpoint, config, trainer
from mmeff.blocks.moe import MoE
from mmeff.data import make_loader
from mmeff.tasks import transforms

METHODS = {
    "none": {"aux_loss_coef": 0.0, "z_loss_coef": 0.0, "bias_update_rate": 0.0},
    "Switch aux loss (0.01)": {"aux_loss_coef": 0.01, "z_loss_coef": 0.0, "bias_update_rate": 0.0},
    "router z-loss (0.001)": {"aux_loss_coef": 0.0, "z_loss_coef": 0.001, "bias_update_rate": 0.0},
    "aux-loss-free bias (rate 0.001)": {"aux_loss_coef": 0.0, "z_loss_coef": 0.0, "bias_update_rate": 0.001},
}


@torch.no_grad()
def test_balance(cfg: config.RunConfig, export: Path) -> tuple[list[float], float]:
    """(max/mean expert load per MoE layer over the test split, test accuracy) of checkpoint `export`."""
    model = checkpoint.load(export)
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    loads = [torch.zeros(m.num_experts) for m in layers]
    correct = seen = 0
    for batch in make_loader(cfg.data, "test", transforms(cfg)[1], train=False):
        logits = model(batch["input"])
        correct += int((logits.argmax(-1) == batch["label"]).sum())
        seen += len(batch["label"])
        for total, m in zip(loads, layers):
            total += m.load.float()
    return [float(t.max() / t.mean()) for t in loads], correct / seen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=Path("configs/vision/digits_moe.yaml"))
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--run-dir", default="runs/moe_balance")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/moe_balance.md"))
    args = p.parse_args()

    rows = []
    for label, options in METHODS.items():
        slug = label.split(" (")[0].replace(" ", "_").lower()
        overrides = [f"--name={slug}", f"--run_dir={args.run_dir}/{slug}", f"--trainer.max_epochs={args.epochs}",
                     "--trainer.enable_progress_bar=false", "--trainer.logger=none"]
        overrides += [f"--backbone.ffn_options.{k}={v}" for k, v in options.items()]
        cfg = config.load(args.config, overrides)
        start = time.perf_counter()
        trainer.fit(cfg)
        minutes = (time.perf_counter() - start) / 60
        ratios, acc = test_balance(cfg, cfg.out_dir / "export")
        rows.append((label, sum(ratios) / len(ratios), max(ratios), acc, minutes))
        print(rows[-1], flush=True)

    base = config.load(args.config)
    opts = base.backbone.ffn_options
    lines = [
        "# MoE expert load balance on digits (CPU)",
        "",
        f"`{args.config}` ({base.backbone.depth} layers, {opts['num_experts']} experts, top-{opts['top_k']}, "
        f"{opts.get('shared_experts', 0)} shared), {args.epochs} epochs per method, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}. Load = assignments per expert over the whole test split; max/mean = 1 is "
        "perfectly balanced, 4 means one expert takes every token's choices (top-2 of 8).",
        "",
        "| balancing | max/mean load (mean over layers) | worst layer | test acc | train min |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {label} | {mean:.2f} | {worst:.2f} | {acc:.4f} | {minutes:.1f} |" for label, mean, worst, acc, minutes in rows
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)


if __name__ == "__main__":
    main()
