"""`mmeff fit` against the bare training step of the same model, in one process: tokens/s of the Lightning loop (real
shards, loggers, progress bar, validation, checkpoints) and where the difference goes.

For a config (configs/text/gpu_150m_<mixer>.yaml), measured in this order:
- bare step: the config's model on one batch of its train shards, forward, next-token loss (+ MoE aux losses),
  backward, AdamW step, without Lightning; median of `--iters` after `--warmup`. With fused AdamW (the issue's step,
  as benchmarks/lm_train_speed.py), and again with the AdamW the fit builds where the config's `optim.fused` is not
  true (torch's default, foreach on CUDA); the fit's parameter groups either way.
- fit variants, each `mmeff.trainer.fit` (what `mmeff fit CONFIG` runs) for `--steps` optimizer steps, validating and
  checkpointing every `--val-every` steps: `fit` as configured; `no_logging` (trainer.logger none, no progress bar,
  so no LR monitor); `no_clipping` (gradient_clip_val null). Lightning's SimpleProfiler is on in each (host time of
  every hook; about 60 timings a step, inside the figures).
tokens/s: the tokens of the steps after the first `--skip` (compilation, autotuning, loader start) over the wall time
from the end of step `--skip` to the end of training, the device synchronised at both ends only: Lightning's
ThroughputMonitor synchronises after every batch, which would take away the overlap of host and device the eager
step lives on, so the clock here is a callback that synchronises at those two ends and around validation (which
is timed, as is the checkpointing that follows it). `fit` counts everything in the window; `train` leaves the
validation and checkpoint pauses out.

Where the difference goes (ms per step, from the fused bare step to the fit):
- AdamW not fused: bare step with the fit's AdamW - with fused AdamW;
- gradient clipping: fit - fit without clipping; logging (loggers, progress bar, LR monitor): fit - fit without;
- validation, checkpointing: their timed pauses over the steps;
- waiting for data: the profiler's host time in the train loader's `next` and the batch's copy to the device;
- the rest: Lightning's loop and the other callbacks (the non-finite check takes the gradient norm; with fused AdamW
  nothing between log steps waits for the device: tests/gpu/test_fit_sync_gpu.py).
`mmeff fit` takes no extra callbacks, so the clock is added by wrapping `mmeff.trainer._fit_callbacks`, the list fit
hands to Lightning. Shards missing under data.root are written first (python-docs, rows of encoder.seq_len + 1).
Records merge into `--out`.{md,json} (default benchmarks/results/lm_fit_speed_<device>) by config name.

With `task.documents: joined` (rows read across their documents) the bare step calls the model on the ids alone, as
the fit then does, and with `trainer.cuda_graphs: true` besides, both replay the model as CUDA graphs.

    python benchmarks/lm_fit_speed.py configs/text/gpu_150m_gla.yaml configs/text/gpu_150m_attn.yaml --steps 200
    python benchmarks/lm_fit_speed.py configs/text/gpu_150m_gla.yaml --set task.documents=joined --set trainer.cuda_graphs=true
    python benchmarks/lm_fit_speed.py configs/text/gpu_150m_gla.yaml --set backbone.depth=2 --set trainer.accelerator=cpu
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import lightning as L
import torch
from torch import nn

import mmeff.trainer
from mmeff import config
from mmeff.data import build_shards
from mmeff.data.pipeline import find_shards, make_loader
from mmeff.encoders.text import load_tokenizer
from mmeff.ops.varlen import doc_bounds
from mmeff.tasks import build_model, transforms
from mmeff.tasks.base import param_groups
from mmeff.tasks.graphs import GraphedTraining
from lm_train_speed import train_step  # the step lm_train_speed.py times, beside this script
from timing import device_tag, free, median_ms, write_results  # benchmarks/timing.py, beside this script

FIT_VARIANTS = {
    "fit": [],
    "no_logging": ["trainer.logger=none", "trainer.enable_progress_bar=false"],
    "no_clipping": ["trainer.gradient_clip_val=null"],
}
DATA_ACTIONS = ("train_dataloader_next", "batch_to_device")  # SimpleProfiler actions of fetching a train batch


def device_of(cfg: config.RunConfig) -> torch.device:
    """The device the config's trainer runs on (one device)."""
    wants_gpu = cfg.trainer.accelerator in ("gpu", "cuda") or cfg.trainer.accelerator == "auto" and torch.cuda.is_available()
    return torch.device("cuda" if wants_gpu else "cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ensure_shards(cfg: config.RunConfig) -> None:
    """Write the python-docs shards into data.root at the encoder's length when it holds no train shards."""
    try:
        find_shards(cfg.data, "train")
    except FileNotFoundError:
        print(f"writing python-docs shards of {cfg.encoder.seq_len} + 1 tokens into {cfg.data.root}", flush=True)
        build_shards(None, cfg.data.root, source="python-docs", seq_len=cfg.encoder.seq_len, maxcount=50)


# ----- the bare step


def autocast(cfg: config.RunConfig, device: torch.device) -> torch.autocast:
    """The autocast Lightning's `trainer.precision` sets up (bf16-mixed / 16-mixed; none for 32-true)."""
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(cfg.trainer.precision))
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def bare_step(cfg: config.RunConfig, model: nn.Module, batch: dict[str, torch.Tensor], fused: bool | None) -> Callable[[], None]:
    """One step of the LM task's loss on `batch` without Lightning, AdamW as the fit builds it (`fused` passed on)."""
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=o.lr, betas=tuple(o.betas), fused=fused)
    tokens, docs = batch["tokens"], batch["docs"]
    if cfg.task.documents == "joined":  # the model on the ids alone, as the fit calls it (graphed with cuda_graphs)
        call = GraphedTraining(model) if cfg.trainer.cuda_graphs else model
        logits_of = lambda x, d: call(x)  # noqa: E731
    else:  # the documents' bounds as host integers, as the fit finds them before a batch moves
        bounds = doc_bounds(docs[:, :-1].cpu())
        logits_of = lambda x, d: model(x, docs=d, bounds=bounds)  # noqa: E731
    return train_step(model, logits_of, tokens, docs[:, :-1], opt, lambda: autocast(cfg, tokens.device),
                      ignore_index=load_tokenizer(cfg.encoder).pad_id)  # fmt: skip


