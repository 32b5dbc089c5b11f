"""Short causal depthwise convolution with a fixed-size decoding state, shared by the linear and SSM mixers."""

from __future__ import annotations

import contextlib
import functools
from typing import ContextManager

import torch
from torch import nn

from mmeff.blocks.cache import Cache
from mmeff.ops.conv import causal_conv1d, with_history
from mmeff.ops.recompute import recomputed, under_autocast_now
from mmeff.ops.varlen import seq_idx_from_cu_seqlens

_ACTIVATIONS = {"silu": "silu", "swish": "silu", "identity": "identity"}


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

    def forward(
        self, x: torch.Tensor, cache: Cache | None = None, key: str = "conv", cu_seqlens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [B, T, C] -> [B, T, C]; reads and updates `cache[key]` when a cache is given; taps never cross the
        document boundaries `cu_seqlens` (int32 [N+1] over the flattened tokens)."""
        prev = cache.get(key) if cache is not None else None
        if cache is not None:
            full = with_history(x, prev, self.kernel_size - 1)
            cache[key] = full[..., x.shape[1] :].clone()  # the last kernel_size - 1 steps; a copy: do not pin `full`
        docs = None if cu_seqlens is None else seq_idx_from_cu_seqlens(cu_seqlens, x.shape[0] * x.shape[1]).view(x.shape[:2])
        return causal_conv1d(x, self.conv.weight.squeeze(1), self.conv.bias, self.activation, prev, docs=docs)

    def made_again(
        self, x: torch.Tensor, cache: Cache | None = None, cu_seqlens: torch.Tensor | None = None, keep_view: bool = False
    ) -> tuple[torch.Tensor, ContextManager[None]]:
        """(the output of x, a context for what reads it): inside the context a saved view of the output is kept as x,
        which the conv keeps for its own backward anyway, and the backward makes the output again (one conv pass).
        `keep_view`: x, a view of a wider tensor the backward keeps anyway, is kept as it is rather than copied."""
        if cache is not None:  # decoding: no backward
            return self(x, cache, cu_seqlens=cu_seqlens), contextlib.nullcontext()
        # Contiguous, the recipe's input is the very tensor the conv keeps, nothing more; a view would keep its whole
        # base (Mamba-2's in_proj output, z and dt included), unless that is kept anyway (`keep_view`).
        x = x if keep_view else x.contiguous()
        out = self(x, cu_seqlens=cu_seqlens)
        again = under_autocast_now(functools.partial(self, cu_seqlens=cu_seqlens), x.device.type)
        return out, recomputed([(out, again, (x,))])
