"""Channel mixers: MLP and SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmeff import ops
from mmeff.blocks.registry import register


def _hidden(dim: int, ratio: float, multiple: int) -> int:
    return int(-(-int(dim * ratio) // multiple) * multiple)


def _project(proj: nn.Module, a: torch.Tensor, kind: ops.mlp.Kind, up: torch.Tensor | None = None) -> torch.Tensor:
    """proj(act(a)) (GELU, or SiLU(a) * up), the activation's output recomputed in the backward when `proj` is a
    plain nn.Linear (a wrapped one, e.g. LoRA's, runs as itself)."""
    if type(proj) is nn.Linear:
        return ops.act_linear(a, proj.weight, proj.bias, kind, up)
    return proj(ops.mlp.activation(a, up, kind))


@register("mlp", kind="ffn")
class MLP(nn.Module):
    """Two-layer GELU MLP (Vaswani et al., 2017; ViT)."""

    def __init__(self, dim: int, ratio: float = 4.0, hidden: int | None = None, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        hidden = hidden or _hidden(dim, ratio, 8)
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop.p and self.training:
            return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))
        return _project(self.fc2, self.fc1(x), "gelu")


@register("swiglu", kind="ffn")
class SwiGLU(nn.Module):
    """Gated SiLU MLP (Shazeer, 2020 'GLU Variants Improve Transformer'), hidden = 2/3 * ratio * dim."""

    def __init__(self, dim: int, ratio: float = 4.0, hidden: int | None = None, dropout: float = 0.0, bias: bool = False) -> None:
        super().__init__()
        hidden = hidden or _hidden(dim, ratio * 2 / 3, 8)
        self.gate = nn.Linear(dim, hidden, bias=bias)
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(_project(self.down, self.gate(x), "swiglu", self.up(x)))
