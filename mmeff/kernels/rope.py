"""Triton kernel of the rotary position embedding (mmeff.ops.rope's reference semantics).

    y = [x1 * cos - x2 * sin, x1 * sin + x2 * cos]    (x1, x2: the first and second halves of x's last dim)

x [B, T, H, D] is read through its strides (a view of a gathered or fused stream is not copied; one whose last dim
is not contiguous is), cos and sin [B, T, D/2] (broadcast over H, stride 0 where shared over B) in fp32, and y
written contiguous in the dtype asked for. The backward is the same kernel rotating the output gradient by the negative
angle; the angles come from integer positions and get no gradient, so only they are kept for the backward.
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from mmeff.kernels.launch import jit
from mmeff.kernels.utils import cdiv, empty, last_dim_contiguous, next_pow2

TILE = 2048  # (row, pair) elements of one program: a few (b, t) rows, all their H * D/2 pairs where they fit
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@jit
def _rope_kernel(x, cos, sin, y, rows, T, H, sxb, sxt, sxh, scb, sct, HALF: tl.constexpr, INVERSE: tl.constexpr,
                 BR: tl.constexpr, BP: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    pair = tl.program_id(1) * BP + tl.arange(0, BP)
    h, d = (pair // HALF).to(tl.int64), pair % HALF
    inside = (row < rows)[:, None] & (pair < H * HALF)[None, :]
    b, t = row // T, row % T
    angle = (b * scb + t * sct)[:, None] + d[None, :]
    c = tl.load(cos + angle, mask=inside, other=0.0)
    s = tl.load(sin + angle, mask=inside, other=0.0)
    if INVERSE:
        s = -s
    src = (b * sxb + t * sxt)[:, None] + (h * sxh + d)[None, :]
    x1 = tl.load(x + src, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(x + src + HALF, mask=inside, other=0.0).to(tl.float32)
    dst = row[:, None] * (2 * HALF * H) + (h * 2 * HALF + d)[None, :]
    tl.store(y + dst, (x1 * c - x2 * s).to(y.dtype.element_ty), mask=inside)
    tl.store(y + dst + HALF, (x1 * s + x2 * c).to(y.dtype.element_ty), mask=inside)


def unsupported(x: Tensor, cos: Tensor, sin: Tensor) -> str:
    """Why the kernel cannot rotate `x` by `cos`, `sin`; "" when it can."""
    if x.dim() != 4 or x.shape[-1] % 2:
        return f"x {tuple(x.shape)} is not [B, T, H, D] with D even"
    B, T, _, D = x.shape
    if cos.shape != sin.shape:
        return f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ in shape"
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != torch.float32:
            return f"{name} is {t.dtype}, not float32"
        if t.dim() not in (2, 3) or t.shape[-2:] != (T, D // 2) or (t.dim() == 3 and t.shape[0] not in (1, B)):
            return f"{name} {tuple(t.shape)} is not [T, D/2] or [B, T, D/2] for x {tuple(x.shape)}"
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype}"
    return ""


def rotate(x: Tensor, cos: Tensor, sin: Tensor, out_dtype: torch.dtype, inverse: bool = False) -> Tensor:
    """x [B, T, H, D] rotated by the angles of cos, sin ([T, D/2] or [B, T, D/2], fp32; by their negatives if
    `inverse`): a contiguous [B, T, H, D] tensor in out_dtype."""
    x = last_dim_contiguous(x)
    B, T, H, D = x.shape
    cos, sin = (t.contiguous().expand(B, T, D // 2) for t in (cos, sin))
    y = empty(x.shape, out_dtype, x.device)
    if y.numel():
        BP = min(TILE, next_pow2(H * D // 2))
        BR = TILE // BP
        _rope_kernel[(cdiv(B * T, BR), cdiv(H * D // 2, BP))](
            x, cos, sin, y, B * T, T, H, *x.stride()[:3], *cos.stride()[:2], HALF=D // 2, INVERSE=inverse, BR=BR, BP=BP,
        )  # fmt: skip
    return y


class Rope(torch.autograd.Function):
    """x [B, T, H, D] rotated by cos, sin (no gradient), y in `out_dtype`; the kernel above each way."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor, out_dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        return rotate(x, cos, sin, out_dtype)

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        return rotate(dy, cos, sin, ctx.x_dtype, inverse=True), None, None, None