def measure_bare(cfg: config.RunConfig, args: argparse.Namespace) -> dict[str, Any]:
    """ms and tokens/s of the bare step with fused AdamW and with the fit's AdamW, on one batch of the train shards."""
    device = device_of(cfg)
    train_transform, _ = transforms(cfg)
    batch = next(iter(make_loader(cfg.data, "train", train_transform, True)))
    batch = {k: batch[k].to(device) for k in ("tokens", "docs")}
    tokens = batch["tokens"].shape[0] * (batch["tokens"].shape[1] - 1)
    out: dict[str, Any] = {"tokens_per_step": tokens}  # "fit_optimizer" only where the config's AdamW is not fused
    for name, fused in [("fused", True)] + ([("fit_optimizer", cfg.optim.fused)] if cfg.optim.fused is not True else []):
        L.seed_everything(cfg.seed, verbose=False)
        with device:
            model = build_model(cfg)
        step = bare_step(cfg, model, batch, fused)
        ms, peak = median_ms(step, device, args.warmup, args.iters)
        out[name] = {"ms": ms, "tok_s": tokens / ms * 1e3, "peak_gib": peak}
        del model, step
        free(device)
    return out


# ----- the fit


class Clock(L.Callback):
    """Wall time of the training steps after the first `skip`, synchronising the device only at the window's ends and
    around the pauses it times: validation, and the checkpointing after it (until the next batch or the end)."""

    def __init__(self, skip: int, device: torch.device) -> None:
        self.skip, self.device = skip, device
        self.batches, self.tokens = 0, 0
        self.start: float | None = None
        self.end = self.fit_end = 0.0
        self.pauses = {"validation_s": 0.0, "checkpoint_s": 0.0, "validations": 0}
        self._val_start: float | None = None
        self._ckpt_start: float | None = None

    def _now(self) -> float:
        sync(self.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._ckpt_start is not None:
            self.pauses["checkpoint_s"] += self._now() - self._ckpt_start
            self._ckpt_start = None

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.batches += 1
        if self.start is not None:
            self.tokens += batch["tokens"].shape[0] * (batch["tokens"].shape[1] - 1)
        elif self.batches == self.skip:
            self.start = self._now()

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.start is not None and not trainer.sanity_checking:
            self._val_start = self._now()

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._val_start is not None:
            self._ckpt_start = self._now()  # Lightning runs the checkpoint callbacks after every other callback
            self.pauses["validation_s"] += self._ckpt_start - self._val_start
            self.pauses["validations"] += 1
            self._val_start = None

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.end = self._now()
        if self._ckpt_start is not None:
            self.pauses["checkpoint_s"] += self.end - self._ckpt_start
            self._ckpt_start = None

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.fit_end = self._now()  # after ExportBest, which comes before this callback


def run_fit(cfg: config.RunConfig, args: argparse.Namespace) -> dict[str, Any]:
    """One `mmeff.trainer.fit` of `cfg` with the clock and the profiler: its tokens/s, pauses and profile."""
    device = device_of(cfg)
    clock = Clock(args.skip, device)
    fit_callbacks = mmeff.trainer._fit_callbacks
    with mock.patch.object(mmeff.trainer, "_fit_callbacks", lambda *a, **k: [*fit_callbacks(*a, **k), clock]):
        trainer = mmeff.trainer.fit(cfg, overwrite=True)
    durations = trainer.profiler.recorded_durations
    del trainer
    free(device)
    if clock.start is None:
        raise SystemExit(f"lm_fit_speed: the fit ran {clock.batches} steps, not more than --skip {args.skip}")
    steps = clock.batches - args.skip
    wall = clock.end - clock.start
    paused = clock.pauses["validation_s"] + clock.pauses["checkpoint_s"]
    data = sum(statistics.median(d) for action, d in durations.items() if action.endswith(DATA_ACTIONS))
    return {
        "steps": steps,
        "ms": wall / steps * 1e3,
        "train_ms": (wall - paused) / steps * 1e3,
        "tok_s": clock.tokens / wall,
        "train_tok_s": clock.tokens / (wall - paused),
        **clock.pauses,
        "export_s": clock.fit_end - clock.end,
        "data_wait_ms": data * 1e3,
        "profile": profile_table(durations, clock.batches),
    }


def profile_table(durations: dict[str, list[float]], batches: int, top: int = 15) -> list[dict[str, Any]]:
    """The profiler's actions by total host time: calls, total s, ms per training batch (nested actions overlap)."""
    rows = [{"action": re.sub(r"\{'monitor': ([^,]+),[^}]*\}", r"(monitor \1)", a), "calls": len(d), "total_s": sum(d),
             "ms_per_step": sum(d) / max(1, batches) * 1e3} for a, d in durations.items()]  # fmt: skip
    rows.sort(key=lambda r: r["total_s"], reverse=True)
    return rows[:top]


def gap(bare: dict[str, Any], fits: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Where the ms per step between the fused bare step and the fit go (the module docstring says how)."""
    fit = fits["fit"]
    total = fit["ms"] - bare["fused"]["ms"]
    unfused = bare.get("fit_optimizer", bare["fused"])["ms"] - bare["fused"]["ms"]
    items = [("AdamW not fused (bare, fit's AdamW - fused)", unfused)]
    for variant, what in (("no_clipping", "gradient clipping (fit - no_clipping, train steps)"),
                          ("no_logging", "logging (fit - no_logging, train steps)")):  # fmt: skip
        if variant in fits:
            items.append((what, fit["train_ms"] - fits[variant]["train_ms"]))
    items += [
        (f"validation (runs: {fit['validations']})", fit["validation_s"] / fit["steps"] * 1e3),
        ("checkpointing after validation", fit["checkpoint_s"] / fit["steps"] * 1e3),
        ("waiting for data (profiler: loader next + copy to device)", fit["data_wait_ms"]),
    ]
    items.append(("the rest: Lightning's loop, other callbacks", total - sum(ms for _, ms in items)))
    return [{"item": what, "ms_per_step": ms, "share": ms / total if total else None} for what, ms in items]


def measure(path: str, args: argparse.Namespace, run_root: Path) -> dict[str, Any]:
    """The record of one config: bare steps, fit variants, the gap."""
    base = [*args.set, f"trainer.max_steps={args.steps}", "trainer.max_epochs=null", "trainer.check_val_every_n_epoch=null",
            f"trainer.kwargs.val_check_interval={args.val_every}", "trainer.kwargs.profiler=simple"]  # fmt: skip
    unvalidated = f"trainer.kwargs.val_check_interval={args.steps + 1}"  # the ablations neither validate nor checkpoint
    cfg = config.load(path, base)
    ensure_shards(cfg)
    device = device_of(cfg)
    record: dict[str, Any] = {
        "config": path, "name": cfg.name, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "lightning": L.__version__, "command": " ".join(["python", *sys.argv]),
        "run": time.strftime("%Y-%m-%dT%H:%M:%S"), "skip": args.skip, "val_every": args.val_every,
        "precision": str(cfg.trainer.precision), "batch_size": cfg.data.batch_size, "seq_len": cfg.encoder.seq_len,
        "num_workers": cfg.data.num_workers,
    }  # fmt: skip
    record["bare"] = measure_bare(cfg, args)
    print(json.dumps({"config": path, "bare": record["bare"]}), flush=True)
    fits = {}
    for variant in args.variants:
        overrides = [*base, *FIT_VARIANTS[variant], *([unvalidated] if variant != "fit" else [])]
        overrides.append(f"run_dir={run_root / cfg.name / variant}")
        fits[variant] = run_fit(config.load(path, overrides), args)
        print(json.dumps({"config": path, variant: {k: v for k, v in fits[variant].items() if k != "profile"}}), flush=True)
    record["fits"] = fits
    record["of_bare"] = fits["fit"]["tok_s"] / record["bare"]["fused"]["tok_s"] if "fit" in fits else None
    record["train_of_bare"] = fits["fit"]["train_tok_s"] / record["bare"]["fused"]["tok_s"] if "fit" in fits else None
    record["gap"] = gap(record["bare"], fits) if "fit" in fits else []
    return record


# ----- output


def table(records: list[dict[str, Any]]) -> str:
    """Markdown: per config, the throughput table, where the difference goes, and the profiler's top actions."""
    lines = []
    for r in records:
        bare = r["bare"]
        lines += [f"## {r['name']} (`{r['config']}`)", "",
                  f"{r['device']}, torch {r['torch']}, lightning {r['lightning']}; {r['precision']}, batch {r['batch_size']} x "
                  f"{r['seq_len']} tokens, {r['num_workers']} loader workers; validation + checkpoints every {r['val_every']} "
                  f"steps; the first {r['skip']} steps not timed. `{r['command']}` ({r['run']})", "",
                  "| run | tokens/s | of bare | ms / step | train steps: tokens/s | of bare | ms / step | validation s | "
                  "checkpoint s | export s |", "|---|" + "---:|" * 9]  # fmt: skip
        ref = bare["fused"]["tok_s"]
        for label, b in (("bare step, fused AdamW", bare["fused"]), ("bare step, the fit's AdamW", bare.get("fit_optimizer"))):
            if b is None:
                continue
            lines.append(f"| {label} | {b['tok_s']:,.0f} | {b['tok_s'] / ref:.0%} | {b['ms']:.1f} | | | | | | |")
        for variant, f in r["fits"].items():
            lines.append(f"| {variant} | {f['tok_s']:,.0f} | {f['tok_s'] / ref:.0%} | {f['ms']:.1f} | {f['train_tok_s']:,.0f} | "
                         f"{f['train_tok_s'] / ref:.0%} | {f['train_ms']:.1f} | {f['validation_s']:.1f} ({f['validations']}) | "
                         f"{f['checkpoint_s']:.1f} | {f['export_s']:.1f} |")  # fmt: skip
        if r["gap"]:
            lines += ["", "Where the difference goes (fused bare step -> fit):", "", "| item | ms / step | share |",
                      "|---|---:|---:|"]  # fmt: skip
            for g in r["gap"]:
                share = "" if g["share"] is None else f"{g['share']:.0%}"
                lines.append(f"| {g['item']} | {g['ms_per_step']:.2f} | {share} |")
        if "fit" in r["fits"]:
            lines += ["", "Lightning's SimpleProfiler, `fit` run (host time; nested actions overlap; a hook that waits for the "
                      "device shows the device's time):", "", "| action | calls | total s | ms / step |",
                      "|---|---:|---:|---:|"]  # fmt: skip
            for a in r["fits"]["fit"]["profile"]:
                lines.append(f"| {a['action']} | {a['calls']} | {a['total_s']:.2f} | {a['ms_per_step']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="+", help="run configs, e.g. configs/text/gpu_150m_gla.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of each fit")
    p.add_argument("--skip", type=int, default=10, help="first steps of a fit not timed (compilation, loader start)")
    p.add_argument("--val-every", type=int, help="fit: validation and checkpoints every this many steps (default --steps: once)")
    p.add_argument("--variants", nargs="+", default=list(FIT_VARIANTS), choices=list(FIT_VARIANTS))
    p.add_argument("--warmup", type=int, default=3, help="bare step: untimed steps first")
    p.add_argument("--iters", type=int, default=10, help="bare step: timed steps; the median counts")
    p.add_argument("--run-root", type=Path, help="where the fits' run folders go (default: a temporary folder)")
    p.add_argument("--out", type=Path, help="path stem of .md/.json (default benchmarks/results/lm_fit_speed_<device>)")
    args = p.parse_args()
    logging.getLogger("lightning.pytorch.profilers").setLevel(logging.WARNING)  # its report is kept in the .md instead
    if args.skip < 1 or args.steps <= args.skip:
        raise SystemExit(f"lm_fit_speed: need 1 <= --skip < --steps, got --skip {args.skip} --steps {args.steps}")
    args.val_every = args.val_every or args.steps
    first = config.load(args.configs[0], args.set)
    out = args.out or Path(__file__).parent / "results" / f"lm_fit_speed_{device_tag(device_of(first))}"
    out = out.with_suffix("") if out.suffix in (".md", ".json") else out
    out.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads(out.with_suffix(".json").read_text())["records"] if out.with_suffix(".json").is_file() else []
    with tempfile.TemporaryDirectory(prefix="lm_fit_speed_") as tmp:
        for path in args.configs:
            record = measure(path, args, args.run_root or Path(tmp))
            records = [r for r in records if r["name"] != record["name"]] + [record]
            write_results(out, {"records": records}, table(records))
            if record["of_bare"] is not None:
                print(f"{record['name']}: fit at {record['of_bare']:.0%} of the bare step's tokens/s (train steps alone "
                      f"{record['train_of_bare']:.0%}); {out}.md", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
