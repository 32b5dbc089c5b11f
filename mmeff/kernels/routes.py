"""Triton kernels of the bidirectional scan route (`scan: bi` in token order, mmeff.blocks.scan): each sequence and
its reverse stacked along the batch, and the two route outputs brought back to token order and averaged.

    stack   x [B, T, C]     -> y [B, 2, T, C]   y[b, 0, t] = s x[b, t],   y[b, 1, t] = s x[b, T - 1 - t]
    merge   y [B, 2, T, C]  -> x [B, T, C]      x[b, t] = s (y[b, 0, t] + y[b, 1, T - 1 - t])

Each is one pass over its tiles, reading x through its batch and token strides (a slice of a projection's output is
read in place), and one launch for all of a mixer's streams (q, k, v and the gates; a launch per stream made 14
route launches per gla-bi layer and training step, 5 now). The gather form (a copy where the stream is a strided
slice, index_select of rows, and a reduction over the routes for the merge): with it a gla-bi ViT-S step at 224 px
on the H200 took 69.9 GPU ms, with these kernels 59.7 (the 168 row gathers alone had taken 10.4 ms).
Merge is stack's gradient and stack merge's, with the scales of the mean over the routes.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton.language as tl
from torch import Tensor

from mmeff.kernels.launch import jit
from mmeff.kernels.utils import cdiv, empty, last_dim_contiguous, next_pow2

BT = 32  # tokens of a tile


@jit
def _stack_kernel(xs, ys, T, Cs, sxbs, sxts, scale, N: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                  SCALED: tl.constexpr):  # fmt: skip
    # Program axis 2 takes stream pid % N, its channel block pid // N (past a narrower stream's width: nothing).
    i_b, i_t, pid = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    rows = i_t * BT + tl.arange(0, BT)
    cols = (pid // N) * BC + tl.arange(0, BC)
    for n in tl.static_range(N):
        if pid % N == n:
            C = Cs[n]
            mask = (rows < T)[:, None] & (cols < C)[None, :]
            v = tl.load(xs[n] + i_b * sxbs[n] + rows[:, None].to(tl.int64) * sxts[n] + cols[None, :], mask=mask)
            if SCALED:
                v = (v.to(tl.float32) * scale).to(ys[n].dtype.element_ty)
            base = ys[n] + i_b * 2 * T * C
            tl.store(base + rows[:, None] * C + cols[None, :], v, mask=mask)
            tl.store(base + T * C + (T - 1 - rows)[:, None] * C + cols[None, :], v, mask=mask)


@jit
def _merge_kernel(ys, xs, T, Cs, sybs, syts, scale, N: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    i_b, i_t, pid = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    rows = i_t * BT + tl.arange(0, BT)
    cols = (pid // N) * BC + tl.arange(0, BC)
    for n in tl.static_range(N):
        if pid % N == n:
            C, syt = Cs[n], syts[n]
            mask = (rows < T)[:, None] & (cols < C)[None, :]
            base = ys[n] + i_b * 2 * sybs[n]
            ahead = tl.load(base + rows[:, None].to(tl.int64) * syt + cols[None, :], mask=mask).to(tl.float32)
            back = tl.load(base + sybs[n] + (T - 1 - rows)[:, None].to(tl.int64) * syt + cols[None, :], mask=mask)
            out = ((ahead + back.to(tl.float32)) * scale).to(xs[n].dtype.element_ty)
            tl.store(xs[n] + i_b * T * C + rows[:, None] * C + cols[None, :], out, mask=mask)


def _flat(x: Tensor) -> Tensor:
    """x [B, T, ...] as [B, T, C]: a view where the trailing dims are one run."""
    return last_dim_contiguous(x.reshape(*x.shape[:2], -1))


def _grid(batch: int, length: int, widths: list[int]) -> tuple[tuple[int, int, int], int]:
    block = min(128, next_pow2(max(*widths, 16)))
    return (batch, cdiv(length, BT), len(widths) * cdiv(max(widths), block)), block


def stack(xs: Sequence[Tensor], scale: float = 1.0) -> list[Tensor]:
    """Streams x [B, T, ...] (one B and T) -> [2B, T, ...] each: each sequence (times `scale`), then the same
    reversed, in its stream's dtype; all streams in one launch."""
    batch, length = xs[0].shape[:2]
    flats = tuple(_flat(x) for x in xs)
    ys = [empty((batch * 2, *x.shape[1:]), x.dtype, x.device) for x in xs]
    widths = [f.shape[2] for f in flats]
    if batch and length and max(widths):
        grid, block = _grid(batch, length, widths)
        _stack_kernel[grid](flats, tuple(ys), length, tuple(widths), tuple(f.stride(0) for f in flats),
                            tuple(f.stride(1) for f in flats), scale, N=len(xs), BT=BT, BC=block,
                            SCALED=scale != 1.0)  # fmt: skip
    return ys


def merge(ys: Sequence[Tensor], scale: float) -> list[Tensor]:
    """Streams y [2B, T, ...] (stack's layout) -> [B, T, ...] each: `scale` x (each first-route sequence + its
    reversed second route), summed in fp32, in its stream's dtype; all streams in one launch."""
    batch, length = ys[0].shape[0] // 2, ys[0].shape[1]
    flats = tuple(_flat(y) for y in ys)
    xs = [empty((batch, *y.shape[1:]), y.dtype, y.device) for y in ys]
    widths = [f.shape[2] for f in flats]
    if batch and length and max(widths):
        grid, block = _grid(batch, length, widths)
        _merge_kernel[grid](flats, tuple(xs), length, tuple(widths), tuple(f.stride(0) for f in flats),
                            tuple(f.stride(1) for f in flats), scale, N=len(ys), BT=BT, BC=block)  # fmt: skip
    return xs


def unsupported(x: Tensor) -> str:
    """Why these kernels cannot take stream `x`; "" when they can."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {x.dtype} (the kernels take float32, bfloat16, float16)"
    return ""
