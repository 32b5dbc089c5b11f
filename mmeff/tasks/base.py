"""What every task's LightningModule shares: optimizer, schedule, parameter groups, data counters."""

from __future__ import annotations

import fnmatch
import math
from typing import Any

import lightning as L
import torch
from torch import nn

from mmeff.config import ConfigError, RunConfig
from mmeff.tasks.graphs import GraphedTraining


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def set_trainable(model: nn.Module, freeze: list[str], train: list[str]) -> None:
    """Freeze parameters matching `freeze`; if `train` is set, only parameters matching it train."""
    for pattern in freeze + train:
        if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in model.named_parameters()):
            raise ConfigError(f"freeze/train pattern {pattern!r} matches no parameter of the model")
    for name, p in model.named_parameters():
        p.requires_grad_((not train or _matches(name, train)) and not _matches(name, freeze))


def _no_decay(name: str, p: nn.Parameter) -> bool:
    return p.dim() < 2 or name.endswith((".pos", ".cls")) or "norm" in name.split(".")[-2:][0]


def param_groups(model: nn.Module, cfg: RunConfig) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases/norms/embeddings of position, per-pattern lr multipliers."""
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mult = next((m for pat, m in cfg.optim.groups.items() if fnmatch.fnmatchcase(name, pat)), 1.0)
        groups.setdefault((mult, _no_decay(name, p)), []).append(p)
    return [
        {"params": ps, "lr": cfg.optim.lr * mult, "weight_decay": 0.0 if nd else cfg.optim.weight_decay}
        for (mult, nd), ps in groups.items()
    ]


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to `min_ratio` at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class TaskModule(L.LightningModule):
    """Base LightningModule: owns the model, the optimizer and schedule, and logs skipped samples."""

    def __init__(self, cfg: RunConfig, model: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.skipped = 0
        self.bar_values: dict[str, torch.Tensor] = {}  # training values for the progress bar, on the device
        # The gradients' total 2-norm that mmeff.trainer.NonFiniteLoss took this step, with the ids of the gradients
        # it covers: clipping scales by it instead of taking it again (one foreach norm and its stack a step less).
        self.step_grad_norm: tuple[torch.Tensor, frozenset[int]] | None = None
        set_trainable(model, cfg.freeze, cfg.train)
        refusal = self.cuda_graphs_refusal() if cfg.trainer.cuda_graphs else None
        if refusal:
            raise ConfigError(f"trainer.cuda_graphs: true {refusal}")
        self._graphed = GraphedTraining(model) if cfg.trainer.cuda_graphs else None

    def cuda_graphs_refusal(self) -> str | None:
        """Why this task's training step cannot replay as CUDA graphs (trainer.cuda_graphs), or None when its `step`
        calls the model through `run_model` on tensors of one shape alone."""
        return (f"is for the classify task and the lm task with task.documents: joined (a model called on its "
                f"input tensors alone), not {self.cfg.task.name!r}")  # fmt: skip

    def log(self, name: str, value: Any, *args: Any, prog_bar: bool = False, **kwargs: Any) -> None:
        """Lightning's `log`, except that a training tensor goes to the progress bar through `bar_values`: Lightning
        reads every progress-bar value from the device after each step, a wait that empties the device's queue;
        mmeff.trainer.ProgressBar reads these only when it redraws."""
        trainer = self._trainer
        if prog_bar and trainer is not None and trainer.training and isinstance(value, torch.Tensor):
            self.bar_values[name] = value.detach()
            prog_bar = False
        super().log(name, value, *args, prog_bar=prog_bar, **kwargs)

    def configure_model(self) -> None:
        """Lightning's hook for sharding: a strategy with a `shard` method (mmeff.strategies.FSDP) shards the model."""
        shard = getattr(self.trainer.strategy, "shard", None)
        if shard is not None:
            shard(self.model)

    def run_model(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The model on `inputs`; in training with trainer.cuda_graphs, as a CUDA-graph replay (mmeff.tasks.graphs)."""
        return self.model(*inputs) if self._graphed is None else self._graphed(*inputs)

    def step(self, batch: dict, stage: str) -> torch.Tensor:
        """The task's loss on `batch`, logging its metrics under `stage/`; each task defines it."""
        raise NotImplementedError

    @staticmethod
    def padding(batch: dict) -> bool:
        """Whether `batch` is an eval batch repeated only so that every rank takes each step (flagged `_pad` by
        mmeff.data.pipeline: a sharded model needs all ranks in each forward): its forward runs, but its samples count
        in no metric or logged loss (logged with weight 0, torchmetrics updated with nothing, so that every rank
        logs and syncs the same metrics)."""
        return bool(batch.get("_pad", False))

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the `aux_loss` tensors blocks left on themselves in the last forward (e.g. MoE balancing)."""
        losses = [m.aux_loss for m in self.model.modules() if getattr(m, "aux_loss", None) is not None]
        return torch.stack(losses).sum() if losses else None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.skipped += int(torch.as_tensor(batch.get("_skipped", 0)).sum())
        # A host tensor: Lightning copies a Python number to the device, which waits for the device every step.
        self.log("data/skipped", torch.tensor(float(self.skipped)), reduce_fx="max")
        loss = self.step(batch, "train")
        aux = self.aux_loss()
        if aux is not None:
            self.log("train/aux_loss", aux, on_step=True)
            loss = loss + aux
        if batch_idx % self.cfg.trainer.log_every_n_steps == 0:
            self.log_block_stats()
        return loss

    def log_block_stats(self) -> None:
        """Log `stats()` of every block that has one (expert load, router entropy, ...) under `blocks/`."""
        for name, m in self.model.named_modules():
            stats = getattr(m, "stats", None)
            if callable(stats):
                for key, value in stats().items():
                    self.log(f"blocks/{name}/{key}", float(value), on_step=True, on_epoch=False)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.step(batch, "test")

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Clip as Lightning does, also for a fused AdamW under bf16-mixed: Lightning's mixed-precision plugin refuses
        any optimizer that unscales inside its step, which matters only with fp16's loss scaler; without a scaler
        (bf16, fp32) the gradients are already unscaled, so they are clipped here directly."""
        if not gradient_clip_val or getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        taken, self.step_grad_norm = self.step_grad_norm, None
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        elif taken is not None and taken[1] == frozenset(id(p.grad) for p in params if p.grad is not None):
            torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, taken[0])
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def configure_optimizers(self) -> Any:
        o = self.cfg.optim
        opt = torch.optim.AdamW(param_groups(self.model, self.cfg), lr=o.lr, betas=tuple(o.betas), fused=o.fused)
        if o.schedule == "constant":
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(o.warmup_steps, total // 2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, total, o.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
