"""Fused step-by-step recurrence for decoding and short prefills (forward only), every gate and rule.

One program per (sequence, head, value tile) keeps its [K, BV] state in registers for all steps:
S = exp(g_t) S (g scalar or per key), u = beta (v - S^T k) for the delta rule else v, S += k u^T,
o_t = scale S^T q_t.
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
    key_row,
    key_stride,
    load_tile,
    pow2,
    seq_bounds,
    store_tile,
    warps,
)


@autotune(warps(41), key=["H", "HK", "K", "V", "BK", "BV", "GATE", "DELTA"])
@triton.jit
def _recurrent_kernel(
    q, k, v, g, beta, o, h0, ht, cu_seqlens, scale, SK,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE: tl.constexpr, DELTA: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
):  # fmt: skip
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T = seq_bounds(cu_seqlens, i_n)
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    mk, mv = ck < K, cv < V
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state += load_tile(h0 + i_nh.to(tl.int64) * K * V, 0, K, V, i_v * BV, V, BK, BV)
    for t in range(T):
        row = (bos + t) * H + i_h
        qk = key_row(bos + t, i_h, H, HK, K, SK)
        qt = tl.load(q + qk + ck, mask=mk, other=0.0).to(tl.float32)
        kt = tl.load(k + qk + ck, mask=mk, other=0.0).to(tl.float32)
        vt = tl.load(v + row * V + cv, mask=mv, other=0.0).to(tl.float32)
        if GATE == SCALAR_GATE:
            state *= tl.exp(tl.load(g + row))
        elif GATE == KEY_GATE:
            state *= tl.exp(tl.load(g + row * K + ck, mask=mk, other=0.0))[:, None]
        if DELTA:
            vt = tl.load(beta + row) * (vt - tl.sum(state * kt[:, None], 0))
        state += kt[:, None] * vt[None, :]
        tl.store(o + row * V + cv, (scale * tl.sum(state * qt[:, None], 0)).to(o.dtype.element_ty), mask=mv)
    if STORE_HT:
        store_tile(ht + i_nh.to(tl.int64) * K * V, state, 0, K, V, i_v * BV, V, BK, BV)


def fused_recurrent(
    q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], beta: Optional[Tensor], scale: float,
    h0: Optional[Tensor], chunks: Chunks, gate: int, output_final_state: bool,
) -> Tuple[Tensor, Optional[Tensor]]:  # fmt: skip
    """Outputs [1, T, H, V] in v's dtype and the final states [N, H, K, V] fp32 if asked; packed inputs (q and k
    may have fewer heads, shared by groups of H / HK)."""
    heads, dk, dv = v.shape[2], q.shape[3], v.shape[3]
    o = empty(v.shape, v.dtype, v.device)
    ht = empty((chunks.num_seqs, heads, dk, dv), torch.float32, q.device) if output_final_state else None
    bv = min(32, pow2(dv, 1))
    _recurrent_kernel[(chunks.num_seqs * heads, cdiv(dv, bv))](
        q, k, v, g, beta, o, h0, ht, chunks.cu_seqlens, scale, key_stride(q),
        H=heads, HK=q.shape[2], K=dk, V=dv, BK=pow2(dk, 1), BV=bv, GATE=gate, DELTA=beta is not None,
        HAS_H0=h0 is not None, STORE_HT=output_final_state,
    )  # fmt: skip
    return o, ht
