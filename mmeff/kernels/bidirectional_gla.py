"""Triton kernels of bidirectional GLA (mmeff.ops.bidirectional_gla): the mean of GLA along the token order and
along its reverse, each chunk of the sequence computed by its own program, with no scan and no reversed copy.

Per sequence and head, with log gates g_t [K] and, in one chunk of BT tokens, the in-chunk cumsum b_t, its total
c = b_last and the exclusive cumsum a_t = b_t - g_t:

    forward   o_t = sum_{s <= t} q_t . (exp(b_t - b_s) k_s) v_s     (the state of the tokens before t, decayed)
    reverse   o_t = sum_{s >= t} q_t . (exp(a_s - a_t) k_s) v_s     (the same recurrence run backwards)
    output    o = scale * (forward + reverse) / 2

Chunk i reads the tokens of earlier chunks through one state H, summed over those chunks in order (exp(c - b) k),
and of later chunks through R, summed backwards (exp(a) k); every exponent there is at most 0. Each program sums
the states it needs itself, from the chunks' own tiles: O(chunks^2) state products a sequence against a scan's
O(chunks), so MAX_CHUNKS bounds the sequences these kernels take (longer ones take the scan routes). Inside the
chunk both directions are one score matrix: the forward scores exp(b) q . exp(-b) k below the diagonal, the
reverse exp(c - a) q . exp(a - c) k above it, both on it. Those factors reach exp(span) (span: the chunk's largest
-c), so the scores are factored only up to utils.span_limit; past it a chunk's programs leave its in-chunk part
out, and `_bigla_exact_fwd_kernel` adds it with the exact pairwise exponents, KEY_SLICE key channels at a time (the other
programs only read their chunk's gates and stop).

The backward is the scan routes': GLA's chunked backward on the sequences and their reverses stacked along the batch.
A backward of this form (per-chunk programs summing every other chunk's state and state gradient) ran at 0.71 ms a
pass of three at the 224 px ViT-S shape on an H100, against about 1.4 ms for the routes' whole backward.
Transposed operands are loaded transposed from memory or computed in transposed form (mmeff.kernels.utils).
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmeff.kernels import pack
from mmeff.kernels.chunk import chunk_backward
from mmeff.kernels.launch import jit
from mmeff.kernels.routes import merge, stack
from mmeff.kernels.utils import cdiv, empty, load_tile, load_tile_t, masked_exp, mm, pow2, precision
from mmeff.kernels.utils import span_limit, store_tile

BT = 64  # tokens of a chunk
MAX_CHUNKS = 8  # longest sequence taken: MAX_CHUNKS * BT tokens
MAX_KEY_DIM = 64
MAX_VALUE_DIM = 128
KEY_SLICE = 2  # key channels a step of the exact kernel ([BT, BT, KEY_SLICE] products)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _gates(g, t0, T, sg, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, TRANS: tl.constexpr):
    """A chunk's gates in fp32 ([BT, BK], or [BK, BT] with TRANS), their in-chunk cumsum b and total c (per key)."""
    if TRANS:  # one return statement: Triton's compiler wants one return type (the interpreter does not)
        x = load_tile_t(g, t0, T, sg, 0, K, BT, BK).to(tl.float32)
        b, c = tl.cumsum(x, 1), tl.sum(x, 1)
    else:
        x = load_tile(g, t0, T, sg, 0, K, BT, BK).to(tl.float32)
        b, c = tl.cumsum(x, 0), tl.sum(x, 0)
    return x, b, c


@triton.jit
def _span(c, K: tl.constexpr, BK: tl.constexpr):
    """A chunk's span from its gate totals c [BK]: the largest -c over the key channels."""
    return tl.max(tl.where(tl.arange(0, BK) < K, -c, 0.0), 0)


