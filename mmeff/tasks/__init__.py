"""Task heads and LightningModules, chosen by `task.name`."""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

_MODULES = {
    "classify": "mmeff.tasks.classify",
    "lm": "mmeff.tasks.lm",
    "caption": "mmeff.tasks.caption",
    "diffusion": "mmeff.tasks.diffusion",
    "diffusion_caption": "mmeff.tasks.diffusion_caption",
}


def _module(name: str) -> Any:
    return importlib.import_module(_MODULES[name])


def build_model(cfg: Any) -> nn.Module:
    """The plain `nn.Module` (encoder + backbone + head) of run config `cfg`."""
    return _module(cfg.task.name).build_model(cfg)


def build_task(cfg: Any, model: nn.Module | None = None) -> Any:
    """The LightningModule training `model` (built from `cfg` when not given)."""
    return _module(cfg.task.name).Task(cfg, model if model is not None else build_model(cfg))


def transforms(cfg: Any) -> tuple[Any, Any]:
    """(train, eval) per-sample transforms of run config `cfg`."""
    mod = _module(cfg.task.name)
    return mod.make_transform(cfg, True), mod.make_transform(cfg, False)


for _name in _MODULES:  # register each task's config section
    try:
        _module(_name)
    except ModuleNotFoundError as e:
        if e.name != _MODULES[_name]:
            raise
