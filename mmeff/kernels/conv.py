"""Triton kernels of the causal depthwise short convolution over [B, T, C] (mmeff.ops.conv's reference semantics).

    y[b, t, c] = act(bias[c] + sum_j w[c, j] x[b, t - (W - 1) + j, c]),  x = 0 before the sequence start

The forward reads each input tile once per tap (the taps overlap, so the re-reads hit the cache) and writes y.
The backward recomputes the pre-activation instead of saving it: one kernel writes its gradient (x's dtype) and per-tile
partial sums of dw and dbias, which the host adds up (no atomics, so the result is deterministic); a second one
writes dx. The kernels take widths W up to 4 (`unsupported`): the backward keeps each tap's x tile in registers.
With packed documents (`runs` [B, T], each token's document index within its row) a tap reading another document
reads 0. One program per (tile of BT rows of the flattened [B * T] rows, channel block): a tile may span sequences (at
224 px's 196 tokens a tile per sequence's 64 rows would leave a quarter of its rows idle), so every tap checks its
row's position within its sequence. The grid's first dimension has no 65535 limit.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmeff.kernels.utils import autotune, cdiv, empty, rows_of

BLOCK_T = 32  # rows per program; the channel block BC is tuned
MAX_WIDTH = 4  # the backward keeps this many tap tiles at most (one variable each)


def _configs(*choices: tuple[int, int]) -> list[triton.Config]:
    """One config per (BC, num_warps)."""
    return [triton.Config({"BC": bc}, num_warps=nw) for bc, nw in choices]


@triton.jit
def _tile_offsets(r, t, c0, N, T, C, S, BC: tl.constexpr):
    """Element offsets of flattened rows r (a [BT] vector, at positions t within their sequences; rows S apart) and
    columns c0.., and their mask: rows inside their sequence and the tensor."""
    cols = c0 + tl.arange(0, BC)
    inside = (t >= 0) & (t < T) & (r < N)
    return r[:, None] * S + cols[None, :], inside[:, None] & (cols < C)[None, :]


@triton.jit
def _same_doc(runs, r, u, valid, DOCS: tl.constexpr):
    """[BT] mask: flattened rows r and u (where `valid`) are in the same document (always, without documents)."""
    if DOCS:
        return tl.load(runs + r, mask=valid, other=-1) == tl.load(runs + u, mask=valid, other=-2)
    return valid


@triton.jit
def _tile(T, BT: tl.constexpr):
    """Flattened rows (int64 [BT]) of this program's tile and their positions within their sequences (int32)."""
    # One 64-bit remainder a program, then 32-bit ones: with a 64-bit one per row the LM's conv (4 x 4,096 x 2,304)
    # took 110 us forward against 83 us on per-sequence tiles (H100).
    r0 = tl.program_id(0).to(tl.int64) * BT
    return r0 + tl.arange(0, BT), ((r0 % T).to(tl.int32) + tl.arange(0, BT)) % T


@triton.jit
def _x_tap(x, runs, r, t, c0, N, T, C, SX, shift: tl.constexpr, BC: tl.constexpr, DOCS: tl.constexpr):
    """x at the rows `shift` before flattened rows r (0 before their sequence's or document's start), x's dtype."""
    off, mask = _tile_offsets(r - shift, t - shift, c0, N, T, C, SX, BC)
    mask &= _same_doc(runs, r - shift, r, (t >= shift) & (r < N), DOCS)[:, None]
    return tl.load(x + off, mask=mask, other=0.0)