@triton.jit
def _carry(x, y, g, sx, sy, sg, lo, hi, T, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
           BV: tl.constexpr, ASCENDING: tl.constexpr, EXCLUSIVE: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """The state sum_s w_s x_s y_s^T [BK, BV] over chunks lo..hi-1, in order (ASCENDING: each chunk's rows weighted
    exp(c - b)) or backwards (weighted exp(b), or exp(a) with EXCLUSIVE), decayed by exp(c) across each chunk."""
    DT = y.dtype.element_ty
    S = tl.zeros([BK, BV], dtype=tl.float32)
    for n in range(0, hi - lo):
        if ASCENDING:
            t0 = (lo + n) * BT
        else:
            t0 = (hi - 1 - n) * BT
        gT, b, c = _gates(g, t0, T, sg, K, BT, BK, True)  # transposed, as the rows x_s are read: [BK, BT]
        if EXCLUSIVE:
            b = b - gT
        w = tl.exp(c[:, None] - b) if ASCENDING else tl.exp(b)
        xw = (load_tile_t(x, t0, T, sx, 0, K, BT, BK).to(tl.float32) * w).to(DT)
        S = S * tl.exp(c)[:, None] + mm(xw, load_tile(y, t0, T, sy, 0, V, BT, BV), PREC)
    return S


@jit
def _bigla_fwd_kernel(q, k, v, g, o, sqb, sqt, skb, skt, svb, svt, sgb, sgt, T, NC, scale,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, LIMIT: tl.constexpr, BT: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    i, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    q, k, g = q + b * sqb + h * K, k + b * skb + h * K, g + b * sgb + h * K
    v, o = v + b * svb + h * V, o + b * T * H * V + h * V
    DT = v.dtype.element_ty
    ahead = _carry(k, v, g, skt, svt, sgt, 0, i, T, K, V, BT, BK, BV, True, False, PREC)
    behind = _carry(k, v, g, skt, svt, sgt, i + 1, NC, T, K, V, BT, BK, BV, False, True, PREC)
    t0 = i * BT
    gx, bq, c = _gates(g, t0, T, sgt, K, BT, BK, False)
    qt = load_tile(q, t0, T, sqt, 0, K, BT, BK).to(tl.float32)
    qf = (qt * tl.exp(bq)).to(DT)
    qr = (qt * tl.exp(c[None, :] - bq + gx)).to(DT)
    acc = mm(qf, ahead, PREC) + mm(qr, behind, PREC)
    if _span(c, K, BK) <= LIMIT:
        gT, bT, cT = _gates(g, t0, T, sgt, K, BT, BK, True)
        kT = load_tile_t(k, t0, T, skt, 0, K, BT, BK).to(tl.float32)
        rows, cols = tl.arange(0, BT)[:, None], tl.arange(0, BT)[None, :]
        scores = tl.where(cols <= rows, mm(qf, (kT * tl.exp(-bT)).to(DT), PREC), 0.0)
        scores += tl.where(cols >= rows, mm(qr, (kT * tl.exp(bT - gT - cT[:, None])).to(DT), PREC), 0.0)
        acc += mm(scores.to(DT), load_tile(v, t0, T, svt, 0, V, BT, BV), PREC)
    store_tile(o, acc * scale, t0, T, H * V, 0, V, BT, BV)


@triton.jit
def _pair_decays(g, t0, T, sg, c0, K: tl.constexpr, BT: tl.constexpr, KS: tl.constexpr):
    """Exact [BT, BT, KS] decays [t, s] of key channels c0.. of a chunk: exp(b_t - b_s) for s <= t plus exp(a_s - a_t)
    for s >= t (both on the diagonal)."""
    gs = load_tile(g, t0, T, sg, c0, K, BT, KS).to(tl.float32)
    b = tl.cumsum(gs, 0)
    a = b - gs
    rows, cols = tl.arange(0, BT)[:, None, None], tl.arange(0, BT)[None, :, None]
    return masked_exp(b[:, None, :] - b[None, :, :], cols <= rows) + masked_exp(a[None, :, :] - a[:, None, :], cols >= rows)


@jit
def _bigla_exact_fwd_kernel(q, k, v, g, o, sqb, sqt, skb, skt, svb, svt, sgb, sgt, T, scale,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, LIMIT: tl.constexpr, BT: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, KS: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    i, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    q, k, g = q + b * sqb + h * K, k + b * skb + h * K, g + b * sgb + h * K
    v, o = v + b * svb + h * V, o + b * T * H * V + h * V
    t0 = i * BT
    _, _, c = _gates(g, t0, T, sgt, K, BT, BK, False)
    if _span(c, K, BK) > LIMIT:
        scores = tl.zeros([BT, BT], dtype=tl.float32)
        for c0 in range(0, K, KS):
            decays = _pair_decays(g, t0, T, sgt, c0, K, BT, KS)
            qs = load_tile(q, t0, T, sqt, c0, K, BT, KS).to(tl.float32)
            ks = load_tile(k, t0, T, skt, c0, K, BT, KS).to(tl.float32)
            scores += tl.sum(qs[:, None, :] * ks[None, :, :] * decays, 2)
        intra = mm(scores.to(v.dtype.element_ty), load_tile(v, t0, T, svt, 0, V, BT, BV), PREC)
        out = load_tile(o, t0, T, H * V, 0, V, BT, BV).to(tl.float32) + intra * scale
        store_tile(o, out, t0, T, H * V, 0, V, BT, BV)


def unsupported(q: Tensor, v: Tensor, g: Tensor) -> str:
    """Why these kernels cannot take q [B, T, H, K], v [B, T, H, V], g [B, T, H, K]; "" when they can."""
    if not {q.dtype, v.dtype} <= set(_DTYPES) or g.dtype not in _DTYPES:
        return f"dtypes {q.dtype}, {v.dtype}, {g.dtype} (the kernels take float32, bfloat16, float16)"
    if q.shape[1] > MAX_CHUNKS * BT:
        return f"{q.shape[1]} tokens > {MAX_CHUNKS * BT} (each chunk's program sums the states of all the others)"
    if q.shape[3] > MAX_KEY_DIM or v.shape[3] > MAX_VALUE_DIM:
        return f"head widths K {q.shape[3]}, V {v.shape[3]} (at most {MAX_KEY_DIM}, {MAX_VALUE_DIM})"
    if q.shape[0] * q.shape[2] > 65535:
        return f"B*H = {q.shape[0] * q.shape[2]} (one launch grid row each, at most 65535)"
    return ""


def _heads_last(x: Tensor) -> Tensor:
    """x [B, T, H, D] with heads of D contiguous values (a view the kernels read through its B and T strides)."""
    return x if x.stride(3) == 1 and x.stride(2) == x.shape[3] else x.contiguous()


def _launch(q: Tensor, v: Tensor) -> Tuple[Tuple[int, int], dict]:
    """The grid (chunks, B*H) and the shape constexprs."""
    B, T, H, K = q.shape
    return (cdiv(T, BT), B * H), dict(H=H, K=K, V=v.shape[3], LIMIT=span_limit(q.dtype), BT=BT, BK=pow2(K),
                                      BV=pow2(v.shape[3]), PREC=precision(q.dtype))  # fmt: skip


def _strides(*xs: Tensor) -> list[int]:
    return [s for x in xs for s in (x.stride(0), x.stride(1))]


def forward(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float) -> Tensor:
    """o [B, T, H, V] in v's dtype: scale / 2 x (GLA along the tokens + along their reverse); q, k, v in one dtype."""
    q, k, v, g = map(_heads_last, (q, k, v, g))
    o = empty(v.shape, v.dtype, v.device)
    if not o.numel():
        return o
    grid, shape = _launch(q, v)
    strides = _strides(q, k, v, g)
    _bigla_fwd_kernel[grid](q, k, v, g, o, *strides, q.shape[1], grid[0], scale / 2, **shape)
    _bigla_exact_fwd_kernel[grid](q, k, v, g, o, *strides, q.shape[1], scale / 2, KS=KEY_SLICE, **shape, num_warps=8)
    return o


def backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float) -> Tuple[Tensor, ...]:
    """(dq, dk, dv, dg) of `forward`, each in its input's dtype: the scan routes' backward (GLA's chunked backward,
    mmeff.kernels.chunk, on each sequence and its reverse stacked along the batch by mmeff.kernels.routes), the two
    routes' gradients summed back in token order."""
    stacked = stack([q, k, v, g])
    (do2,) = stack([do.to(v.dtype)], scale=0.5)
    (pq, pk, pv, pg, _, _), chunks, gate = pack(*stacked, None, None, None, BT)
    grads = chunk_backward(pq, pk, pv, pg, None, None, None, do2.reshape(pv.shape).contiguous(), None, scale, chunks,
                           gate, False)[:4]  # fmt: skip
    merged = merge([d.reshape(x.shape) for d, x in zip(grads, stacked)], 1.0)
    return tuple(d.to(x.dtype) for d, x in zip(merged, (q, k, v, g)))
