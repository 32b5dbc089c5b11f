"""Modality tokenizers: raw sample -> tensors (`make_transform`) -> tokens [B, T, D] (`build`)."""

from __future__ import annotations

import importlib
from typing import Any, Callable

from torch import nn

_MODULES = {"image": "mmeff.encoders.image", "audio": "mmeff.encoders.audio", "text": "mmeff.encoders.text"}


def _module(name: str) -> Any:
    return importlib.import_module(_MODULES[name])


def build(cfg: Any, dim: int) -> nn.Module:
    """The tokenizer module of encoder config `cfg`, producing tokens of width `dim`."""
    return _module(cfg.name).build(cfg, dim)


def make_transform(cfg: Any, train: bool) -> Callable[[dict], Any]:
    """Per-sample preprocessing of encoder config `cfg` (raw shard sample -> input tensor)."""
    return _module(cfg.name).make_transform(cfg, train)


for _name in _MODULES:  # register each encoder's config section
    try:
        _module(_name)
    except ModuleNotFoundError as e:
        if e.name != _MODULES[_name]:
            raise
