"""Triton kernels of the depthwise k x k convolution over a token grid (mmeff.ops.conv.depthwise_conv2d's semantics).

    y[b, t, c] = bias[c] + sum_{i, j} w[c, i, j] x[b, pixel(t) + (i - k // 2, j - k // 2), c]   (0 off the H x W grid)

x is [B, T = H * W, C] in row-major pixel order, channels last, as a mixer holds an image's tokens: no transposes to
channels-first and back, and x may be a strided view along T (a slice of a fused projection). Timed alone on the
H200 at the ViT-S shapes, forward + backward, against PyTorch's depthwise Conv2d (cuDNN) on the same tensor viewed
channels-last, it was ahead only at 512 px (0.88 against 1.01 ms) and behind at 224, 1,024 and 2,048 px (1.17 /
1.29 / 1.06 against 0.73 / 0.79 / 0.98 ms; benchmarks/results/vision_ops_h200.md); in the step it costs 0.6-1.5 ms
a layer. One program per (sequence and token tile, channel block): tiles of the flattened B * T tokens, which may
span images, were slower on an H100 at 224, 512 and 1,024 px (forward 87.7 / 109.2 / 125.7 against 73.8 / 75.8 /
92.1 us in one process; d130775). The backward is one kernel: dx is the same convolution of dy with the kernel
mirrored, and each tile writes partial sums of dw and dbias, which the host adds up (no atomics: deterministic, as
mmeff.kernels.conv).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmeff.kernels.utils import autotune, cdiv, empty, last_dim_contiguous

BLOCK_T = 64  # tokens per program; the channel block BC is tuned


def _configs(*choices: tuple[int, int]) -> list[triton.Config]:
    """One config per (BC, num_warps)."""
    return [triton.Config({"BC": bc}, num_warps=nw) for bc, nw in choices]


@triton.jit
def _tile(NT):
    """(sequence as int64, token tile) of this program."""
    pid = tl.program_id(0).to(tl.int64)
    return pid // NT, (pid % NT).to(tl.int32)


@triton.jit
def _shifted(src, b, rows, c0, s_b, s_t, T, H, W, C, di: tl.constexpr, dj: tl.constexpr, BC: tl.constexpr):
    """src at pixel (y + di, x + dj) for the tokens `rows` [BT] of sequence b, columns c0.., fp32 [BT, BC]; 0 where
    that pixel is off the grid (or the token past T)."""
    y, x = rows // W, rows % W
    inside = (rows < T) & (y + di >= 0) & (y + di < H) & (x + dj >= 0) & (x + dj < W)
    cols = c0 + tl.arange(0, BC)
    off = b * s_b + (rows + di * W + dj).to(tl.int64)[:, None] * s_t + cols[None, :]
    return tl.load(src + off, mask=inside[:, None] & (cols < C)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _tap(w, cols, C, i: tl.constexpr, j: tl.constexpr, K: tl.constexpr):
    """w[cols, i, j] as fp32 [BC]."""
    return tl.load(w + cols * (K * K) + i * K + j, mask=cols < C, other=0.0).to(tl.float32)


@autotune(_configs((64, 4), (128, 4), (32, 2)), key=["C", "K", "HAS_BIAS"])
@triton.jit
def _dwconv_fwd_kernel(x, w, bias, y, s_b, s_t, T, H, W, C, NT, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                       HAS_BIAS: tl.constexpr):  # fmt: skip
    b, i_t = _tile(NT)
    c0 = tl.program_id(1) * BC
    rows = i_t * BT + tl.arange(0, BT)
    cols = c0 + tl.arange(0, BC)
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
    for i in tl.static_range(K):
        for j in tl.static_range(K):
            acc += _shifted(x, b, rows, c0, s_b, s_t, T, H, W, C, i - K // 2, j - K // 2, BC) * _tap(w, cols, C, i, j, K)[None, :]
    off = (b * T + rows.to(tl.int64))[:, None] * C + cols[None, :]
    tl.store(y + off, acc.to(y.dtype.element_ty), mask=(rows < T)[:, None] & (cols < C)[None, :])


@autotune(_configs((64, 4), (128, 4), (32, 2)), key=["C", "K", "HAS_BIAS"])
@triton.jit
def _dwconv_bwd_kernel(x, w, dy, dx, dw_part, db_part, s_b, s_t, T, H, W, C, NT, K: tl.constexpr, BT: tl.constexpr,
                       BC: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
    # Output pixel p reads input p + d through tap d, so input p receives dy[p - d] through it: dx is the mirrored
    # convolution of dy. dw[c, d] sums dy[p] x[p + d] over this tile's own pixels p.
    b, i_t = _tile(NT)
    c0 = tl.program_id(1) * BC
    rows = i_t * BT + tl.arange(0, BT)
    cols = c0 + tl.arange(0, BC)
    g = _shifted(dy, b, rows, c0, T * C, C, T, H, W, C, 0, 0, BC)
    tile = b * NT + i_t
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for i in tl.static_range(K):
        for j in tl.static_range(K):
            tap = _tap(w, cols, C, i, j, K)
            acc += _shifted(dy, b, rows, c0, T * C, C, T, H, W, C, K // 2 - i, K // 2 - j, BC) * tap[None, :]
            xs = _shifted(x, b, rows, c0, s_b, s_t, T, H, W, C, i - K // 2, j - K // 2, BC)
            tl.store(dw_part + (tile * (K * K) + i * K + j) * C + cols, tl.sum(xs * g, 0), mask=cols < C)
    if HAS_BIAS:
        tl.store(db_part + tile * C + cols, tl.sum(g, 0), mask=cols < C)
    off = (b * T + rows.to(tl.int64))[:, None] * C + cols[None, :]
    tl.store(dx + off, acc.to(dx.dtype.element_ty), mask=(rows < T)[:, None] & (cols < C)[None, :])


def unsupported(x: Tensor) -> str:
    """Why grid_conv cannot take x [B, T, C] (CUDA), "" when it can."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {x.dtype} (the kernels take float32, bfloat16, float16)"
    return ""


