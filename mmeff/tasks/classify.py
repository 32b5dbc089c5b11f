"""Classification: modality tokens -> backbone -> pooled vector -> linear head; cross-entropy and accuracy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmeff import encoders
from mmeff.backbone import Backbone
from mmeff.config import TASKS, RunConfig
from mmeff.tasks.base import TaskModule


@TASKS.register("classify")
@dataclass
class ClassifyConfig:
    """Classification head options; `label_key` is the integer label field of the shard samples."""

    name: str = "classify"
    num_classes: int = 10
    label_key: str = "cls"
    label_smoothing: float = 0.0
    head_dropout: float = 0.0
    mixup_alpha: float = 0.0  # > 0: mix pairs of training samples and their labels (Zhang et al., 2018)


class Classifier(nn.Module):
    """Encoder + shared backbone (bidirectional or causal) + pooled linear head."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__()
        dim = cfg.backbone.dim
        self.encoder = encoders.build(cfg.encoder, dim)
        self.backbone = Backbone(cfg.backbone)
        self.head = nn.Sequential(nn.Dropout(cfg.task.head_dropout), nn.Linear(dim, cfg.task.num_classes))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.pool(self.backbone(self.encoder(inputs))))


class ClassifyTransform:
    """Raw sample -> {'input': encoder input, 'label': int}."""

    def __init__(self, cfg: RunConfig, train: bool) -> None:
        self.input = encoders.make_transform(cfg.encoder, train)
        self.label_key = cfg.task.label_key

    def __call__(self, sample: dict) -> dict[str, Any]:
        return {"input": self.input(sample), "label": int(sample[self.label_key])}


def build_model(cfg: RunConfig) -> Classifier:
    """The classifier of run config `cfg`."""
    return Classifier(cfg)


def make_transform(cfg: RunConfig, train: bool) -> ClassifyTransform:
    """Per-sample transform for classification."""
    return ClassifyTransform(cfg, train)


class Task(TaskModule):
    """Cross-entropy training with accuracy on val/test."""

    def step(self, batch: dict, stage: str) -> torch.Tensor:
        inputs, target = batch["input"], F.one_hot(batch["label"], self.cfg.task.num_classes).float()
        alpha = self.cfg.task.mixup_alpha
        if stage == "train" and alpha > 0:
            lam = float(torch.distributions.Beta(alpha, alpha).sample())
            perm = torch.randperm(inputs.shape[0], device=inputs.device)
            inputs, target = lam * inputs + (1 - lam) * inputs[perm], lam * target + (1 - lam) * target[perm]
        logits = self.model(inputs)
        smoothing = self.cfg.task.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(logits, target, label_smoothing=smoothing)
        acc = (logits.argmax(-1) == batch["label"]).float().mean()
        n = batch["label"].shape[0]
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=True, batch_size=n, sync_dist=not on_step)
        self.log(f"{stage}/acc", acc, prog_bar=True, on_step=on_step, on_epoch=True, batch_size=n, sync_dist=not on_step)
        return loss