@triton.jit
def _tap_weight(w, cols, C, j: tl.constexpr, W: tl.constexpr):
    """Tap j of the weight [C, W] as fp32 [1, BC]."""
    return tl.load(w + cols * W + j, mask=cols < C, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _pre_activation(x, w, bias, runs, r, t, c0, N, T, C, SX, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                    HAS_BIAS: tl.constexpr, DOCS: tl.constexpr):  # fmt: skip
    """bias + sum_j w[:, j] x[t - (W - 1) + j] for flattened rows r (at positions t), fp32 [BT, BC]."""
    cols = c0 + tl.arange(0, BC)
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(W):
        tap = _x_tap(x, runs, r, t, c0, N, T, C, SX, W - 1 - j, BC, DOCS)
        acc += tap.to(tl.float32) * _tap_weight(w, cols, C, j, W)
    return acc


@autotune(_configs((128, 4), (64, 2), (64, 4)), key=["C", "W", "HAS_BIAS", "SILU", "DOCS"])
@triton.jit
def _conv_fwd_kernel(x, w, bias, runs, y, N, T, C, SX, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                     HAS_BIAS: tl.constexpr, SILU: tl.constexpr, DOCS: tl.constexpr):  # fmt: skip
    r, t = _tile(T, BT)
    c0 = tl.program_id(1) * BC
    pre = _pre_activation(x, w, bias, runs, r, t, c0, N, T, C, SX, W, BT, BC, HAS_BIAS, DOCS)
    out = pre * tl.sigmoid(pre) if SILU else pre
    off, mask = _tile_offsets(r, t, c0, N, T, C, C, BC)
    tl.store(y + off, out.to(y.dtype.element_ty), mask=mask)


# The backward runs in two kernels. A single one that recomputed the pre-activation of the W shifted row tiles it
# needs for dx (W * W tile loads a program) took 2.0 ms a call at B 512 x T 196 x C 896 on the H200, over 8x the
# forward (under 0.25 ms; benchmarks/vision_speed.py --profile, mamba2-bi at 224 px). Now the first kernel writes the
# pre-activation gradient g once (in x's dtype) with the partial dw / dbias sums, and the second gathers dx from W
# tiles of g. The first keeps each tap's x tile (x0 .. x3) from the pre-activation to the weight gradient: loading
# them again there took 998 against 662 us at that shape on an H100 (64-row tiles, 64 channels, 4 warps).
@autotune(_configs((64, 2), (64, 4), (128, 4)), key=["C", "W", "HAS_BIAS", "SILU", "DOCS"])
@triton.jit
def _conv_bwd_g_kernel(x, w, bias, runs, dy, g, dw_part, db_part, N, T, C, SX, W: tl.constexpr, BT: tl.constexpr,
                       BC: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, DOCS: tl.constexpr):  # fmt: skip
    r, t = _tile(T, BT)
    c0 = tl.program_id(1) * BC
    cols = c0 + tl.arange(0, BC)
    pre = tl.zeros([BT, BC], dtype=tl.float32)
    if HAS_BIAS:
        pre += tl.load(bias + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
    x0 = _x_tap(x, runs, r, t, c0, N, T, C, SX, W - 1, BC, DOCS)
    pre += x0.to(tl.float32) * _tap_weight(w, cols, C, 0, W)
    if W > 1:
        x1 = _x_tap(x, runs, r, t, c0, N, T, C, SX, W - 2, BC, DOCS)
        pre += x1.to(tl.float32) * _tap_weight(w, cols, C, 1, W)
    if W > 2:
        x2 = _x_tap(x, runs, r, t, c0, N, T, C, SX, W - 3, BC, DOCS)
        pre += x2.to(tl.float32) * _tap_weight(w, cols, C, 2, W)
    if W > 3:
        x3 = _x_tap(x, runs, r, t, c0, N, T, C, SX, W - 4, BC, DOCS)
        pre += x3.to(tl.float32) * _tap_weight(w, cols, C, 3, W)
    off, mask = _tile_offsets(r, t, c0, N, T, C, C, BC)
    g_own = tl.load(dy + off, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        sig = tl.sigmoid(pre)
        g_own *= sig * (1.0 + pre * (1.0 - sig))
    tl.store(g + off, g_own, mask=mask)
    # Partial weight and bias gradients of this tile's output rows: [tile, W, C] and [tile, C].
    tile = tl.program_id(0).to(tl.int64)
    part = dw_part + tile * W * C + cols
    tl.store(part, tl.sum(x0.to(tl.float32) * g_own, 0), mask=cols < C)
    if W > 1:
        tl.store(part + C, tl.sum(x1.to(tl.float32) * g_own, 0), mask=cols < C)
    if W > 2:
        tl.store(part + 2 * C, tl.sum(x2.to(tl.float32) * g_own, 0), mask=cols < C)
    if W > 3:
        tl.store(part + 3 * C, tl.sum(x3.to(tl.float32) * g_own, 0), mask=cols < C)
    if HAS_BIAS:
        tl.store(db_part + tile * C + cols, tl.sum(g_own, 0), mask=cols < C)


@autotune(_configs((128, 4), (64, 2), (64, 4)), key=["C", "W", "DOCS"])
@triton.jit
def _conv_bwd_dx_kernel(w, runs, g, dx, N, T, C, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                        DOCS: tl.constexpr):  # fmt: skip
    # Input row t feeds output rows t + s (s = 0 .. W - 1, same document) through tap W - 1 - s, so dx[t] sums
    # the pre-activation gradients g of those rows.
    r, t = _tile(T, BT)
    c0 = tl.program_id(1) * BC
    cols = c0 + tl.arange(0, BC)
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for s in tl.static_range(W):
        off, mask = _tile_offsets(r + s, t + s, c0, N, T, C, C, BC)
        if s > 0:
            mask &= _same_doc(runs, r, r + s, (t + s < T) & (r + s < N), DOCS)[:, None]
        tap = tl.load(w + cols * W + (W - 1 - s), mask=cols < C, other=0.0).to(tl.float32)
        acc += tl.load(g + off, mask=mask, other=0.0) * tap[None, :]
    off, mask = _tile_offsets(r, t, c0, N, T, C, C, BC)
    tl.store(dx + off, acc.to(dx.dtype.element_ty), mask=mask)


def _grid(x: Tensor):
    """Launch grid of x [B, T, C]: row tiles of the flattened B * T rows, channel blocks (tuned BC)."""
    return lambda meta: (cdiv(x.shape[0] * x.shape[1], BLOCK_T), cdiv(x.shape[2], meta["BC"]))


def unsupported(x: Tensor, weight: Tensor) -> str:
    """Why CausalConv cannot take x [B, T, C] (CUDA) with weight [C, W], "" when it can."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {x.dtype} (the kernels take float32, bfloat16, float16)"
    if weight.shape[1] > MAX_WIDTH:
        return f"kernel width {weight.shape[1]} (the kernels take up to {MAX_WIDTH})"
    return ""


def causal_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool, runs: Optional[Tensor]) -> Tensor:
    """act(causal depthwise conv) of x [B, T, C] (its rows one stride apart: `rows_of`) with weight [C, W] and bias
    [C] or None, in x's dtype (y contiguous)."""
    y = empty(x.shape, x.dtype, x.device)
    T, C = x.shape[1:]
    rows = rows_of(x)  # the kernel reads these: x itself where its rows are one stride apart
    _conv_fwd_kernel[_grid(x)](
        rows, weight, bias, runs, y, rows.shape[0], T, C, rows.stride(0), W=weight.shape[1], BT=BLOCK_T,
        HAS_BIAS=bias is not None, SILU=silu, DOCS=runs is not None,
    )  # fmt: skip
    return y


def causal_conv_backward(dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool,
                         runs: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:  # fmt: skip
    """Gradients (dx, dweight, dbias or None) of causal_conv, each in its input's dtype."""
    tiles = cdiv(x.shape[0] * x.shape[1], BLOCK_T)
    # g in x's dtype: bf16 halves the traffic of the g kernel's store and the dx kernel's reads (at 4 x 4096 tokens
    # and 3072 channels on the H200, 344 + 125 us a call in fp32 against 292 + 78 us); dw and dbias are summed from
    # the fp32 values before the store, and dx is rounded to x's dtype anyway.
    g = empty(x.shape, x.dtype, x.device)
    dx = empty(x.shape, x.dtype, x.device)
    dw_part = empty((tiles, *weight.shape[::-1]), torch.float32, x.device)
    db_part = None if bias is None else empty((tiles, x.shape[2]), torch.float32, x.device)
    T, C, W, docs = x.shape[1], x.shape[2], weight.shape[1], runs is not None
    rows = rows_of(x)
    _conv_bwd_g_kernel[_grid(x)](
        rows, weight, bias, runs, dy.contiguous(), g, dw_part, db_part, rows.shape[0], T, C, rows.stride(0), W=W,
        BT=BLOCK_T, HAS_BIAS=bias is not None, SILU=silu, DOCS=docs,
    )  # fmt: skip
    _conv_bwd_dx_kernel[_grid(x)](weight, runs, g, dx, rows.shape[0], T, C, W=W, BT=BLOCK_T, DOCS=docs)
    dw = dw_part.sum(0).t().to(weight.dtype).contiguous()  # the layout the custom op's fake promises
    db = None if bias is None else db_part.sum(0).to(bias.dtype)
    return dx, dw, db


class CausalConv(torch.autograd.Function):
    """act(causal depthwise conv) of x [B, T, C] with weight [C, W] and bias [C] or None; y in x's dtype.
    `runs` [B, T] int32 (mmeff.ops.varlen.doc_runs) or None: taps read zero across documents. (Under torch.compile
    the same kernels run as the custom op mmeff::causal_conv, mmeff.ops.custom_ops.)"""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool,  # type: ignore[override]
                runs: Optional[Tensor] = None) -> Tensor:  # fmt: skip
        # A view of a wider tensor's columns is read (and kept) in place: Mamba-2 keeps its in_proj output anyway.
        x, weight = rows_of(x).view(x.shape), weight.contiguous()
        runs = None if runs is None else runs.to(torch.int32).contiguous()
        ctx.save_for_backward(x, weight, bias, runs)
        ctx.silu = silu
        return causal_conv(x, weight, bias, silu, runs)

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        x, weight, bias, runs = ctx.saved_tensors
        return (*causal_conv_backward(dy, x, weight, bias, ctx.silu, runs), None, None)
