"""Modality tokenizers: raw sample -> tensors (`make_transform`) -> tokens [B, T, D] (`build`).

An encoder is a module that registers its config class with `@ENCODERS.register(NAME)` (mmeff.config.ENCODERS,
whose table names the module) and provides what `EncoderContract` lists.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from mmeff.config import ENCODERS
from mmeff.registry import contract_module

if TYPE_CHECKING:
    from torch import nn


class EncoderContract(Protocol):
    """What an encoder module provides besides its registered config class."""

    def build(self, cfg: Any, dim: int) -> nn.Module:
        """The tokenizer module of encoder config `cfg`, producing tokens of width `dim`."""

    def make_transform(self, cfg: Any, train: bool) -> Callable[[dict], Any]:
        """Per-sample preprocessing (raw shard sample -> input tensor) for training or evaluation."""


def encoder_module(name: str) -> ModuleType:
    """The module of encoder `name`, checked against `EncoderContract`."""
    return contract_module(ENCODERS, name, EncoderContract, "encoder (mmeff.encoders.EncoderContract) for encoder.name")


def build(cfg: Any, dim: int) -> nn.Module:
    """The tokenizer module of encoder config `cfg`, producing tokens of width `dim`."""
    return encoder_module(cfg.name).build(cfg, dim)


def make_transform(cfg: Any, train: bool) -> Callable[[dict], Any]:
    """Per-sample preprocessing of encoder config `cfg` (raw shard sample -> input tensor)."""
    return encoder_module(cfg.name).make_transform(cfg, train)
