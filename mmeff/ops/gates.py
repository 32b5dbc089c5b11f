"""Per-token gates of the recurrent mixers, with backwards that keep only what the recurrence keeps anyway."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mmeff.ops import dispatch
from mmeff.ops.dispatch import exporting
from mmeff.ops.features import at_least_fp32, pointwise_unsupported

__all__ = ["log_sigmoid_gate", "scaled_sigmoid", "softplus_decay"]


class _LogSigmoidGate(torch.autograd.Function):
    """logsigmoid(x) / n in fp32 (or x's wider dtype). Its backward reads only the output, which the recurrence keeps
    for its own backward: d/dx = (1 - sigmoid(x)) / n = -expm1(n y) / n. Autograd's logsigmoid and division kept an
    fp32 copy of x and logsigmoid's buffer besides (1.5 of the 16.9 KiB per token and layer of a gla-bi ViT,
    benchmarks/saved_memory.py)."""

    @staticmethod
    def forward(ctx, x: Tensor, normalizer: float) -> Tensor:  # type: ignore[override]
        y = F.logsigmoid(at_least_fp32(x)) / normalizer
        ctx.save_for_backward(y)
        ctx.normalizer, ctx.dtype = normalizer, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return (dy * -torch.expm1(y * ctx.normalizer) / ctx.normalizer).to(ctx.dtype), None


def log_sigmoid_gate(x: Tensor, normalizer: float = 1.0) -> Tensor:
    """logsigmoid(x) / normalizer in fp32 (GLA's log decay): on CUDA one Triton kernel each way
    (mmeff.kernels.pointwise), else the autograd function where a backward is recorded, the plain ops elsewhere
    (torch.export with dynamic shapes fails on an autograd function that saves a tensor)."""
    out = torch.promote_types(x.dtype, torch.float32)
    fast = [("triton", lambda: pointwise_unsupported(x))] if out == torch.float32 else []
    if dispatch.choose("log_sigmoid_gate", "auto", fast) == "triton":
        kernels = dispatch.triton_kernels("pointwise")
        return kernels.Pointwise.apply(x, kernels.LOG_SIGMOID.value, normalizer, out)
    if exporting() or not (torch.is_grad_enabled() and x.requires_grad):
        return F.logsigmoid(at_least_fp32(x)) / normalizer
    return _LogSigmoidGate.apply(x, normalizer)


def scaled_sigmoid(x: Tensor, scale: float = 1.0) -> Tensor:
    """scale * sigmoid(x) in fp32 (the delta rule's write strength beta): on CUDA one Triton kernel each way
    (mmeff.kernels.pointwise, the backward from the output, which the recurrence keeps), else the plain ops."""
    out = torch.promote_types(x.dtype, torch.float32)
    fast = [("triton", lambda: pointwise_unsupported(x))] if out == torch.float32 else []
    if dispatch.choose("scaled_sigmoid", "auto", fast) == "triton":
        kernels = dispatch.triton_kernels("pointwise")
        return kernels.Pointwise.apply(x, kernels.SIGMOID.value, scale, out)
    return scale * torch.sigmoid(at_least_fp32(x))


def softplus_decay(
    x: Tensor, bias: Optional[Tensor], A: Tensor, limit: tuple[float, float] = (0.0, math.inf), softplus: bool = True,
    A_log: bool = False,
) -> tuple[Tensor, Tensor]:
    """(dt, A * dt) in fp32 (or wider) with dt = clamp(softplus(x + bias), *limit): Mamba's time step and log decay
    per head, x [..., H], bias and A [H] (Mamba-2's SSD, Gated DeltaNet's decay); `A_log`: A is given as Mamba's
    A_log, A = -exp(A_log). On CUDA one Triton kernel each way (mmeff.kernels.pointwise.Decay), where PyTorch
    launched 5 forward and 10 backward (and 2 and 2 for A from A_log); else the plain ops."""
    if A.shape != x.shape[-1:] or (bias is not None and bias.shape != A.shape):
        raise ValueError(f"A {tuple(A.shape)} and bias {None if bias is None else tuple(bias.shape)} must be [H] of "
                         f"x {tuple(x.shape)}")  # fmt: skip
    clamp = not (softplus and limit == (0.0, math.inf))  # softplus never leaves [0, inf)
    fast = [("triton", lambda: pointwise_unsupported(x) or ("A not fp32" if A.dtype != torch.float32 else ""))]
    if dispatch.choose("softplus_decay", "auto", fast) == "triton":
        return dispatch.triton_kernels("pointwise").Decay.apply(x, bias, A, *limit, softplus, clamp, A_log)
    if A_log:
        A = -A.exp()
    dt = at_least_fp32(x)
    if bias is not None:
        dt = dt + at_least_fp32(bias)
    if softplus:
        dt = F.softplus(dt)  # threshold 20, as mamba-ssm's kernel
    if clamp:
        dt = dt.clamp(min=limit[0], max=limit[1])
    return dt, dt * at_least_fp32(A)
