"""Causal depthwise short convolution over [B, T, C] (H3, Mamba and DeltaNet's short conv), with its activation.

backend (mmeff.ops.dispatch) "triton" runs mmeff.kernels.conv (CUDA, no decoding state): PyTorch's depthwise
F.conv1d reaches about 6% of an H100's memory bandwidth at thousands of channels over long sequences
(benchmarks/short_conv.py; pytorch/pytorch#192902). "torch" runs the F.conv1d reference below; "auto" the
kernel where it covers the call. With `docs`, no output reads a token of another document.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mmeff.ops import dispatch
from mmeff.ops.dispatch import Backend
from mmeff.ops.varlen import doc_runs

Activation = Literal["silu", "identity"]


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    activation: Activation = "silu",
    prev: Optional[Tensor] = None,
    *,
    docs: Optional[Tensor] = None,
    backend: Backend = "auto",
) -> Tensor:
    """act(bias[c] + sum_j weight[c, j] x[t - W + 1 + j, c]) for x [B, T, C], weight [C, W]: each output reads
    its own and the W - 1 previous steps, taken from `prev` [B, C, W - 1] (the steps before x) or zeros.
    `docs` [B, T] (document id per token, see mmeff.ops.varlen): a step of another document reads as zero;
    `prev` continues each row's first document."""
    if activation not in ("silu", "identity"):
        raise ValueError(f"activation must be 'silu' or 'identity', got {activation!r}")
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"x must be [B, T, C] and weight [C, W], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if prev is not None and prev.shape != (x.shape[0], x.shape[2], weight.shape[1] - 1):
        raise ValueError(
            f"prev must be [B, C, W - 1] = {(x.shape[0], x.shape[2], weight.shape[1] - 1)}, got {tuple(prev.shape)}"
        )
    if docs is not None and docs.shape != x.shape[:2]:
        raise ValueError(f"docs must be [B, T] = {tuple(x.shape[:2])}, got {tuple(docs.shape)}")
    runs = None if docs is None else doc_runs(docs)

    def triton() -> str:
        if prev is not None:
            return "a decoding state (prev)"
        if not x.numel():
            return "empty input"
        return dispatch.triton_unsupported(x, "conv", lambda conv: conv.unsupported(x, weight))

    if dispatch.choose("causal_conv1d", backend, [("triton", triton)]) == "triton":
        return dispatch.triton_kernels("conv").CausalConv.apply(x, weight, bias, activation == "silu", runs)
    return causal_conv1d_reference(x, weight, bias, activation, prev, runs)


def with_history(x: Tensor, prev: Optional[Tensor], width: int) -> Tensor:
    """x [B, T, C] as [B, C, width + T]: the `width` steps before it (`prev`, or zeros) followed by x."""
    xt = x.transpose(1, 2)
    return F.pad(xt, (width, 0)) if prev is None else torch.cat([prev.to(xt.dtype), xt], dim=-1)


def causal_conv1d_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Activation,
                            prev: Optional[Tensor] = None, runs: Optional[Tensor] = None) -> Tensor:  # fmt: skip
    """causal_conv1d through F.conv1d, in x's dtype (weight and bias are cast to it, as autocast would); with
    `runs` (mmeff.ops.varlen.doc_runs of the documents) tap by tap, each masked to the output's document."""
    width = weight.shape[1]
    b = None if bias is None else bias.to(x.dtype)
    history = with_history(x, prev, width - 1)
    if runs is None:
        y = F.conv1d(history, weight.to(x.dtype).unsqueeze(1), b, groups=x.shape[-1])
    else:
        seqlen = x.shape[1]
        runs = F.pad(runs, (width - 1, 0))  # the history continues the first document
        own = runs[:, None, width - 1 :]
        taps = (weight[:, j, None].to(x.dtype) * history[..., j : j + seqlen] * (runs[:, None, j : j + seqlen] == own)
                for j in range(width))  # fmt: skip
        y = sum(taps)
        y = y if b is None else y + b[:, None]
    return (F.silu(y) if activation == "silu" else y).transpose(1, 2)
