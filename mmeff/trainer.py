"""Fit and evaluate a run config with Lightning's Trainer; export the best weights as a checkpoint folder."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from safetensors.torch import load_file

from mmeff import checkpoint, config as config_mod, lora
from mmeff.blocks.moe import upcycle_state
from mmeff.config import ConfigError, RunConfig
from mmeff.data import ShardDataModule
from mmeff.tasks import build_model, build_task, transforms

log = logging.getLogger("mmeff")


class ExportBest(Callback):
    """At the end of fitting, write the best (else last) weights as `<run>/export` on rank zero."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def on_fit_end(self, trainer: L.Trainer, task: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if best:
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            task.load_state_dict(state)
        model, cfg = lora.merged(task.model, self.cfg)  # LoRA adapters folded into plain weights
        path = checkpoint.export(model, cfg, cfg.out_dir / "export", extra=getattr(task, "export_files", None))
        print(f"exported {'best' if best else 'last'} weights to {path}")


def _loggers(cfg: RunConfig) -> list[Logger] | bool:
    kind = cfg.trainer.logger
    if kind == "none":
        return False
    loggers: list[Logger] = []
    if kind in ("auto", "csv"):
        loggers.append(CSVLogger(cfg.out_dir, name="logs"))
    if kind == "tensorboard" or (kind == "auto" and importlib.util.find_spec("tensorboard")):
        loggers.append(TensorBoardLogger(cfg.out_dir, name="tb"))
    return loggers


def build_trainer(cfg: RunConfig, monitor: bool = True) -> L.Trainer:
    """A Lightning Trainer from `cfg.trainer`, with checkpointing, lr monitor and loggers."""
    t = cfg.trainer
    has_val = monitor and cfg.data.val is not None
    best = ModelCheckpoint(
        dirpath=cfg.out_dir / "checkpoints",
        monitor=t.monitor if has_val else None,
        mode="max" if t.monitor.endswith(("acc", "bleu", "exact")) else "min",
        save_top_k=t.save_top_k if has_val else 1,
        save_last=not has_val,
        filename="{epoch}-{step}",
    )
    loggers = _loggers(cfg)
    callbacks: list[Callback] = [best, ExportBest(cfg)]
    if has_val:
        # Lightning's save_last copies a checkpoint only when `best` writes one (a new best), so --resume
        # would lose the epochs since; this one rewrites last.ckpt after every epoch.
        callbacks.insert(1, ModelCheckpoint(dirpath=cfg.out_dir / "checkpoints", filename="last", enable_version_counter=False))
    if loggers:
        callbacks.append(LearningRateMonitor("step"))
    try:
        return L.Trainer(
            max_epochs=t.max_epochs,
            max_steps=t.max_steps,
            precision=t.precision,
            accelerator=t.accelerator,
            devices=t.devices,
            strategy=t.strategy,
            gradient_clip_val=t.gradient_clip_val,
            accumulate_grad_batches=t.accumulate_grad_batches,
            log_every_n_steps=t.log_every_n_steps,
            check_val_every_n_epoch=t.check_val_every_n_epoch,
            num_sanity_val_steps=t.num_sanity_val_steps,
            enable_progress_bar=t.enable_progress_bar,
            limit_val_batches=None if has_val else 0,
            logger=loggers,
            callbacks=callbacks,
            default_root_dir=cfg.out_dir,
            use_distributed_sampler=False,
            **t.kwargs,
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"trainer: Lightning rejected the options: {e}") from None


def _resume_path(cfg: RunConfig, resume: str | None) -> str | None:
    if resume is None:
        return None
    path = cfg.out_dir if resume == "last" else Path(resume)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return str(candidate)
        raise FileNotFoundError(f"--resume {resume}: no last.ckpt under {path} (expected {path}/checkpoints/last.ckpt)")
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: {path} does not exist")
    return str(path)


def fit(cfg: RunConfig, resume: str | None = None) -> L.Trainer:
    """Train `cfg`; resume from a run folder, a .ckpt file or 'last' (this run's own last checkpoint)."""
    if cfg.upcycle and not cfg.init_from:
        raise ConfigError("upcycle: true needs init_from: the dense checkpoint folder to upcycle")
    ckpt_path = _resume_path(cfg, resume)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    config_mod.save(cfg, cfg.out_dir / "config.yaml")
    model = build_model(cfg)
    if cfg.init_from:
        print(checkpoint.init_from(model, cfg.init_from))
        if cfg.upcycle:
            upcycled = upcycle_state(load_file(str(Path(cfg.init_from) / checkpoint.WEIGHTS)), model)
            model.load_state_dict(upcycled, strict=False)
            print(f"upcycle: {len(upcycled)} MoE tensors initialised from the dense ffn weights")
    if cfg.lora:
        print(lora.apply(model, cfg.lora))
    if cfg.trainer.compile:
        model.compile()  # nn.Module.compile, not torch.compile(model): state_dict names stay those of the plain model
    task = build_task(lora.task_config(cfg), model)
    trainer = build_trainer(cfg)
    trainer.fit(task, datamodule=ShardDataModule(cfg.data, *transforms(cfg)), ckpt_path=ckpt_path)
    return trainer


def evaluate(cfg: RunConfig, ckpt: str | Path, split: str = "test") -> dict[str, float]:
    """Evaluate the exported checkpoint `ckpt` on `split` of `cfg.data`; return the logged metrics."""
    model = checkpoint.load(ckpt)
    model_cfg = checkpoint.load_config(ckpt)
    model_cfg.data, model_cfg.trainer, model_cfg.run_dir, model_cfg.name = cfg.data, cfg.trainer, cfg.run_dir, cfg.name
    model_cfg.freeze, model_cfg.train = [], []
    task = build_task(model_cfg, model)
    trainer = build_trainer(model_cfg, monitor=False)
    dm = ShardDataModule(cfg.data, *transforms(model_cfg))
    run: Any = trainer.test if split == "test" else trainer.validate
    results = run(task, datamodule=dm, verbose=False)
    return {k: float(v) for k, v in results[0].items()} if results else {}
