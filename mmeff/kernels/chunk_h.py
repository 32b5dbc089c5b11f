"""The sequential passes over chunks: chunk-entry states h_n forward, their gradients dh_n backward.

One program per (sequence, head, value tile, key tile) holds a [BK, BV] fp32 state and walks the
sequence's chunks in order (forward) or in reverse (backward); everything else is chunk-parallel (chunk_o,
chunk_gla, chunk_delta). Key rows of the state are independent except under the delta rule (v~ = u - w h
reads all of them), whose programs hold every key. With gate cumsum b (chunk-local), per chunk:

    forward:  h_{n+1} = exp(b_C) h_n + (k * exp(b_C - b))^T v~        (v~ = v, or u - w h_n for the delta rule)
    backward: dh_n    = exp(b_C) dh_{n+1} + scale (q * exp(b))^T do    (- w^T dv~ for the delta rule, with
              dv~ = (k * exp(b_C - b)) dh_{n+1} + dv_local computed and stored here)
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmeff.kernels.utils import (
    KEY_GATE,
    SCALAR_GATE,
    Chunks,
    autotune,
    cdiv,
    empty,
    load_tile,
    load_tile_t,
    key_row,
    key_stride,
    load_vec,
    masked_exp,
    mm,
    pow2,
    precision,
    seq_bounds,
    sm_count,
    store_tile,
    warps,
)


@triton.jit
def scalar_gate(b, tok, nr, i_h, H: tl.constexpr, BT: tl.constexpr):
    """Scalar gate cumsum of one chunk: b [BT] (zero past the sequence) and its last valid value b_C."""
    return load_vec(b + tok * H + i_h, 0, nr, H, BT), tl.load(b + (tok + tl.minimum(nr, BT) - 1) * H + i_h)


@triton.jit
def chunk_decay(b, tok, nr, i_h, ck, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                GATE: tl.constexpr):  # fmt: skip
    """Decays of one chunk for keys ck..ck+BK, as [BK, BT] (key, step): exp(b) (start -> step) and
    exp(b_C - b) (step -> end), and exp(b_C) [BK, 1] (whole chunk); ones where there is no gate, zeros on
    rows past the sequence."""
    rows = tl.arange(0, BT)
    valid = (rows < nr)[None, :]
    last = tl.minimum(nr, BT) - 1
    if GATE == SCALAR_GATE:
        bc, bl = scalar_gate(b, tok, nr, i_h, H, BT)
        bc = bc[None, :]
        return masked_exp(bc, valid), masked_exp(bl - bc, valid), tl.zeros([BK, 1], dtype=tl.float32) + tl.exp(bl)
    elif GATE == KEY_GATE:
        bc = load_tile_t(b + (tok * H + i_h) * K, 0, nr, H * K, ck, K, BT, BK)
        keys = ck + tl.arange(0, BK)
        bl = tl.load(b + ((tok + last) * H + i_h) * K + keys, mask=keys < K, other=0.0)[:, None]
        return masked_exp(bc, valid), masked_exp(bl - bc, valid), tl.exp(bl)
    else:
        ones = tl.where(valid, 1.0, 0.0) + tl.zeros([BK, 1], dtype=tl.float32)
        return ones, ones, tl.zeros([BK, 1], dtype=tl.float32) + 1.0


@autotune(warps(42, 43), key=["H", "HK", "K", "V", "BT", "BK", "BV", "GATE", "DELTA"])
@triton.jit
def _fwd_h_kernel(
    k, v, w, b, h, v_new, h0, ht, cu_seqlens, chunk_offsets, SK,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, GATE: tl.constexpr, DELTA: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    i_nh, i_v, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T = seq_bounds(cu_seqlens, i_n)
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    cv, ck = i_v * BV, i_k * BK
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state += load_tile(h0 + i_nh.to(tl.int64) * K * V, ck, K, V, cv, V, BK, BV)
    for i_t in range(tl.cdiv(T, BT)):
        tok = bos + i_t * BT
        nr = T - i_t * BT
        store_tile(h + ((c0 + i_t) * H + i_h) * K * V, state, ck, K, V, cv, V, BK, BV)
        kt = load_tile_t(k + key_row(tok, i_h, H, HK, K, SK), 0, nr, SK, ck, K, BT, BK)
        vc = load_tile(v + (tok * H + i_h) * V, 0, nr, H * V, cv, V, BT, BV)
        if DELTA:
            wc = load_tile(w + (tok * H + i_h) * K, 0, nr, H * K, 0, K, BT, BK)
            vc = vc.to(tl.float32) - mm(wc, state, PREC)
            store_tile(v_new + (tok * H + i_h) * V, vc, 0, nr, H * V, cv, V, BT, BV)
        _, to_end, whole = chunk_decay(b, tok, nr, i_h, ck, H, K, BT, BK, GATE)
        state = state * whole + mm((kt * to_end).to(k.dtype.element_ty), vc, PREC)
    if STORE_HT:
        store_tile(ht + i_nh.to(tl.int64) * K * V, state, ck, K, V, cv, V, BK, BV)


@autotune(warps(42, 43), key=["H", "HK", "K", "V", "BT", "BK", "BV", "GATE", "DELTA"])
@triton.jit
def _bwd_dh_kernel(
    q, k, w, b, do, dv_local, dh, dv_new, dht, dh0, cu_seqlens, chunk_offsets, scale, SK,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, GATE: tl.constexpr, DELTA: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    i_nh, i_v, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T = seq_bounds(cu_seqlens, i_n)
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    cv, ck = i_v * BV, i_k * BK
    NT = tl.cdiv(T, BT)
    grad = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        grad += load_tile(dht + i_nh.to(tl.int64) * K * V, ck, K, V, cv, V, BK, BV)
    for j in range(NT):
        i_t = NT - 1 - j
        tok = bos + i_t * BT
        nr = T - i_t * BT
        store_tile(dh + ((c0 + i_t) * H + i_h) * K * V, grad, ck, K, V, cv, V, BK, BV)
        from_start, to_end, whole = chunk_decay(b, tok, nr, i_h, ck, H, K, BT, BK, GATE)
        qt = load_tile_t(q + key_row(tok, i_h, H, HK, K, SK), 0, nr, SK, ck, K, BT, BK)
        doc = load_tile(do + (tok * H + i_h) * V, 0, nr, H * V, cv, V, BT, BV)
        update = mm((qt * from_start * scale).to(q.dtype.element_ty), doc, PREC)
        if DELTA:
            kc = load_tile(k + key_row(tok, i_h, H, HK, K, SK), 0, nr, SK, 0, K, BT, BK)
            if GATE == SCALAR_GATE:
                bc, bl = scalar_gate(b, tok, nr, i_h, H, BT)
                kc = kc * masked_exp(bl - bc, tl.arange(0, BT) < nr)[:, None]
            dvc = load_tile(dv_local + (tok * H + i_h) * V, 0, nr, H * V, cv, V, BT, BV)
            dvc += mm(kc.to(k.dtype.element_ty), grad, PREC)
            store_tile(dv_new + (tok * H + i_h) * V, dvc, 0, nr, H * V, cv, V, BT, BV)
            wt = load_tile_t(w + (tok * H + i_h) * K, 0, nr, H * K, 0, K, BT, BK)
            update -= mm(wt, dvc, PREC)
        grad = grad * whole + update
    if STORE_DH0:
        store_tile(dh0 + i_nh.to(tl.int64) * K * V, grad, ck, K, V, cv, V, BK, BV)


def state_blocks(K: int, V: int, programs: int, split_keys: bool, device: torch.device) -> Tuple[int, int]:
    """Key and value tiles of a sequential pass: the larger one halved (keys down to 32 where they may be
    split, values down to 16) while too few programs would leave SMs idle: fewer than two a SM, or one under the
    delta rule, whose programs hold every key and so each read the chunk's whole w and k again. At gated_deltanet's
    LM size on the H200 (4 x 8 sequence-heads, K 128, V 256) value tiles of 32 in place of 16 took the forward pass
    0.34 -> 0.17 ms a call and the backward 0.51 -> 0.28 ms (benchmarks/results/state_tiles_draft_h200.md); deltanet's
    (V 128) stay at 16."""
    bk, bv = pow2(K), min(64, pow2(V))
    enough = (2 if split_keys else 1) * sm_count(device)
    while programs * cdiv(K, bk) * cdiv(V, bv) < enough:
        if split_keys and bk > 32 and bk >= bv:
            bk //= 2
        elif bv > 16:
            bv //= 2
        else:
            break
    return bk, bv


def fwd_h(
    k: Tensor,
    v: Tensor,
    w: Optional[Tensor],
    b: Optional[Tensor],
    h0: Optional[Tensor],
    chunks: Chunks,
    gate: int,
    output_final_state: bool,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Chunk-entry states h [NT, H, K, V] (k's dtype), v~ = u - w h for the delta rule (w given, v = u),
    and the final states [N, H, K, V] fp32 if asked."""
    heads, dk, dv = v.shape[2], k.shape[3], v.shape[3]
    bk, bv = state_blocks(dk, dv, chunks.num_seqs * heads, w is None, k.device)
    h = empty((chunks.num_chunks, heads, dk, dv), k.dtype, k.device)
    v_new = empty(v.shape, v.dtype, v.device) if w is not None else None
    ht = empty((chunks.num_seqs, heads, dk, dv), torch.float32, k.device) if output_final_state else None
    _fwd_h_kernel[(chunks.num_seqs * heads, cdiv(dv, bv), cdiv(dk, bk))](
        k, v, w, b, h, v_new, h0, ht, chunks.cu_seqlens, chunks.offsets, key_stride(k),
        H=heads, HK=k.shape[2], K=dk, V=dv, BT=chunks.size, BK=bk, BV=bv,
        GATE=gate, DELTA=w is not None, HAS_H0=h0 is not None, STORE_HT=output_final_state, PREC=precision(k.dtype),
    )  # fmt: skip
    return h, v_new, ht


