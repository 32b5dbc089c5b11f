"""Causal depthwise short convolution over [B, T, C] (H3, Mamba and DeltaNet's short conv), with its activation.

On CUDA (without a decoding state) it runs mmeff.kernels.conv: PyTorch's depthwise F.conv1d reaches about 6% of
an H100's memory bandwidth at thousands of channels over long sequences (benchmarks/short_conv.py;
pytorch/pytorch#192902). Elsewhere, or with MMEFF_FORCE_REFERENCE=1, the F.conv1d reference below.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mmeff.ops.fastpath import cuda_fast_path

Activation = Literal["silu", "identity"]


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    activation: Activation = "silu",
    prev: Optional[Tensor] = None,
) -> Tensor:
    """act(bias[c] + sum_j weight[c, j] x[t - W + 1 + j, c]) for x [B, T, C], weight [C, W]: each output reads
    its own and the W - 1 previous steps, taken from `prev` [B, C, W - 1] (the steps before x) or zeros."""
    if activation not in ("silu", "identity"):
        raise ValueError(f"activation must be 'silu' or 'identity', got {activation!r}")
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"x must be [B, T, C] and weight [C, W], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if prev is not None and prev.shape != (x.shape[0], x.shape[2], weight.shape[1] - 1):
        raise ValueError(
            f"prev must be [B, C, W - 1] = {(x.shape[0], x.shape[2], weight.shape[1] - 1)}, got {tuple(prev.shape)}"
        )
    if prev is None and x.numel() and cuda_fast_path(x):
        from mmeff.kernels.conv import CausalConv

        return CausalConv.apply(x, weight, bias, activation == "silu")
    return causal_conv1d_reference(x, weight, bias, activation, prev)


def with_history(x: Tensor, prev: Optional[Tensor], width: int) -> Tensor:
    """x [B, T, C] as [B, C, width + T]: the `width` steps before it (`prev`, or zeros) followed by x."""
    xt = x.transpose(1, 2)
    return F.pad(xt, (width, 0)) if prev is None else torch.cat([prev.to(xt.dtype), xt], dim=-1)


def causal_conv1d_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Activation,
                            prev: Optional[Tensor] = None) -> Tensor:  # fmt: skip
    """causal_conv1d through F.conv1d, in x's dtype (weight and bias are cast to it, as autocast would)."""
    b = None if bias is None else bias.to(x.dtype)
    y = F.conv1d(with_history(x, prev, weight.shape[1] - 1), weight.to(x.dtype).unsqueeze(1), b, groups=x.shape[-1])
    return (F.silu(y) if activation == "silu" else y).transpose(1, 2)
