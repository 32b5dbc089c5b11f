"""Accuracy at equal steps: mmeff configs and a timm ViT trained by one loop on multi-label shards (digit-canvas).

Every model runs the same loop on its config's data (shards, transforms, batch size): AdamW with mmeff's parameter
groups and warmup + cosine schedule (`optim`), gradient clipping (`trainer.gradient_clip_val`), bf16 autocast on
CUDA, binary cross-entropy; `--steps` optimizer steps, then exact-set accuracy and mAP (mmeff.metrics.multilabel)
on the val and test splits. mmeff models are built from their config by `mmeff.tasks.build_model` (what
`mmeff fit` trains); `--timm NAME` adds timm.create_model(NAME, img_size=encoder.image_size,
in_chans=encoder.in_chans, num_classes, global_pool='avg', class_token=False) on the first config's data and optim.
Training img/s counts the steps after the first `--skip` (compilation, autotuning), data loading included;
`data_wait_s` is how long those steps waited for the loader (near 0: the model set the pace). `--compile` compiles
every model (nn.Module.compile). Every 100 steps (and at the last) it prints the mean loss and gradient norm
(before clipping) since the last print; the JSON row keeps them (`loss_trace`). One JSON row per model (merged by
model name) and a markdown table, rewritten after each model.

    mmeff shards --source digit-canvas -o size=512 data/digit_canvas_512
    python benchmarks/vision_train.py configs/vision/canvas_{vit,gla,mamba2,sliding}.yaml \\
        --timm vit_small_patch16_224 --steps 3000 --name canvas_train_512_h200 \\
        --set data.root=data/digit_canvas_512 --set encoder.image_size=512
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from mmeff import config, metrics
from mmeff.config import RunConfig
from mmeff.data.pipeline import make_loader
from mmeff.tasks import build_model, transforms
from mmeff.tasks.base import param_groups, warmup_cosine
from timing import write_results  # benchmarks/timing.py, beside this script


def timm_model(name: str, cfg: RunConfig, extra: dict[str, Any]) -> nn.Module:
    """timm model `name` for `cfg`'s images and classes (mean pooling, no class token, as the mmeff configs)."""
    import timm

    enc = cfg.encoder
    options = dict(img_size=enc.image_size, in_chans=enc.in_chans, num_classes=cfg.task.num_classes, global_pool="avg",
                   class_token=False)  # fmt: skip
    return timm.create_model(name, pretrained=False, **{**options, **extra})


