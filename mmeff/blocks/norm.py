"""Normalisation layers."""

from __future__ import annotations

from torch import nn

from mmeff.blocks.registry import register


@register("rmsnorm", kind="norm")
class RMSNorm(nn.RMSNorm):
    """Root-mean-square norm with a learned scale (Zhang & Sennrich, 2019)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps=eps)


@register("layernorm", kind="norm")
class LayerNorm(nn.LayerNorm):
    """Layer norm with learned scale and bias (Ba et al., 2016)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps=eps)
