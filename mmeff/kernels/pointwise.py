"""Triton kernels of the pointwise maps on the recurrent mixers' inputs (mmeff.ops.gates and mmeff.ops.features):

    log-sigmoid gate   y = logsigmoid(x) / n     (fp32)         dx = dy * (1 - exp(n y)) / n   (x's dtype)
    elu + 1            y = elu(x) + 1            (x's dtype)    dx = dy * min(y, 1)            (dy's dtype)

Both backwards read the output only, which the recurrence keeps anyway. One kernel each way, over the flat elements;
PyTorch's are three launches forward and six backward for the gate, two and two for elu + 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmeff.kernels.utils import cdiv, empty

BLOCK = 2048
LOG_SIGMOID, ELU_PLUS_ONE = tl.constexpr(0), tl.constexpr(1)


@triton.jit
def _fwd_kernel(x, y, n, scale, MAP: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    v = tl.load(x + i, mask=inside, other=0.0).to(tl.float32)
    if MAP == LOG_SIGMOID:
        out = (tl.minimum(v, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(v)))) / scale
    else:
        out = tl.where(v > 0, v + 1.0, tl.exp(v))
    tl.store(y + i, out.to(y.dtype.element_ty), mask=inside)


@triton.jit
def _bwd_kernel(y, dy, dx, n, scale, MAP: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    v = tl.load(y + i, mask=inside, other=0.0).to(tl.float32)
    g = tl.load(dy + i, mask=inside, other=0.0).to(tl.float32)
    if MAP == LOG_SIGMOID:
        out = g * (1.0 - tl.exp(v * scale)) / scale
    else:
        out = g * tl.minimum(v, 1.0)
    tl.store(dx + i, out.to(dx.dtype.element_ty), mask=inside)


def _launch(kernel, *tensors: Tensor, n: int, scale: float, kind: int) -> None:
    if n:
        kernel[(cdiv(n, BLOCK),)](*tensors, n, scale, MAP=kind, BLOCK=BLOCK)


class Pointwise(torch.autograd.Function):
    """y = map(x) (`kind` LOG_SIGMOID with `scale` n, in `out_dtype`; or ELU_PLUS_ONE) and its gradient from y."""

    @staticmethod
    def forward(ctx, x: Tensor, kind: int, scale: float, out_dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        x = x.contiguous()
        y = empty(x.shape, out_dtype, x.device)
        _launch(_fwd_kernel, x, y, n=x.numel(), scale=scale, kind=kind)
        ctx.save_for_backward(y)
        ctx.kind, ctx.scale, ctx.x_dtype = kind, scale, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        (y,) = ctx.saved_tensors
        dy = dy.contiguous()
        dx = empty(y.shape, ctx.x_dtype if ctx.kind == LOG_SIGMOID.value else dy.dtype, y.device)
        _launch(_bwd_kernel, y, dy, dx, n=y.numel(), scale=ctx.scale, kind=ctx.kind)
        return dx, None, None, None
