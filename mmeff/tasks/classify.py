"""Classification: modality tokens -> backbone -> pooled vector -> linear head; cross-entropy and accuracy, or
(multi-label) binary cross-entropy with exact-set accuracy and mAP."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmeff import encoders, metrics
from mmeff.backbone import Backbone
from mmeff.config import TASKS, ConfigError, RunConfig
from mmeff.hub import Model
from mmeff.tasks.base import TaskModule


@TASKS.register("classify")
@dataclass
class ClassifyConfig:
    """Classification head options; `label_key` is the label field of the shard samples: an integer, or with
    `multilabel` a multi-hot .npy vector of `num_classes` (e.g. digit-canvas's `labels.npy`)."""

    name: str = "classify"
    num_classes: int = 10
    label_key: str = "cls"
    multilabel: bool = False  # any number of classes per sample: sigmoid outputs, binary cross-entropy
    label_smoothing: float = 0.0
    head_dropout: float = 0.0
    mixup_alpha: float = 0.0  # > 0: mix pairs of training samples and their labels (Zhang et al., 2018)

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ConfigError(f"task.num_classes: got {self.num_classes}; expected an integer >= 1")
        if self.multilabel and self.label_smoothing:
            raise ConfigError("task.label_smoothing is for single-label cross-entropy; set it to 0 with task.multilabel: true")


class Classifier(Model):
    """Encoder + shared backbone (bidirectional or causal) + pooled linear head."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__()
        dim = cfg.backbone.dim
        self.encoder = encoders.build(cfg.encoder, dim)
        self.backbone = Backbone(cfg.backbone)
        self.head = nn.Sequential(nn.Dropout(cfg.task.head_dropout), nn.Linear(dim, cfg.task.num_classes))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.pool(self.backbone(self.encoder(inputs))))


def multi_hot(data: bytes, num_classes: int, key: str) -> torch.Tensor:
    """The float [num_classes] 0/1 vector stored as .npy bytes in field `key`; ValueError naming the field otherwise."""
    try:
        hot = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"field {key!r} is not a .npy multi-hot vector: {e}") from None
    if hot.shape != (num_classes,) or not np.isin(hot, (0, 1)).all():
        raise ValueError(f"field {key!r}: expected a 0/1 vector of {num_classes} classes, got {hot.dtype} {hot.shape}")
    return torch.from_numpy(hot.astype(np.float32))


class ClassifyTransform:
    """Raw sample -> {'input': encoder input, 'label': int, or a multi-hot float vector with `multilabel`}."""

    def __init__(self, cfg: RunConfig, train: bool) -> None:
        self.input = encoders.make_transform(cfg.encoder, train)
        self.label_key, self.multilabel, self.num_classes = cfg.task.label_key, cfg.task.multilabel, cfg.task.num_classes

    def __call__(self, sample: dict) -> dict[str, Any]:
        data = sample[self.label_key]
        label = multi_hot(data, self.num_classes, self.label_key) if self.multilabel else int(data)
        if not self.multilabel and not 0 <= label < self.num_classes:
            raise ValueError(f"label {self.label_key!r} is {label}, outside the {self.num_classes} classes (0-{self.num_classes - 1})")
        return {"input": self.input(sample), "label": label}


def build_model(cfg: RunConfig) -> Classifier:
    """The classifier of run config `cfg`."""
    return Classifier(cfg)


def make_transform(cfg: RunConfig, train: bool) -> ClassifyTransform:
    """Per-sample transform for classification."""
    return ClassifyTransform(cfg, train)


class Task(TaskModule):
    """Cross-entropy training with accuracy on val/test; multi-label: binary cross-entropy, exact-set accuracy and mAP."""

    def cuda_graphs_refusal(self) -> str | None:
        return None  # `step` calls the model on its one input tensor through `run_model`

    def __init__(self, cfg: RunConfig, model: nn.Module) -> None:
        super().__init__(cfg, model)
        if cfg.task.multilabel:  # epoch-level metrics (mAP ranks the whole split), synced across ranks by torchmetrics
            self.scores = nn.ModuleDict({s: metrics.multilabel(cfg.task.num_classes).clone(prefix=f"{s}/") for s in ("val", "test")})

    def step(self, batch: dict, stage: str) -> torch.Tensor:
        labels, multilabel = batch["label"], self.cfg.task.multilabel
        target = labels.float() if multilabel else F.one_hot(labels, self.cfg.task.num_classes).float()
        inputs = batch["input"]
        alpha = self.cfg.task.mixup_alpha
        if stage == "train" and alpha > 0:
            lam = float(torch.distributions.Beta(alpha, alpha).sample())
            perm = torch.randperm(inputs.shape[0], device=inputs.device)
            inputs, target = lam * inputs + (1 - lam) * inputs[perm], lam * target + (1 - lam) * target[perm]
        logits = self.run_model(inputs)
        n, on_step = 0 if self.padding(batch) else labels.shape[0], stage == "train"
        if multilabel:
            loss = F.binary_cross_entropy_with_logits(logits, target)
        else:
            smoothing = self.cfg.task.label_smoothing if stage == "train" else 0.0
            loss = F.cross_entropy(logits, target, label_smoothing=smoothing)
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=True, batch_size=n, sync_dist=not on_step)
        if not multilabel:
            acc = (logits.argmax(-1) == labels).float().mean()
            self.log(f"{stage}/acc", acc, prog_bar=True, on_step=on_step, on_epoch=True, batch_size=n, sync_dist=not on_step)
        elif stage in self.scores:
            self.scores[stage].update(torch.sigmoid(logits.float())[:n], labels[:n].int())
            self.log_dict(self.scores[stage], prog_bar=True, on_step=False, on_epoch=True, batch_size=n)
        else:  # training: this batch's exact-set accuracy
            exact = ((logits > 0) == (labels > 0.5)).all(-1).float().mean()
            self.log(f"{stage}/exact", exact, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        return loss
