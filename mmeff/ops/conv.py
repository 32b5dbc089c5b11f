"""Depthwise convolutions over tokens [B, T, C]: the causal short conv along T (H3, Mamba and DeltaNet's, with its
activation) and the k x k conv over an image's token grid (linear attention's local term).

backend (mmeff.ops.dispatch) "triton" runs mmeff.kernels.conv / mmeff.kernels.conv2d (CUDA, no decoding state):
PyTorch's depthwise F.conv1d reaches about 6% of an H100's memory bandwidth at thousands of channels over long
sequences (benchmarks/short_conv.py; pytorch/pytorch#192902). The grid conv's kernel reads the tokens where they
lie, channels last, and runs as a custom op under torch.compile; timed alone on the H200 it is ahead of PyTorch's
depthwise Conv2d (cuDNN) only at 512 px of the ViT-S shapes (benchmarks/results/vision_ops_h200.md), and
`benchmarks/vision_speed.py --backend depthwise_conv2d=torch` compares the two inside the step. "torch" runs the F.conv1d / F.conv2d
references below; "auto" the kernel where it covers the call. With `docs`, no output reads a token of another document.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mmeff.ops import dispatch
from mmeff.ops.custom_ops import causal_conv_op, grid_conv_op
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
        if torch.compiler.is_compiling():  # no graph break on the kernels
            return causal_conv_op(x, weight, bias, activation == "silu", runs)
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


def depthwise_conv2d(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], grid: tuple[int, int], *, backend: Backend = "auto"
) -> Tensor:
    """bias[c] + sum_{i, j} weight[c, i, j] x[pixel + (i - K // 2, j - K // 2), c] for x [B, H * W, C], the pixels
    of an H x W grid in row-major order (zero padding; K odd), weight [C, K, K]: a [B, H * W, C] tensor in x's dtype."""
    height, width = grid
    if x.dim() != 3 or x.shape[1] != height * width:
        raise ValueError(f"x must be [B, H * W, C] for the grid {height} x {width}, got {tuple(x.shape)}")
    if weight.dim() != 3 or weight.shape[0] != x.shape[-1] or weight.shape[1] != weight.shape[2] or weight.shape[1] % 2 == 0:
        raise ValueError(f"weight must be [C, K, K] with C = {x.shape[-1]} and K odd, got {tuple(weight.shape)}")

    def triton() -> str:
        if not x.numel():
            return "empty input"
        if dispatch.exporting():
            return "torch.export (ONNX has no lowering of the custom op)"
        return dispatch.triton_unsupported(x, "conv2d", lambda conv2d: conv2d.unsupported(x))

    if dispatch.choose("depthwise_conv2d", backend, [("triton", triton)]) == "triton":
        return grid_conv_op(x, weight, bias, height, width)
    return depthwise_conv2d_reference(x, weight, bias, grid)


def depthwise_conv2d_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], grid: tuple[int, int]) -> Tensor:
    """depthwise_conv2d through F.conv2d on x viewed channels-last, in x's dtype (weight and bias cast to it)."""
    batch, tokens, channels = x.shape
    image = x.reshape(batch, *grid, channels).permute(0, 3, 1, 2)
    k = weight.shape[-1]
    b = None if bias is None else bias.to(x.dtype)
    y = F.conv2d(image, weight.to(x.dtype).unsqueeze(1), b, padding=k // 2, groups=channels)
    return y.permute(0, 2, 3, 1).reshape(batch, tokens, channels)