def bwd_dh(
    q: Tensor,
    k: Tensor,
    w: Optional[Tensor],
    b: Optional[Tensor],
    do: Tensor,
    dv_local: Optional[Tensor],
    dht: Optional[Tensor],
    chunks: Chunks,
    gate: int,
    scale: float,
    initial_grad: bool,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Gradients dh [NT, H, K, V] w.r.t. each chunk's exit state, the initial-state gradient [N, H, K, V]
    fp32 if asked, and for the delta rule (w given) the full gradient of v~, in k's dtype."""
    heads, dk, dv = do.shape[2], q.shape[3], do.shape[3]
    bk, bv = state_blocks(dk, dv, chunks.num_seqs * heads, w is None, q.device)
    dh = empty((chunks.num_chunks, heads, dk, dv), q.dtype, q.device)
    # v~'s gradient in the inputs' dtype: its readers (chunk_o's dw, wy_bwd) take it as a matmul operand in that dtype,
    # so an fp32 copy held 2 bytes an element more through the backward's peak and nothing more exact.
    dv_new = empty(do.shape, k.dtype, do.device) if w is not None else None
    dh0 = empty((chunks.num_seqs, heads, dk, dv), torch.float32, q.device) if initial_grad else None
    _bwd_dh_kernel[(chunks.num_seqs * heads, cdiv(dv, bv), cdiv(dk, bk))](
        q, k, w, b, do, dv_local, dh, dv_new, dht, dh0, chunks.cu_seqlens, chunks.offsets, scale, key_stride(q),
        H=heads, HK=q.shape[2], K=dk, V=dv, BT=chunks.size, BK=bk, BV=bv,
        GATE=gate, DELTA=w is not None, HAS_DHT=dht is not None, STORE_DH0=initial_grad, PREC=precision(q.dtype),
    )  # fmt: skip
    return dh, dh0, dv_new
