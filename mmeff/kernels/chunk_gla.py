"""GLA's intra-chunk part (decay per key channel) for chunks whose gates span too much to factor.

A_ts = sum_k q_tk k_sk exp(b_tk - b_sk) for s <= t factors as (q_t exp(b_t - b_r)) . (k_s exp(b_r - b_s))
around a reference step r: one matmul, which chunk_o takes whenever both factors stay below
exp(span_limit) (utils.chunk_cumsum measures each chunk's span). For the other chunks (strong decays,
wiped states) this module splits the chunk into sub-chunks of SUB steps. A block of an earlier sub-chunk
uses a reference point r between s and t, so both factors are <= 1, and is one matmul; a diagonal block
takes the exact pairwise exponents as a [SUB, SUB, key slice] product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmeff.kernels.utils import (
    SUB,
    Chunks,
    autotune,
    chunk_bounds,
    empty,
    load_tile,
    load_tile_t,
    masked_exp,
    mm,
    precision,
    rev_cumsum,
    span_limit,
    store_tile,
    warps,
)

# Key channels per [SUB, SUB, slice] diagonal-block product (bounds its registers); the backward takes
# the slices one at a time, every term there being per key channel.
KEY_SLICE = 16


@autotune(warps(42), key=["H", "K", "BT", "BC", "BK"])
@triton.jit
def _intra_fwd_kernel(
    q, k, b, span, A, cu_seqlens, chunk_indices,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, LIMIT: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    # Row block i of A: blocks j < i through the first step r of sub-chunk i, the diagonal block as a
    # [BC, BC, BK] product per key slice, blocks j > i zero. One program per chunk: most exit at once.
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    if tl.load(span + i_c.to(tl.int64) * H + i_h) > LIMIT:  # the others are factored in chunk_o
        _, _, tok, nr = chunk_bounds(cu_seqlens, chunk_indices, i_c, BT)
        DT = q.dtype.element_ty
        off = (tok * H + i_h) * K
        for i_i in tl.static_range(BT // BC):
            r0 = i_i * BC
            ri = r0 + tl.arange(0, BC)
            vi = (ri < nr)[:, None]
            for j in tl.static_range(BT // BC):
                block = tl.zeros([BC, BC], dtype=tl.float32)
                for c in range(0, K, BK):
                    qi = load_tile(q + off, r0, nr, H * K, c, K, BC, BK)
                    bi = load_tile(b + off, r0, nr, H * K, c, K, BC, BK)
                    if j < i_i:
                        b_ref = load_tile(b + off, r0, nr, H * K, c, K, 1, BK)
                        k_ref = load_tile_t(k + off, j * BC, nr, H * K, c, K, BC, BK) * masked_exp(
                            tl.trans(b_ref) - load_tile_t(b + off, j * BC, nr, H * K, c, K, BC, BK),
                            (j * BC + tl.arange(0, BC) < nr)[None, :] & (r0 < nr),
                        )
                        block += mm((qi * masked_exp(bi - b_ref, vi)).to(DT), k_ref.to(DT), PREC)
                    elif j == i_i:
                        ki = load_tile(k + off, r0, nr, H * K, c, K, BC, BK)
                        keep = vi & (ri[:, None] >= ri[None, :])
                        decay = masked_exp(bi[:, None, :] - bi[None, :, :], keep[:, :, None])
                        block += tl.sum(qi[:, None, :] * ki[None, :, :] * decay, 2)
                store_tile(A + (tok * H + i_h) * BT, block, r0, nr, H * BT, j * BC, BT, BC, BC)


@autotune(warps(42, 82), key=["H", "K", "BT", "BC", "BK"])
@triton.jit
def _intra_bwd_kernel(
    q, k, b, span, dA, dq_in, dk_in, dg_last, dq, dk, dg, cu_seqlens, chunk_indices,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, LIMIT: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    # Key slices one after the other (every term here is per key channel). Sub-chunks in reverse order,
    # so that the decay gradient's reverse cumsum carries across them.
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    if tl.load(span + i_c.to(tl.int64) * H + i_h) > LIMIT:
        _, _, tok, nr = chunk_bounds(cu_seqlens, chunk_indices, i_c, BT)
        DT = q.dtype.element_ty
        off = (tok * H + i_h) * K
        aoff = (tok * H + i_h) * BT
        last = tl.minimum(nr, BT) - 1
        for c in range(0, K, BK):
            g_last = load_tile(dg_last + (i_c.to(tl.int64) * H + i_h) * K, 0, 1, K, c, K, 1, BK)
            carry = tl.zeros([1, BK], dtype=tl.float32)
            for i in tl.static_range(BT // BC - 1, -1, -1):
                r0 = i * BC
                ri = r0 + tl.arange(0, BC)
                vi = (ri < nr)[:, None]
                qi = load_tile(q + off, r0, nr, H * K, c, K, BC, BK).to(tl.float32)
                ki = load_tile(k + off, r0, nr, H * K, c, K, BC, BK).to(tl.float32)
                bi = load_tile(b + off, r0, nr, H * K, c, K, BC, BK)

                # dq_t = sum_{s <= t} dA_ts k_s exp(b_t - b_s): earlier sub-chunks through this one's first step.
                b_ref = load_tile(b + off, r0, nr, H * K, c, K, 1, BK)
                dqi = tl.zeros([BC, BK], dtype=tl.float32)
                for j in tl.static_range(i):
                    kj = load_tile(k + off, j * BC, nr, H * K, c, K, BC, BK)
                    bj = load_tile(b + off, j * BC, nr, H * K, c, K, BC, BK)
                    dA_ij = load_tile(dA + aoff, r0, nr, H * BT, j * BC, BT, BC, BC)
                    vj = (j * BC + tl.arange(0, BC) < nr)[:, None] & (r0 < nr)  # no reference past the sequence
                    dqi += mm(dA_ij.to(DT), (kj * masked_exp(b_ref - bj, vj)).to(DT), PREC)
                dqi *= masked_exp(bi - b_ref, vi)
                # dk_s = sum_{t >= s} dA_ts q_t exp(b_t - b_s): later sub-chunks through this one's last step.
                b_ref = load_tile(b + off, tl.minimum(r0 + BC - 1, last), nr, H * K, c, K, 1, BK)
                dki = tl.zeros([BC, BK], dtype=tl.float32)
                for m in tl.static_range(i + 1, BT // BC):
                    qm = load_tile(q + off, m * BC, nr, H * K, c, K, BC, BK)
                    bm = load_tile(b + off, m * BC, nr, H * K, c, K, BC, BK)
                    dA_mi_t = load_tile_t(dA + aoff, m * BC, nr, H * BT, r0, BT, BC, BC)
                    vm = (m * BC + tl.arange(0, BC) < nr)[:, None]
                    dki += mm(dA_mi_t.to(DT), (qm * masked_exp(bm - b_ref, vm)).to(DT), PREC)
                dki *= masked_exp(b_ref - bi, vi)
                # Diagonal block, exact pairwise exponents as a [t, s, key] product.
                dA_ii = load_tile(dA + aoff, r0, nr, H * BT, r0, BT, BC, BC)
                keep = vi & (ri[:, None] >= ri[None, :])
                decay = masked_exp(bi[:, None, :] - bi[None, :, :], keep[:, :, None]) * dA_ii[:, :, None]
                dqi += tl.sum(decay * ki[None, :, :], 1)
                dki += tl.sum(decay * qi[:, None, :], 0)

                dqi += load_tile(dq_in + off, r0, nr, H * K, c, K, BC, BK)
                dki += load_tile(dk_in + off, r0, nr, H * K, c, K, BC, BK)
                g_step = qi * dqi - ki * dki + tl.where((ri == last)[:, None], g_last, 0.0)
                store_tile(dq + off, dqi, r0, nr, H * K, c, K, BC, BK)
                store_tile(dk + off, dki, r0, nr, H * K, c, K, BC, BK)
                store_tile(dg + off, rev_cumsum(g_step, 0) + carry, r0, nr, H * K, c, K, BC, BK)
                carry += tl.sum(g_step, 0, keep_dims=True)


def intra_scores(q: Tensor, k: Tensor, b: Tensor, span: Tensor, chunks: Chunks) -> Tensor:
    """A [1, T, H, BT] fp32: the per-key-decayed intra-chunk scores, zero above the diagonal, written for the
    chunks past the span limit only (chunk_o factors the others)."""
    heads, dk = q.shape[2], q.shape[3]
    A = empty((*q.shape[:3], chunks.size), torch.float32, q.device)
    _intra_fwd_kernel[(chunks.num_chunks, heads)](
        q, k, b, span, A, chunks.cu_seqlens, chunks.indices,
        H=heads, K=dk, BT=chunks.size, BC=SUB, BK=KEY_SLICE, LIMIT=span_limit(q.dtype), PREC=precision(q.dtype),
    )  # fmt: skip
    return A


def intra_bwd(q: Tensor, k: Tensor, b: Tensor, span: Tensor, parts: dict, chunks: Chunks) -> None:
    """Finish dq, dk and the log-gate gradient in `parts` (chunk_o's) for the chunks past the span limit."""
    heads, dk = q.shape[2], q.shape[3]
    _intra_bwd_kernel[(chunks.num_chunks, heads)](
        q, k, b, span, parts["dA"], parts["dq_part"], parts["dk_part"], parts["dg_last"], parts["dq"], parts["dk"],
        parts["dg"], chunks.cu_seqlens, chunks.indices,
        H=heads, K=dk, BT=chunks.size, BC=SUB, BK=KEY_SLICE, LIMIT=span_limit(q.dtype), PREC=precision(q.dtype),
    )  # fmt: skip