def endless(loader: Any) -> Iterator[dict[str, Any]]:
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA; nothing on the CPU (where bf16 matmuls are slow)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(model: nn.Module, cfg: RunConfig, steps: int, skip: int, device: torch.device) -> dict[str, Any]:
    """`steps` optimizer steps of `model` on `cfg`'s train split; the timing of those after the first `skip`."""
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=o.lr, betas=tuple(o.betas), fused=device.type == "cuda")
    warmup = min(o.warmup_steps, steps // 2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, steps, o.min_lr_ratio))
    batches = endless(make_loader(cfg.data, "train", transforms(cfg)[0], train=True))
    clip = cfg.trainer.gradient_clip_val
    images, waited, start = 0, 0.0, time.perf_counter()
    # Means over each stretch of up to 100 steps, summed on the device and read once per stretch: a single batch's
    # loss is too noisy to compare models by, and the gradient norm (before clipping) shows a model that cannot move.
    sums, count, trace = torch.zeros(2, device=device), 0, []
    model.train()
    for i in range(steps):
        if i == skip:
            sync(device)
            images, waited, start = 0, 0.0, time.perf_counter()
        before = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - before
        x, y = batch["input"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
        with autocast(device):
            logits = model(x)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(model.parameters(), clip or math.inf)
        sums += torch.stack([loss.detach(), norm.float()])
        count += 1
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        images += x.shape[0]
        if (i + 1) % 100 == 0 or i + 1 == steps:
            value, grad_norm = (sums / count).tolist()
            trace.append({"step": i + 1, "loss": value, "grad_norm": grad_norm})
            sums.zero_()
            count = 0
            print(f"  step {i + 1}/{steps} loss {value:.4f} grad norm {grad_norm:.3g} (means since the last line)", flush=True)
            if not math.isfinite(value):
                return {"note": f"loss {value} at step {i + 1}", "loss_trace": trace}
    sync(device)
    seconds = time.perf_counter() - start
    img_s = images / seconds if images else None
    return {"train_s": seconds, "img_s": img_s, "data_wait_s": waited, "final_loss": loss.item(), "loss_trace": trace}


@torch.no_grad()
def evaluate(model: nn.Module, cfg: RunConfig, split: str, device: torch.device) -> dict[str, float]:
    """Exact-set accuracy and mAP of `model` on `split`."""
    model.eval()
    scores = metrics.multilabel(cfg.task.num_classes).to(device)
    for batch in make_loader(cfg.data, split, transforms(cfg)[1], train=False):
        with autocast(device):
            logits = model(batch["input"].to(device, non_blocking=True))
        scores.update(torch.sigmoid(logits.float()), batch["label"].to(device).int())
    model.train()
    return {f"{split}_{k}": float(v) for k, v in scores.compute().items()}


def run(name: str, model: nn.Module, cfg: RunConfig, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Train and test one model; its JSON row."""
    row: dict[str, Any] = {"model": name, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                           "px": cfg.encoder.image_size, "batch": cfg.data.batch_size, "steps": args.steps,
                           "compiled": args.compile, "torch": torch.__version__,
                           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}  # fmt: skip
    print(f"{name}: {row['params_m']:.1f}M parameters, {args.steps} steps", flush=True)
    model = model.to(device)
    if args.compile:
        torch._dynamo.reset()
        model.compile()
    row.update(train(model, cfg, args.steps, args.skip, device))
    if "note" not in row:
        for split in ("val", "test"):
            row.update(evaluate(model, cfg, split, device))
    return row


# Measured columns of the table: (heading, JSON key, format).
COLUMNS = [("img/s", "img_s", "{:,.0f}"), ("data wait s", "data_wait_s", "{:.0f}"), ("train s", "train_s", "{:.0f}"),
           ("val exact", "val_exact", "{:.4f}"), ("val mAP", "val_map", "{:.4f}"), ("test exact", "test_exact", "{:.4f}"),
           ("test mAP", "test_map", "{:.4f}")]  # fmt: skip


def write(rows: list[dict[str, Any]], path: Path) -> None:
    """`path`.json and `path`.md, each replaced atomically."""
    headings = ["model", "params", "px", "steps x batch"] + [c[0] for c in COLUMNS] + ["note"]
    lines = ["| " + " | ".join(headings) + " |", "|---|" + "---:|" * (len(headings) - 2) + "---|"]
    for r in rows:
        cells = [r["model"] + (" (compiled)" if r["compiled"] else ""), f"{r['params_m']:.1f}M", str(r["px"]),
                 f"{r['steps']} x {r['batch']}"]  # fmt: skip
        cells += ["" if r.get(key) is None else fmt.format(r[key]) for _, key, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells + [r.get("note", "")]) + " |")
    header = f"{rows[0]['device']}, torch {rows[0]['torch']}; one training loop for every model (benchmarks/vision_train.py).\n\n"
    write_results(path, {"rows": rows}, header + "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="+", type=Path, help="mmeff run configs (multi-label classification)")
    p.add_argument("--timm", nargs="*", default=[], help="timm model names (the first config's data and optim)")
    p.add_argument("--timm-args", type=yaml.safe_load, default={}, help="more timm.create_model options, YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override of every config")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--skip", type=int, default=20, help="first steps left out of img/s (compilation, autotuning)")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--name", default="canvas_train", help="file stem of the results")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfgs = [config.load(path, args.set) for path in args.configs]
    for path, cfg in zip(args.configs, cfgs):
        if cfg.task.name != "classify" or not cfg.task.multilabel:
            raise SystemExit(f"vision_train: {path} is not multi-label classification (task.multilabel: true)")
    out = args.out_dir / args.name
    earlier = out.with_name(out.name + ".json")
    rows = json.loads(earlier.read_text())["rows"] if earlier.is_file() else []
    models = [(cfg.name, cfg, lambda cfg=cfg: build_model(cfg)) for cfg in cfgs]
    models += [(f"timm {n}", cfgs[0], lambda n=n: timm_model(n, cfgs[0], args.timm_args)) for n in args.timm]
    for name, cfg, make in models:
        torch.manual_seed(cfg.seed)
        row = run(name, make(), cfg, args, device)
        rows = [r for r in rows if (r["model"], r["compiled"]) != (name, args.compile)] + [row]
        write(rows, out)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
