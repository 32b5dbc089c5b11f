"""Normalisation layers: PyTorch's modules (their parameters and checkpoints), computed by `mmeff.ops.norm`."""

from __future__ import annotations

from torch import Tensor, nn

from mmeff import ops
from mmeff.blocks.registry import register


@register("rmsnorm", kind="norm")
class RMSNorm(nn.RMSNorm):
    """Root-mean-square norm with a learned scale (Zhang & Sennrich, 2019)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return ops.norm(x, self.weight, None, self.eps, "rms")

    def added(self, x: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
        """(x + r, this norm of it), one pass each way (`mmeff.ops.norm.add_norm`)."""
        return ops.add_norm(x, r, self.weight, None, self.eps, "rms")


@register("layernorm", kind="norm")
class LayerNorm(nn.LayerNorm):
    """Layer norm with learned scale and bias (Ba et al., 2016)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return ops.norm(x, self.weight, self.bias, self.eps, "layer")

    def added(self, x: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
        """(x + r, this norm of it), one pass each way (`mmeff.ops.norm.add_norm`)."""
        return ops.add_norm(x, r, self.weight, self.bias, self.eps, "layer")
