"""Feature maps of linear attention's q and k (by name, as the mixers' `feature_map` option gives them)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mmeff.ops.dispatch import exporting

__all__ = ["FEATURE_MAPS"]


class _EluPlusOne(torch.autograd.Function):
    """elu(x) + 1 with its own backward: torch.compile's traced `elu_backward` gets other strides than the eager
    kernel's, and a view after it failed at run time (tests/blocks/test_linear_mixers.py::test_compiled_mixer_...).
    The gradient from the output alone: 1 where x > 0 (y > 1), else e^x = y; so y.clamp(max=1)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        y = F.elu(x) + 1.0
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> Tensor:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return dy * y.clamp(max=1.0)


def _elu_plus_one(x: Tensor) -> Tensor:
    """elu(x) + 1: the autograd function where a backward is recorded, the plain ops elsewhere (torch.export with
    dynamic shapes fails on an autograd function that saves a tensor of symbolic size)."""
    if exporting() or not (torch.is_grad_enabled() and x.requires_grad):
        return F.elu(x) + 1.0
    return _EluPlusOne.apply(x)


FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "elu": _elu_plus_one,
    "relu": F.relu,
    "silu": F.silu,
    "l2": lambda x: F.normalize(x, dim=-1),
}
