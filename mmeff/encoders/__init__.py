"""Modality tokenizers: raw sample -> tensors (`make_transform`) -> tokens [B, T, D] (`build`).

An encoder is a module that registers its config class with `@ENCODERS.register(NAME)` (mmeff.config.ENCODERS,
whose table names the module) and provides what `EncoderContract` lists.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from mmeff.config import ENCODERS
from mmeff.registry import check_contract

if TYPE_CHECKING:
    from torch import nn


class EncoderContract(Protocol):
    """What an encoder module provides besides its registered config class."""

    def build(self, cfg: Any, dim: int) -> nn.Module:
        """The tokenizer module of encoder config `cfg`, producing tokens of width `dim`."""

    def make_transform(self, cfg: Any, train: bool) -> Callable[[dict], Any]:
        """Per-sample preprocessing (raw shard sample -> input tensor) for training or evaluation."""


_checked: dict[str, ModuleType] = {}


def encoder_module(name: str) -> ModuleType:
    """The module of encoder `name`, checked against `EncoderContract`."""
    if name not in _checked:
        module = sys.modules[ENCODERS.get(name).__module__]
        _checked[name] = check_contract(module, EncoderContract, f"encoder (mmeff.encoders.EncoderContract) for encoder.name {name!r}")
    return _checked[name]


def build(cfg: Any, dim: int) -> nn.Module:
    """The tokenizer module of encoder config `cfg`, producing tokens of width `dim`."""
    return encoder_module(cfg.name).build(cfg, dim)


def make_transform(cfg: Any, train: bool) -> Callable[[dict], Any]:
    """Per-sample preprocessing of encoder config `cfg` (raw shard sample -> input tensor)."""
    return encoder_module(cfg.name).make_transform(cfg, train)
