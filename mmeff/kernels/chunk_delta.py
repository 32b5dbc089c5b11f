"""The delta rule's intra-chunk WY (UT-transform) representation and its gradient, scalar or no gate.

Within a chunk, with A_ij = beta_i <k_i, k_j> exp(b_i - b_j) for j < i and X = (I + A)^{-1}:

    w = X (beta * k * exp(b)),  u = X (beta * v),  v~ = u - w h_n

so the chunk acts like linear attention with values v~ (chunk_h computes v~ on its way; chunk_o takes
it). X comes from blockwise forward substitution over sub-chunks of SUB rows, in place in its buffer.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmeff.kernels.chunk_h import scalar_gate
from mmeff.kernels.utils import (
    SCALAR_GATE,
    SUB,
    Chunks,
    autotune,
    chunk_bounds,
    empty,
    load_tile,
    load_tile_t,
    load_vec,
    masked_exp,
    mm,
    pow2,
    precision,
    rev_cumsum,
    store_tile,
    warps,
)


@triton.jit
def _solve_unit_lower(ptr, nr, sr, BT: tl.constexpr, BC: tl.constexpr):
    """In place: the strictly lower [BT, BT] matrix A at ptr (row stride sr, rows >= nr absent) becomes
    (I + A)^{-1}, one block row of BC rows at a time; its rows are rewritten only once no longer read."""
    cols = tl.arange(0, BT)
    sub = tl.arange(0, BC)
    for i in tl.static_range(BT // BC):
        r0 = i * BC
        x = tl.where((r0 + sub)[:, None] == cols[None, :], 1.0, 0.0)
        for m in tl.static_range(i):
            a_im = load_tile(ptr, r0, nr, sr, m * BC, BT, BC, BC)
            x -= tl.dot(a_im, load_tile(ptr, m * BC, nr, sr, 0, BT, BC, BT), input_precision="ieee")
        for r in range(1, BC):
            a_r = tl.load(ptr + (r0 + r) * sr + r0 + sub, mask=(sub < r) & (r0 + r < nr), other=0.0)
            x -= tl.where(sub[:, None] == r, tl.sum(a_r[:, None] * x, 0)[None, :], 0.0)
        tl.debug_barrier()
        store_tile(ptr, x, r0, nr, sr, 0, BT, BC, BT)
        tl.debug_barrier()


@autotune(warps(42), key=["H", "K", "V", "BT", "BC", "BK", "BV", "GATE"])
@triton.jit
def _wy_fwd_kernel(
    k, v, b, beta, X, w, u, cu_seqlens, chunk_indices,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, GATE: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    _, _, tok, nr = chunk_bounds(cu_seqlens, chunk_indices, i_c, BT)
    DT = k.dtype.element_ty
    rows = tl.arange(0, BT)
    strict = (rows[:, None] > rows[None, :]) & (rows < nr)[:, None]
    off = (tok * H + i_h) * K
    voff = (tok * H + i_h) * V
    xoff = (tok * H + i_h) * BT
    kc = load_tile(k + off, 0, nr, H * K, 0, K, BT, BK)
    bet = load_vec(beta + tok * H + i_h, 0, nr, H, BT)
    a = mm(kc, load_tile_t(k + off, 0, nr, H * K, 0, K, BT, BK), PREC)
    if GATE == SCALAR_GATE:
        bc, _ = scalar_gate(b, tok, nr, i_h, H, BT)
        a *= masked_exp(bc[:, None] - bc[None, :], strict)
        kb = kc * (bet * masked_exp(bc, rows < nr))[:, None]
    else:
        a = tl.where(strict, a, 0.0)
        kb = kc * bet[:, None]
    store_tile(X + xoff, a * bet[:, None], 0, nr, H * BT, 0, BT, BT, BT)
    tl.debug_barrier()
    _solve_unit_lower(X + xoff, nr, H * BT, BT, BC)
    x = load_tile(X + xoff, 0, nr, H * BT, 0, BT, BT, BT).to(DT)
    store_tile(w + off, mm(x, kb, PREC), 0, nr, H * K, 0, K, BT, BK)
    for cv in range(0, V, BV):
        vb = load_tile(v + voff, 0, nr, H * V, cv, V, BT, BV) * bet[:, None]
        store_tile(u + voff, mm(x, vb, PREC), 0, nr, H * V, cv, V, BT, BV)


@autotune(warps(42, 82), key=["H", "K", "V", "BT", "BK", "BV", "GATE"])
@triton.jit
def _wy_bwd_kernel(
    k, v, b, beta, X, dw, du, dk_in, dg_in, dk, dv, dbeta, dg, cu_seqlens, chunk_indices,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    # Transposed products are computed as such (X^T, dX^T loaded or built from transposed loads), never
    # by transposing a computed tile (see utils).
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    _, _, tok, nr = chunk_bounds(cu_seqlens, chunk_indices, i_c, BT)
    DT = k.dtype.element_ty
    rows = tl.arange(0, BT)
    valid = rows < nr
    strict = (rows[:, None] > rows[None, :]) & valid[:, None]
    strict_t = (rows[:, None] < rows[None, :]) & valid[None, :]
    off = (tok * H + i_h) * K
    voff = (tok * H + i_h) * V
    xoff = (tok * H + i_h) * BT
    kc = load_tile(k + off, 0, nr, H * K, 0, K, BT, BK)
    kt = load_tile_t(k + off, 0, nr, H * K, 0, K, BT, BK)
    bet = load_vec(beta + tok * H + i_h, 0, nr, H, BT)
    if GATE == SCALAR_GATE:
        bc, _ = scalar_gate(b, tok, nr, i_h, H, BT)
        eb = masked_exp(bc, valid)
        decay = masked_exp(bc[:, None] - bc[None, :], strict)
        decay_t = masked_exp(bc[None, :] - bc[:, None], strict_t)
    else:
        eb = tl.where(valid, 1.0, 0.0)
        decay = tl.where(strict, 1.0, 0.0)
        decay_t = tl.where(strict_t, 1.0, 0.0)
    x = load_tile(X + xoff, 0, nr, H * BT, 0, BT, BT, BT).to(DT)
    x_t = load_tile_t(X + xoff, 0, nr, H * BT, 0, BT, BT, BT).to(DT)
    kscale = bet * eb
    kb = (kc * kscale[:, None]).to(DT)

    # w = X kb: d kb = X^T dw, dX = dw kb^T (and dX^T = kb dw^T); u = X (beta v) likewise.
    dwc = load_tile(dw + off, 0, nr, H * K, 0, K, BT, BK)
    dkb = mm(x_t, dwc, PREC)
    dx = mm(dwc.to(DT), kt * kscale[None, :], PREC)
    dx_t = mm(kb, load_tile_t(dw + off, 0, nr, H * K, 0, K, BT, BK), PREC)
    dbet = tl.sum(dkb * kc * eb[:, None], 1)
    dk_w = dkb * kscale[:, None]
    for cv in range(0, V, BV):
        vc = load_tile(v + voff, 0, nr, H * V, cv, V, BT, BV)
        duc = load_tile(du + voff, 0, nr, H * V, cv, V, BT, BV)
        dx += mm(duc.to(DT), load_tile_t(v + voff, 0, nr, H * V, cv, V, BT, BV) * bet[None, :], PREC)
        dx_t += mm((vc * bet[:, None]).to(DT), load_tile_t(du + voff, 0, nr, H * V, cv, V, BT, BV), PREC)
        dvb = mm(x_t, duc, PREC)
        dbet += tl.sum(dvb * vc, 1)
        store_tile(dv + voff, dvb * bet[:, None], 0, nr, H * V, cv, V, BT, BV)

    # X = (I + A)^{-1}: dA = -X^T dX X^T (strictly lower), with the decay folded in: da = dA * decay.
    da = -mm(mm(x_t, dx, PREC).to(DT), x_t, PREC) * decay
    da_t = -mm(mm(x, dx_t, PREC).to(DT), x, PREC) * decay_t
    kk = mm(kc, kt, PREC)
    dk_a = mm(da.to(DT), kc, PREC) * bet[:, None] + mm(da_t.to(DT), kc * bet[:, None], PREC)
    dbet += tl.sum(da * kk, 1)
    dkc = load_tile(dk_in + off, 0, nr, H * K, 0, K, BT, BK) + dk_w + dk_a
    store_tile(dk + off, dkc, 0, nr, H * K, 0, K, BT, BK)
    tl.store(dbeta + (tok + rows) * H + i_h, dbet, mask=valid)
    if GATE == SCALAR_GATE:
        ga = da * kk * bet[:, None]
        g_step = load_vec(dg_in + tok * H + i_h, 0, nr, H, BT) + tl.sum(dk_w * kc, 1) + tl.sum(ga, 1) - tl.sum(ga, 0)
        tl.store(dg + (tok + rows) * H + i_h, rev_cumsum(g_step, 0), mask=valid)


def wy_fwd(
    k: Tensor, v: Tensor, b: Optional[Tensor], beta: Tensor, chunks: Chunks, gate: int
) -> Tuple[Tensor, Tensor, Tensor]:
    """X = (I + A)^{-1} [1, T, H, BT] fp32, w [1, T, H, K] and u [1, T, H, V] in the inputs' dtype."""
    heads, dk, dv = k.shape[2], k.shape[3], v.shape[3]
    X = empty((*k.shape[:3], chunks.size), torch.float32, k.device)
    w, u = empty(k.shape, k.dtype, k.device), empty(v.shape, v.dtype, v.device)
    _wy_fwd_kernel[(chunks.num_chunks, heads)](
        k, v, b, beta, X, w, u, chunks.cu_seqlens, chunks.indices,
        H=heads, K=dk, V=dv, BT=chunks.size, BC=SUB, BK=pow2(dk), BV=min(64, pow2(dv)), GATE=gate,
        PREC=precision(k.dtype),
    )  # fmt: skip
    return X, w, u


def wy_bwd(
    k: Tensor, v: Tensor, b: Optional[Tensor], beta: Tensor, X: Tensor, parts: dict, dv_new: Tensor,
    chunks: Chunks, gate: int,
) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:  # fmt: skip
    """dk, dv (inputs' dtype), dbeta and the log-decay gradient (fp32) from chunk_o's partial gradients."""
    heads, dk_, dv_ = k.shape[2], k.shape[3], v.shape[3]
    dk, dv = empty(k.shape, k.dtype, k.device), empty(v.shape, v.dtype, v.device)
    dbeta = empty(beta.shape, torch.float32, k.device)
    dg = empty(beta.shape, torch.float32, k.device) if gate == SCALAR_GATE else None
    _wy_bwd_kernel[(chunks.num_chunks, heads)](
        k, v, b, beta, X, parts["dw"], dv_new, parts["dk"], parts["dg"], dk, dv, dbeta, dg,
        chunks.cu_seqlens, chunks.indices,
        H=heads, K=dk_, V=dv_, BT=chunks.size, BK=pow2(dk_), BV=min(64, pow2(dv_)), GATE=gate,
        PREC=precision(k.dtype),
    )  # fmt: skip
    return dk, dv, dbeta, dg
