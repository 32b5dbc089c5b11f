"""Feature maps of linear attention's q and k (by name, as the mixers' `feature_map` option gives them)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mmeff.ops import dispatch
from mmeff.ops.dispatch import exporting

__all__ = ["FEATURE_MAPS"]


def pointwise_unsupported(x: Tensor) -> str:
    """Why mmeff.kernels.pointwise cannot map `x`; "" when it can."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {x.dtype}"
    return dispatch.eager_triton_unsupported(x, "pointwise")


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
    """elu(x) + 1: on CUDA one Triton kernel each way (mmeff.kernels.pointwise), else the autograd function where a
    backward is recorded, the plain ops elsewhere (torch.export with dynamic shapes fails on an autograd function that
    saves a tensor of symbolic size)."""
    if dispatch.choose("elu_plus_one", "auto", [("triton", lambda: pointwise_unsupported(x))]) == "triton":
        kernels = dispatch.triton_kernels("pointwise")
        return kernels.Pointwise.apply(x, kernels.ELU_PLUS_ONE.value, 1.0, x.dtype)
    if exporting() or not (torch.is_grad_enabled() and x.requires_grad):
        return F.elu(x) + 1.0
    return _EluPlusOne.apply(x)


def at_least_fp32(x: Tensor) -> Tensor:
    """x in fp32, or in its own dtype where that is wider (fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _l2_with_norm(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x / max(||x||, eps) in x's dtype, ||x|| in fp32 at least) over the last dim."""
    xf = at_least_fp32(x)
    norm = xf.square().sum(-1, keepdim=True).sqrt()
    return (xf / norm.clamp_min(eps)).to(x.dtype), norm


class _L2Normalize(torch.autograd.Function):
    """x / max(||x||, eps) over the last dim, computed in fp32 (at least), returned in x's dtype. Its backward reads
    the output (which the recurrence keeps anyway) and the norms: dx = (dy - y <dy, y>) / n. F.normalize kept its
    input and intermediates besides: 6 of the 38 KiB per token and layer of a gated_deltanet-bi ViT
    (benchmarks/saved_memory.py)."""

    @staticmethod
    def forward(ctx, x: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        y, norm = _l2_with_norm(x, eps)
        ctx.save_for_backward(y, norm)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        y, norm = ctx.saved_tensors
        yf, dyf = at_least_fp32(y), at_least_fp32(dy)
        # below eps the divisor is the constant eps: no projection
        along = torch.where(norm > ctx.eps, (dyf * yf).sum(-1, keepdim=True), 0.0)
        return ((dyf - yf * along) / norm.clamp_min(ctx.eps)).to(dy.dtype), None


def _l2(x: Tensor, eps: float = 1e-12) -> Tensor:
    """x / max(||x||, eps) over the last dim: on CUDA mmeff.kernels.norm's L2Normalize, one kernel each way (the
    reference is seven elementwise and reduction launches forward and twelve backward, 456 of the 2,009 launches of
    a gated_deltanet LM step at T=4096 on the H200); elsewhere the autograd function where a backward is recorded (as
    _elu_plus_one)."""
    fast = [("triton", lambda: dispatch.eager_triton_unsupported(x, "norm", lambda k: k.unsupported(x, x.shape[-1])))]
    if dispatch.choose("l2_normalize", "auto", fast) == "triton":
        return dispatch.triton_kernels("norm").L2Normalize.apply(x, eps)
    if exporting() or not (torch.is_grad_enabled() and x.requires_grad):
        return _l2_with_norm(x, eps)[0]
    return _L2Normalize.apply(x, eps)


FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "elu": _elu_plus_one,
    "relu": F.relu,
    "silu": F.silu,
    "l2": _l2,
}