def grid_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], height: int, width: int) -> Tensor:
    """Depthwise conv of x [B, H * W, C] (row-major pixels; any strides but the last) with weight [C, K, K] (K odd,
    zero padding K // 2) and bias [C] or None: y [B, H * W, C] contiguous, in x's dtype."""
    x = last_dim_contiguous(x)
    _, tokens, channels = x.shape
    y = empty(x.shape, x.dtype, x.device)
    _dwconv_fwd_kernel[_grid(x)](
        x, weight.contiguous(), bias, y, x.stride(0), x.stride(1), tokens, height, width, channels,
        cdiv(tokens, BLOCK_T), K=weight.shape[-1], BT=BLOCK_T, HAS_BIAS=bias is not None,
    )  # fmt: skip
    return y


def grid_conv_backward(dy: Tensor, x: Tensor, weight: Tensor, has_bias: bool, height: int, width: int
                       ) -> tuple[Tensor, Tensor, Optional[Tensor]]:  # fmt: skip
    """Gradients (dx contiguous in x's dtype, dweight and dbias (None without bias) in fp32) of grid_conv."""
    x = last_dim_contiguous(x)
    batch, tokens, channels = x.shape
    k = weight.shape[-1]
    tiles = cdiv(tokens, BLOCK_T)
    dx = empty(x.shape, x.dtype, x.device)
    dw_part = empty((batch * tiles, k * k, channels), torch.float32, x.device)
    db_part = empty((batch * tiles, channels), torch.float32, x.device) if has_bias else None
    _dwconv_bwd_kernel[_grid(x)](
        x, weight.contiguous(), dy.contiguous(), dx, dw_part, db_part, x.stride(0), x.stride(1), tokens, height, width,
        channels, tiles, K=k, BT=BLOCK_T, HAS_BIAS=has_bias,
    )  # fmt: skip
    dw = dw_part.sum(0).t().reshape(weight.shape).contiguous()  # the layout the custom op's fake promises
    return dx, dw, (db_part.sum(0) if has_bias else None)


def _grid(x: Tensor):
    """Launch grid of x [B, T, C]: sequences x token tiles, channel blocks (tuned BC)."""
    return lambda meta: (x.shape[0] * cdiv(x.shape[1], BLOCK_T), cdiv(x.shape[2], meta["BC"]))
