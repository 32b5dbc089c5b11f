"""The delta rule's intra-chunk WY (UT-transform) representation and its gradient, scalar or no gate.

Within a chunk, with A_ij = beta_i <k_i, k_j> exp(b_i - b_j) for j < i and X = (I + A)^{-1}:

    w = X (beta * k * exp(b)),  u = X (beta * v),  v~ = u - w h_n

so the chunk acts like linear attention with values v~ (chunk_h computes v~ on its way; chunk_o takes
it). X is built in place in its buffer: 16 x 16 diagonal blocks inverted in registers, then merged by matmuls.
The copy of X the backward keeps holds its lower triangle only, row after row (`_packed`), in BT / 2 + 1 values a
token and head where the square took BT: a layout by token, whose shape the chunks' count does not decide.
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
def _invert_diagonal_blocks(ptr, n, sr, BT: tl.constexpr):
    """In place: each 16 x 16 diagonal block A_bb of the strictly lower A at ptr (rows >= n absent) becomes
    (I + A_bb)^{-1}, the four at once as a [4, 16, 16] tile, by forward substitution over their rows."""
    blk = tl.arange(0, 4)[:, None, None] * 16
    i = tl.arange(0, 16)[None, :, None]
    j = tl.arange(0, 16)[None, None, :]
    x = tl.where((i == j) & (blk >= 0), 1.0, 0.0)
    b2 = tl.arange(0, 4)[:, None] * 16
    j2 = tl.arange(0, 16)[None, :]
    for r in tl.static_range(1, 16):
        # Row r of every block: X_r = e_r - sum_{m < r} A_rm X_m, the rows m < r being final.
        a_r = tl.load(ptr + (b2 + r) * sr + b2 + j2, mask=(j2 < r) & (b2 + r < n), other=0.0)
        x -= tl.where(i == r, tl.sum(a_r[:, :, None] * x, 1)[:, None, :], 0.0)
    tl.debug_barrier()
    tl.store(ptr + (blk + i) * sr + blk + j, x, mask=(blk + i < n) & (blk + j < BT))


@triton.jit
def _dot(a, b):
    """Exact fp32 product of two [16, 16] blocks."""
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _invert_unit_lower(ptr, nr, sr, BT: tl.constexpr):
    """In place: the strictly lower [BT, BT] matrix A at ptr (BT <= 64, row stride sr, rows >= nr absent)
    becomes X = (I + A)^{-1}: first its 16 x 16 diagonal blocks X_ii, then each block below them,
    X_ij = -X_ii sum_{j <= m < i} A_im X_mj, by matmuls. Blocks past BT load as zero and are not stored."""
    n = tl.minimum(nr, BT)
    _invert_diagonal_blocks(ptr, n, sr, BT)
    tl.debug_barrier()
    x00 = load_tile(ptr, 0, n, sr, 0, BT, 16, 16)
    x11 = load_tile(ptr, 16, n, sr, 16, BT, 16, 16)
    x22 = load_tile(ptr, 32, n, sr, 32, BT, 16, 16)
    x33 = load_tile(ptr, 48, n, sr, 48, BT, 16, 16)
    a10 = load_tile(ptr, 16, n, sr, 0, BT, 16, 16)
    a20 = load_tile(ptr, 32, n, sr, 0, BT, 16, 16)
    a21 = load_tile(ptr, 32, n, sr, 16, BT, 16, 16)
    a30 = load_tile(ptr, 48, n, sr, 0, BT, 16, 16)
    a31 = load_tile(ptr, 48, n, sr, 16, BT, 16, 16)
    a32 = load_tile(ptr, 48, n, sr, 32, BT, 16, 16)
    x10 = -_dot(x11, _dot(a10, x00))
    x21 = -_dot(x22, _dot(a21, x11))
    x32 = -_dot(x33, _dot(a32, x22))
    x20 = -_dot(x22, _dot(a20, x00) + _dot(a21, x10))
    x31 = -_dot(x33, _dot(a31, x11) + _dot(a32, x21))
    x30 = -_dot(x33, _dot(a30, x00) + _dot(a31, x10) + _dot(a32, x20))
    tl.debug_barrier()
    store_tile(ptr, x10, 16, n, sr, 0, BT, 16, 16)
    store_tile(ptr, x20, 32, n, sr, 0, BT, 16, 16)
    store_tile(ptr, x21, 32, n, sr, 16, BT, 16, 16)
    store_tile(ptr, x30, 48, n, sr, 0, BT, 16, 16)
    store_tile(ptr, x31, 48, n, sr, 16, BT, 16, 16)
    store_tile(ptr, x32, 48, n, sr, 32, BT, 16, 16)
    tl.debug_barrier()


@triton.jit
def _packed(Xs, tok, nr, i_h, r, c, H: tl.constexpr, BT: tl.constexpr):
    """Pointers and mask of entries (r, c) of the X of the chunk from token tok (nr: the sequence's rows left), head
    i_h, kept as its lower triangle in [T, H, BT / 2 + 1]: the chunk's n token rows hold its heads one after the
    other, each its rows one after the other, row r from r (r + 1) / 2 (n (n + 1) / 2 values fit in n (BT / 2 + 1))."""
    n = tl.minimum(nr, BT)
    return Xs + (tok * H + i_h * n) * (BT // 2 + 1) + r * (r + 1) // 2 + c, (c <= r) & (r < n)


# On 4 warps Triton 3.6 miscompiles both WY kernels on an H100 at K = 128, V = 32 (u, dv, dbeta wrong; the wide-key
# GPU test) and ptxas fails on the backward at K = 256; 8 and 2 warps are right (kernels_notes.md, fifth session).
@autotune(warps(82, 22), key=["H", "K", "V", "BT", "BK", "BV", "GATE", "BUILD"])
@triton.jit
def _wy_fwd_kernel(
    k, v, b, beta, X, Xs, w, u, cu_seqlens, chunk_indices,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE: tl.constexpr, PREC: tl.constexpr, BUILD: tl.constexpr,
):  # fmt: skip
    # BUILD: X solved in its fp32 buffer X and its lower triangle written to Xs in the inputs' dtype (the copy the
    # products read); else Xs is that copy, kept from a build, and only w and u are made again from it.
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    _, _, tok, nr = chunk_bounds(cu_seqlens, chunk_indices, i_c, BT)
    DT = k.dtype.element_ty
    rows = tl.arange(0, BT)
    off = (tok * H + i_h) * K
    voff = (tok * H + i_h) * V
    xoff = (tok * H + i_h) * BT
    packed, lower = _packed(Xs, tok, nr, i_h, rows[:, None], rows[None, :], H, BT)
    kc = load_tile(k + off, 0, nr, H * K, 0, K, BT, BK)
    bet = load_vec(beta + tok * H + i_h, 0, nr, H, BT)
    if GATE == SCALAR_GATE:
        bc, _ = scalar_gate(b, tok, nr, i_h, H, BT)
        kb = kc * (bet * masked_exp(bc, rows < nr))[:, None]
    else:
        kb = kc * bet[:, None]
    if BUILD:
        strict = (rows[:, None] > rows[None, :]) & (rows < nr)[:, None]
        a = mm(kc, load_tile_t(k + off, 0, nr, H * K, 0, K, BT, BK), PREC)
        if GATE == SCALAR_GATE:
            a *= masked_exp(bc[:, None] - bc[None, :], strict)
        else:
            a = tl.where(strict, a, 0.0)
        store_tile(X + xoff, a * bet[:, None], 0, nr, H * BT, 0, BT, BT, BT)
        tl.debug_barrier()
        _invert_unit_lower(X + xoff, nr, H * BT, BT)
        x = load_tile(X + xoff, 0, nr, H * BT, 0, BT, BT, BT).to(DT)
        tl.store(packed, x, mask=lower)
    else:
        x = tl.load(packed, mask=lower, other=0.0)
    store_tile(w + off, mm(x, kb, PREC), 0, nr, H * K, 0, K, BT, BK)
    for cv in range(0, V, BV):
        vb = load_tile(v + voff, 0, nr, H * V, cv, V, BT, BV) * bet[:, None]
        store_tile(u + voff, mm(x, vb, PREC), 0, nr, H * V, cv, V, BT, BV)


@autotune(warps(82, 22), key=["H", "K", "V", "BT", "BK", "BV", "GATE"])  # no 4 warps: see _wy_fwd_kernel
@triton.jit
def _wy_bwd_kernel(
    k, v, b, beta, X, dw, du, dk_in, dg_in, dk, dv, dbeta, dg, dA, cu_seqlens, chunk_indices,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    # Transposed products are computed as such: X^T and (through the scratch buffer dA) dA^T are loaded
    # transposed from memory, never made by transposing a computed tile (see utils).
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    _, _, tok, nr = chunk_bounds(cu_seqlens, chunk_indices, i_c, BT)
    DT = k.dtype.element_ty
    rows = tl.arange(0, BT)
    valid = rows < nr
    strict = (rows[:, None] > rows[None, :]) & valid[:, None]
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
    else:
        eb = tl.where(valid, 1.0, 0.0)
        decay = tl.where(strict, 1.0, 0.0)
    packed_t, lower_t = _packed(X, tok, nr, i_h, rows[None, :], rows[:, None], H, BT)
    x_t = tl.load(packed_t, mask=lower_t, other=0.0)  # X^T
    kscale = bet * eb

    # w = X kb: d kb = X^T dw, dX = dw kb^T; u = X (beta v) likewise.
    dwc = load_tile(dw + off, 0, nr, H * K, 0, K, BT, BK)
    dkb = mm(x_t, dwc, PREC)
    dx = mm(dwc.to(DT), kt * kscale[None, :], PREC)
    dbet = tl.sum(dkb * kc * eb[:, None], 1)
    dk_w = dkb * kscale[:, None]
    for cv in range(0, V, BV):
        vc = load_tile(v + voff, 0, nr, H * V, cv, V, BT, BV)
        duc = load_tile(du + voff, 0, nr, H * V, cv, V, BT, BV)
        dx += mm(duc.to(DT), load_tile_t(v + voff, 0, nr, H * V, cv, V, BT, BV) * bet[None, :], PREC)
        dvb = mm(x_t, duc, PREC)
        dbet += tl.sum(dvb * vc, 1)
        store_tile(dv + voff, dvb * bet[:, None], 0, nr, H * V, cv, V, BT, BV)

    # X = (I + A)^{-1}: dA = -X^T dX X^T (strictly lower), with the decay folded in: da = dA * decay.
    da = -mm(mm(x_t, dx, PREC).to(DT), x_t, PREC) * decay
    store_tile(dA + xoff, da, 0, nr, H * BT, 0, BT, BT, BT)
    tl.debug_barrier()
    da_t = load_tile_t(dA + xoff, 0, nr, H * BT, 0, BT, BT, BT)
    kk = mm(kc, kt, PREC)
    dk_a = mm(da.to(DT), kc, PREC) * bet[:, None] + mm(da_t, kc * bet[:, None], PREC)
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
    """X = (I + A)^{-1}, each chunk's lower triangle in [1, T, H, BT / 2 + 1] (`_packed`), w [1, T, H, K] and u
    [1, T, H, V], all in the inputs' dtype (X is solved in fp32; w, u and the backward read it in the inputs' dtype,
    so the copy kept is in that dtype)."""
    X = empty((*k.shape[:3], chunks.size), torch.float32, k.device)
    kept = empty((*k.shape[:3], chunks.size // 2 + 1), k.dtype, k.device)
    w, u = _wy_products(k, v, b, beta, X, kept, chunks, gate, build=True)
    return kept, w, u


def wy_again(
    k: Tensor, v: Tensor, b: Optional[Tensor], beta: Tensor, X: Tensor, chunks: Chunks, gate: int
) -> Tuple[Tensor, Tensor]:
    """w and u made again from the X that wy_fwd returned (bit for bit its w and u): the backward keeps only X, which
    is a fraction of their size (fla's chunk_gated_delta_rule does the same)."""
    return _wy_products(k, v, b, beta, X, X, chunks, gate, build=False)


def _wy_products(
    k: Tensor, v: Tensor, b: Optional[Tensor], beta: Tensor, X: Tensor, kept: Tensor, chunks: Chunks, gate: int,
    build: bool,
) -> Tuple[Tensor, Tensor]:  # fmt: skip
    """w and u (and, with `build`, X solved into X and its lower triangle copied to `kept`)."""
    heads, dk, dv = k.shape[2], k.shape[3], v.shape[3]
    w, u = empty(k.shape, k.dtype, k.device), empty(v.shape, v.dtype, v.device)
    _wy_fwd_kernel[(chunks.num_chunks, heads)](
        k, v, b, beta, X, kept, w, u, chunks.cu_seqlens, chunks.indices,
        H=heads, K=dk, V=dv, BT=chunks.size, BK=pow2(dk), BV=min(64, pow2(dv)), GATE=gate,
        PREC=precision(k.dtype), BUILD=build,
    )  # fmt: skip
    return w, u


def wy_bwd(
    k: Tensor, v: Tensor, b: Optional[Tensor], beta: Tensor, X: Tensor, parts: dict, dv_new: Tensor,
    chunks: Chunks, gate: int,
) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:  # fmt: skip
    """dk, dv (inputs' dtype), dbeta and the log-decay gradient (fp32) from chunk_o's partial gradients."""
    heads, dk_, dv_ = k.shape[2], k.shape[3], v.shape[3]
    dk, dv = empty(k.shape, k.dtype, k.device), empty(v.shape, v.dtype, v.device)
    dbeta = empty(beta.shape, torch.float32, k.device)
    dg = empty(beta.shape, torch.float32, k.device) if gate == SCALAR_GATE else None
    scratch = empty((*k.shape[:3], chunks.size), k.dtype, k.device)  # dA, read back transposed
    _wy_bwd_kernel[(chunks.num_chunks, heads)](
        k, v, b, beta, X, parts["dw"], dv_new, parts["dk"], parts["dg"], dk, dv, dbeta, dg, scratch,
        chunks.cu_seqlens, chunks.indices,
        H=heads, K=dk_, V=dv_, BT=chunks.size, BK=pow2(dk_), BV=min(64, pow2(dv_)), GATE=gate,
        PREC=precision(k.dtype),
    )  # fmt: skip
    return dk, dv, dbeta, dg
