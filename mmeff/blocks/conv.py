"""Short causal depthwise convolution with a fixed-size decoding state, shared by the linear and SSM mixers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmeff.blocks.cache import Cache

_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "identity": lambda x: x}


class ShortConv(nn.Module):
    """Causal depthwise 1-D convolution over [B, T, C] (H3, Mamba and DeltaNet's short conv).

    Each output reads the current and the `kernel_size - 1` previous tokens. With a cache, the last
    `kernel_size - 1` inputs are kept in `cache[key]` ([B, C, kernel_size - 1]) so that prefill and
    step-by-step decoding match the full forward.
    """

    def __init__(self, channels: int, kernel_size: int = 4, bias: bool = True, activation: str = "silu") -> None:
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.kernel_size = kernel_size
        self.activation = _ACTIVATIONS[activation]
        # nn.Conv1d only holds the weight [C, 1, K] and bias and gives them PyTorch's default init.
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=bias)

    def forward(self, x: torch.Tensor, cache: Cache | None = None, key: str = "conv") -> torch.Tensor:
        """x [B, T, C] -> [B, T, C]; reads and updates `cache[key]` when a cache is given."""
        xt = x.transpose(1, 2)  # [B, C, T]
        width = self.kernel_size - 1
        prev = cache.get(key) if cache is not None else None
        full = F.pad(xt, (width, 0)) if prev is None else torch.cat([prev.to(xt.dtype), xt], dim=-1)
        if cache is not None:
            cache[key] = full[..., full.shape[-1] - width :].clone()  # a copy: do not pin `full`
        y = F.conv1d(full, self.conv.weight, self.conv.bias, groups=self.conv.groups)
        return self.activation(y).transpose(1, 2)
