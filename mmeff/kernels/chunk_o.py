"""Chunk-parallel outputs and their gradients, given the chunk-entry states of chunk_h.

Per chunk with entry state h_n, gate cumsum b and intra-chunk scores P (P_ij = q_i k_j exp(b_i - b_j)
for j <= i; GLA's per-key version comes precomputed from chunk_gla):

    o = scale * ((q * exp(b)) h_n + P v)

Backward, with dh = dL/dh_{n+1}: dq = scale (do h_n^T) exp(b) + dS k, dk = (v dh^T) exp(b_C - b) + dS^T q,
dv = (k exp(b_C - b)) dh + scale P^T do with dS = scale (do v^T) * decay; the log-decay gradient is the
reverse cumsum of q.dq - k.dk, plus exp(b_C) <h_n, dh> + sum_s k_s.dk_s(state part) at the last step.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmeff.kernels.chunk_h import scalar_gate
from mmeff.kernels.utils import (
    KEY_GATE,
    SCALAR_GATE,
    Chunks,
    autotune,
    cdiv,
    chunk_bounds,
    empty,
    key_row,
    key_stride,
    load_tile,
    load_tile_t,
    masked_exp,
    mm,
    pow2,
    precision,
    ref_row,
    rev_cumsum,
    span_limit,
    store_tile,
    warps,
)


@triton.jit
def scores_t(q, k, b, tok, nr, i_h, SK, H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
             BK: tl.constexpr, GATE: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """P^T [BT, BT] of one chunk for a scalar or no gate: (j, i) -> sum_k k_j q_i exp(b_i - b_j) for j <= i."""
    off = key_row(tok, i_h, H, HK, K, SK)
    pt = tl.zeros([BT, BT], dtype=tl.float32)
    for c in range(0, K, BK):
        kc = load_tile(k + off, 0, nr, SK, c, K, BT, BK)
        pt += mm(kc, load_tile_t(q + off, 0, nr, SK, c, K, BT, BK), PREC)
    rows = tl.arange(0, BT)
    upper = (rows[:, None] <= rows[None, :]) & (rows < nr)[None, :]
    if GATE == SCALAR_GATE:
        bc, _ = scalar_gate(b, tok, nr, i_h, H, BT)
        return pt * masked_exp(bc[None, :] - bc[:, None], upper)
    return tl.where(upper, pt, 0.0)


@triton.jit
def factored_key(k, b, off, ref, nr, c, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    """GLA's k * exp(b_ref - b) for key slice c of a chunk, loaded transposed: [BK, BT]."""
    valid = (tl.arange(0, BT) < nr)[None, :]
    b_ref = load_tile_t(b + off, ref, nr, H * K, c, K, 1, BK)
    decay = masked_exp(b_ref - load_tile_t(b + off, 0, nr, H * K, c, K, BT, BK), valid)
    return load_tile_t(k + off, 0, nr, H * K, c, K, BT, BK) * decay


@triton.jit
def gla_scores_t(qc, kc, bq, b_ref, A, fast, tok, nr, i_h, scale, H: tl.constexpr, BT: tl.constexpr,
                 PREC: tl.constexpr):  # fmt: skip
    """GLA's scale * P^T [BT, BT] of a head's chunk in qc's dtype, from its q, k [BT, BK] and gate cumsum bq with
    reference row b_ref: the factored product where `fast` (the chunk within the span limit), else chunk_gla's A."""
    rows = tl.arange(0, BT)
    valid = (rows < nr)[:, None]
    if fast:
        q_ref = (qc * masked_exp(bq - b_ref, valid)).to(qc.dtype)
        k_ref = (kc * masked_exp(b_ref - bq, valid)).to(qc.dtype)
        upper = (rows[:, None] <= rows[None, :]) & (rows < nr)[None, :]
        pt = tl.where(upper, mm(k_ref, tl.trans(q_ref), PREC), 0.0)
    else:
        pt = load_tile_t(A + (tok * H + i_h) * BT, 0, nr, H * BT, 0, BT, BT, BT)
    return (pt * scale).to(qc.dtype)


@autotune(warps(42, 82), key=["H", "HK", "K", "V", "BT", "BK", "BV", "GATE"])
@triton.jit
def _fwd_o_kernel(
    q, k, v, h, b, span, A, o, cu_seqlens, chunk_indices, scale, SK,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, GATE: tl.constexpr, LIMIT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    # GLA chunks within the span limit get their scores here as (q exp(b - b_ref)) (k exp(b_ref - b))^T; the
    # others read them from chunk_gla's sub-chunk kernel.
    i_c, i_v, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, _, tok, nr = chunk_bounds(cu_seqlens, chunk_indices, i_c, BT)
    DT = q.dtype.element_ty
    cv = i_v * BV
    rows = tl.arange(0, BT)
    off = (tok * H + i_h) * K
    qk = key_row(tok, i_h, H, HK, K, SK)  # off itself under per-key gates (q and k contiguous, HK = H)
    hp = h + (i_c.to(tl.int64) * H + i_h) * K * V
    if GATE == KEY_GATE:
        fast = tl.load(span + i_c.to(tl.int64) * H + i_h) <= LIMIT
        ref = ref_row(nr, BT)
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    s = tl.zeros([BT, BT], dtype=tl.float32)
    for c in range(0, K, BK):
        qc = load_tile(q + qk, 0, nr, SK, c, K, BT, BK)
        if GATE == KEY_GATE:
            bc = load_tile(b + off, 0, nr, H * K, c, K, BT, BK)
            if fast:
                b_ref = load_tile(b + off, ref, nr, H * K, c, K, 1, BK)
                q_ref = (qc * masked_exp(bc - b_ref, (rows < nr)[:, None])).to(DT)
                s += mm(q_ref, factored_key(k, b, off, ref, nr, c, H, K, BT, BK).to(DT), PREC)
            qc = (qc * masked_exp(bc, (rows < nr)[:, None])).to(DT)
        else:
            s += mm(qc, load_tile_t(k + qk, 0, nr, SK, c, K, BT, BK), PREC)
        acc += mm(qc, load_tile(hp, c, K, V, cv, V, BK, BV), PREC)
    causal = (rows[:, None] >= rows[None, :]) & (rows < nr)[:, None]
    if GATE == SCALAR_GATE:
        bc, _ = scalar_gate(b, tok, nr, i_h, H, BT)
        acc *= masked_exp(bc, rows < nr)[:, None]
        s *= masked_exp(bc[:, None] - bc[None, :], causal)
    elif GATE == KEY_GATE:
        if fast:
            s = tl.where(causal, s, 0.0)
        else:
            s = load_tile(A + (tok * H + i_h) * BT, 0, nr, H * BT, 0, BT, BT, BT)
    else:
        s = tl.where(causal, s, 0.0)
    vc = load_tile(v + (tok * H + i_h) * V, 0, nr, H * V, cv, V, BT, BV)
    store_tile(o + (tok * H + i_h) * V, scale * (acc + mm(s.to(DT), vc, PREC)), 0, nr, H * V, cv, V, BT, BV)


@autotune(warps(42), key=["H", "HK", "K", "V", "BT", "BK", "BV", "GATE"])
@triton.jit
def _dv_local_kernel(
    q, k, b, do, dv, cu_seqlens, chunk_indices, scale, SK,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, GATE: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    i_c, i_v, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, _, tok, nr = chunk_bounds(cu_seqlens, chunk_indices, i_c, BT)
    pt = scores_t(q, k, b, tok, nr, i_h, SK, H, HK, K, BT, BK, GATE, PREC)
    off = (tok * H + i_h) * V
    doc = load_tile(do + off, 0, nr, H * V, i_v * BV, V, BT, BV)
    store_tile(dv + off, scale * mm(pt.to(do.dtype.element_ty), doc, PREC), 0, nr, H * V, i_v * BV, V, BT, BV)


@autotune(warps(42, 82), key=["H", "K", "V", "BT", "BK", "BV"])
@triton.jit
def _gla_dv_kernel(
    q, k, b, span, A, do, dh, dv, cu_seqlens, chunk_indices, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    LIMIT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    # GLA's dv = (k exp(b_C - b)) dh + scale P^T do for one head's chunk, value tiles looped over: _bwd_dqk_kernel's
    # part where its programs take key tiles (keys of GLA_KEY_TILE or wider), P needing every key.
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    _, _, tok, nr = chunk_bounds(cu_seqlens, chunk_indices, i_c, BT)
    keys = tl.arange(0, BK)
    off = (tok * H + i_h) * K
    voff = (tok * H + i_h) * V
    dhp = dh + (i_c.to(tl.int64) * H + i_h) * K * V
    qc = load_tile(q + off, 0, nr, H * K, 0, K, BT, BK)
    kc = load_tile(k + off, 0, nr, H * K, 0, K, BT, BK)
    bq = load_tile(b + off, 0, nr, H * K, 0, K, BT, BK)
    b_ref = load_tile(b + off, ref_row(nr, BT), nr, H * K, 0, K, 1, BK)
    bl = tl.load(b + off + (tl.minimum(nr, BT) - 1) * H * K + keys, mask=keys < K, other=0.0)
    kdec = (kc * masked_exp(bl[None, :] - bq, (tl.arange(0, BT) < nr)[:, None])).to(qc.dtype)
    fast = tl.load(span + i_c.to(tl.int64) * H + i_h) <= LIMIT
    pt = gla_scores_t(qc, kc, bq, b_ref, A, fast, tok, nr, i_h, scale, H, BT, PREC)
    for cv in range(0, V, BV):
        dvc = mm(kdec, load_tile(dhp, 0, K, V, cv, V, BK, BV), PREC)
        dvc += mm(pt, load_tile(do + voff, 0, nr, H * V, cv, V, BT, BV), PREC)
        store_tile(dv + voff, dvc, 0, nr, H * V, cv, V, BT, BV)


def _sm90_safe_configs(configs: list, named_args: dict, **constexprs: object) -> list:
    """Configs of _bwd_dqk_kernel for this launch, leaving out the builds Triton 3.5 / 3.6 compile wrongly on Hopper
    for 16-bit inputs (fp32 and 2 warps are exact in every case measured):
    - GLA: 4 warps (dq, dk, dg off by 85-370% at K = 32 on an H100; kernels_notes.md);
    - no gate or a scalar gate, value tiles of 32 or less and keys of 128 or more: 4 and 8 warps (dq off by 70-86%,
      dv by 25-96% at K = 128 and 256, V = 32; at K = 256 an out-of-bounds shared-memory read, the H200's
      "illegal memory access"; tests/gpu/bisect_dqk.py, benchmarks/results/gpu_tests_h200.md)."""
    if named_args["q"].dtype == torch.float32:
        return configs
    if constexprs["GATE"] == KEY_GATE.value:
        return [c for c in configs if c.num_warps != 4]
    if not constexprs["DELTA"] and constexprs["BV"] <= 32 and constexprs["K"] >= 128:
        return [c for c in configs if c.num_warps == 2]
    return configs


@triton.jit
def _value_tile(v, do, hp, dhp, voff, nr, cv, ck, dq_acc, dk_acc, hdh, ds, H: tl.constexpr, K: tl.constexpr,
                V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """One value tile (columns cv..cv + BV) of a head's chunk: it reads v and do rows and h, dh transposed (key rows
    ck..ck + BK), and returns its do rows and h transposed (the callers' dv and dw terms read them) with the
    inter-chunk dq, dk, <h, dh> and score-gradient sums it added to."""
    vc = load_tile(v + voff, 0, nr, H * V, cv, V, BT, BV)
    doc = load_tile(do + voff, 0, nr, H * V, cv, V, BT, BV)
    h_t = load_tile_t(hp, ck, K, V, cv, V, BK, BV)
    dh_t = load_tile_t(dhp, ck, K, V, cv, V, BK, BV)
    dq_acc += mm(doc, h_t, PREC)
    dk_acc += mm(vc, dh_t, PREC)
    hdh += tl.sum(h_t.to(tl.float32) * dh_t.to(tl.float32), 0)
    ds += mm(doc, tl.trans(vc), PREC)
    return doc, h_t, dq_acc, dk_acc, hdh, ds


@triton.jit
def _dqk_head(
    q, k, v, h, dh, b, span, A, do, dv_new, dq, dk, dv, dw, dg, dq_part, dk_part, dA, dg_last, i_c, i_h, ck, tok, nr,
    scale, SK, H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, DELTA: tl.constexpr, LIMIT: tl.constexpr,
    PREC: tl.constexpr, DV: tl.constexpr,
):  # fmt: skip
    """Head i_h of chunk i_c, key columns ck..ck + BK (see _bwd_dqk_kernel): writes its dv (or dw; DV false: neither),
    dg and GLA's parts, and returns its dq, dk [BT, BK] fp32 (under a per-key gate also written here)."""
    DT = q.dtype.element_ty
    rows = tl.arange(0, BT)
    valid = rows < nr
    last = tl.minimum(nr, BT) - 1
    # Masks also drop steps past the sequence: their zero gate cumsum would make exp(b_i - b_j) overflow.
    causal = (rows[:, None] >= rows[None, :]) & valid[:, None]
    off = (tok * H + i_h) * K
    voff = (tok * H + i_h) * V
    hp = h + (i_c.to(tl.int64) * H + i_h) * K * V
    dhp = dh + (i_c.to(tl.int64) * H + i_h) * K * V
    qk = key_row(tok, i_h, H, HK, K, SK)
    qc = load_tile(q + qk, 0, nr, SK, ck, K, BT, BK)
    kc = load_tile(k + qk, 0, nr, SK, ck, K, BT, BK)

    if GATE == SCALAR_GATE:
        bc, bl = scalar_gate(b, tok, nr, i_h, H, BT)
        from_start = masked_exp(bc, valid)[:, None]
        to_end = masked_exp(bl - bc, valid)[:, None]
        whole = tl.exp(bl)
    elif GATE == KEY_GATE:
        fast = tl.load(span + i_c.to(tl.int64) * H + i_h) <= LIMIT
        keys = ck + tl.arange(0, BK)
        bq = load_tile(b + off, 0, nr, H * K, ck, K, BT, BK)
        b_ref = load_tile(b + off, ref_row(nr, BT), nr, H * K, ck, K, 1, BK)
        bl = tl.load(b + off + last * H * K + keys, mask=keys < K, other=0.0)
        from_start = masked_exp(bq, valid[:, None])
        to_end = masked_exp(bl[None, :] - bq, valid[:, None])
        whole = tl.exp(bl)
    else:
        from_start = tl.where(valid, 1.0, 0.0)[:, None]
        to_end = from_start
        whole = 1.0
    if not DELTA and DV:
        kdec = (kc * to_end).to(DT)
        if GATE == KEY_GATE:
            pt = gla_scores_t(qc, kc, bq, b_ref, A, fast, tok, nr, i_h, scale, H, BT, PREC)
        else:
            pt = (scores_t(q, k, b, tok, nr, i_h, SK, H, HK, K, BT, BK, GATE, PREC) * scale).to(DT)

    dq_acc = tl.zeros([BT, BK], dtype=tl.float32)
    dk_acc = tl.zeros([BT, BK], dtype=tl.float32)
    dw_acc = tl.zeros([BT, BK], dtype=tl.float32)
    ds = tl.zeros([BT, BT], dtype=tl.float32)
    hdh = tl.zeros([BK], dtype=tl.float32)
    for cv in range(0, V, BV):
        doc, h_t, dq_acc, dk_acc, hdh, ds = _value_tile(v, do, hp, dhp, voff, nr, cv, ck, dq_acc, dk_acc, hdh, ds,
                                                        H, K, V, BT, BK, BV, PREC)  # fmt: skip
        if DELTA:
            dw_acc += mm(load_tile(dv_new + voff, 0, nr, H * V, cv, V, BT, BV).to(DT), h_t, PREC)
        elif DV:
            dvc = mm(kdec, load_tile(dhp, 0, K, V, cv, V, BK, BV), PREC) + mm(pt, doc, PREC)
            store_tile(dv + voff, dvc, 0, nr, H * V, cv, V, BT, BV)

    dqc = dq_acc * from_start * scale
    dkc = dk_acc * to_end
    # d/d b_C of exp(b_C) h_n + sum_s exp(b_C - b_s) k_s v_s^T, the state passed to the next chunk.
    g_last = hdh * whole + tl.sum(kc.to(tl.float32) * dkc, 0)
    # The key side takes dS^T, the masked transpose of the query side's score gradient, not a product of its own.
    ds = tl.where(causal, ds * scale, 0.0)
    if GATE == KEY_GATE:
        if fast:  # the factors again rather than two more [BT, BK] fp32 tiles live across the value loop
            e_q = masked_exp(bq - b_ref, valid[:, None])
            e_k = masked_exp(b_ref - bq, valid[:, None])
            ds_dt = ds.to(DT)
            dqc += mm(ds_dt, (kc * e_k).to(DT), PREC) * e_q
            dkc += mm(tl.trans(ds_dt), (qc * e_q).to(DT), PREC) * e_k
            g_step = qc.to(tl.float32) * dqc - kc.to(tl.float32) * dkc + tl.where((rows == last)[:, None], g_last, 0.0)
            store_tile(dq + off, dqc, 0, nr, H * K, ck, K, BT, BK)
            store_tile(dk + off, dkc, 0, nr, H * K, ck, K, BT, BK)
            store_tile(dg + off, rev_cumsum(g_step, 0), 0, nr, H * K, ck, K, BT, BK)
        else:
            store_tile(dq_part + off, dqc, 0, nr, H * K, ck, K, BT, BK)
            store_tile(dk_part + off, dkc, 0, nr, H * K, ck, K, BT, BK)
            if ck == 0:  # the score gradient is the same for every key tile
                store_tile(dA + (tok * H + i_h) * BT, ds, 0, nr, H * BT, 0, BT, BT, BT)
            tl.store(dg_last + (i_c.to(tl.int64) * H + i_h) * K + keys, g_last, mask=keys < K)
    else:
        if GATE == SCALAR_GATE:
            ds *= masked_exp(bc[:, None] - bc[None, :], causal)
        ds_dt = ds.to(DT)
        dqc += mm(ds_dt, kc, PREC)
        dkc += mm(tl.trans(ds_dt), qc, PREC)
        if DELTA:
            store_tile(dw + off, -dw_acc, 0, nr, H * K, 0, K, BT, BK)
        if GATE == SCALAR_GATE:
            g_step = tl.sum(qc.to(tl.float32) * dqc, 1) - tl.sum(kc.to(tl.float32) * dkc, 1)
            g_step += tl.where(rows == last, tl.sum(g_last, 0), 0.0)
            if not DELTA:
                g_step = rev_cumsum(g_step, 0)
            tl.store(dg + (tok + rows) * H + i_h, g_step, mask=valid)
    return dqc, dkc


@triton.jit
def _dqk_group(
    q, k, v, h, dh, b, do, dv, dg, i_c, i_h0, tok, nr, scale, SK, H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr,
    V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, GH: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """Heads i_h0 .. i_h0 + GH - 1 of chunk i_c, sharing q and k (no or a scalar gate, no delta rule): writes each
    head's dv and dg, and returns their dq and dk summed, [BT, BK] fp32."""
    # What _dqk_head does a head at a time, with q k^T made once for the group and the intra-chunk terms taken through
    # the heads' summed score gradient: sum_h dS_h k = (sum_h dS_h) k, and a head's decay-gradient terms
    # q_i.(dS_h k)_i - k_i.(dS_h^T q)_i are the row and column sums of dS_h * (q k^T): 5 products a head for 9.
    DT = q.dtype.element_ty
    rows = tl.arange(0, BT)
    valid = rows < nr
    last = tl.minimum(nr, BT) - 1
    causal = (rows[:, None] >= rows[None, :]) & valid[:, None]
    qk = key_row(tok, i_h0, H, HK, K, SK)
    qc = load_tile(q + qk, 0, nr, SK, 0, K, BT, BK)
    kc = load_tile(k + qk, 0, nr, SK, 0, K, BT, BK)
    s = mm(qc, tl.trans(kc), PREC)
    dq_sum = tl.zeros([BT, BK], dtype=tl.float32)
    dk_sum = tl.zeros([BT, BK], dtype=tl.float32)
    ds_sum = tl.zeros([BT, BT], dtype=tl.float32)
    for j in range(GH):
        i_h = i_h0 + j
        voff = (tok * H + i_h) * V
        hp = h + (i_c.to(tl.int64) * H + i_h) * K * V
        dhp = dh + (i_c.to(tl.int64) * H + i_h) * K * V
        if GATE == SCALAR_GATE:
            bc, bl = scalar_gate(b, tok, nr, i_h, H, BT)
            from_start = masked_exp(bc, valid)[:, None]
            to_end = masked_exp(bl - bc, valid)[:, None]
            decay = masked_exp(bc[:, None] - bc[None, :], causal)
        else:
            from_start = tl.where(valid, 1.0, 0.0)[:, None]
            to_end = from_start
            decay = tl.where(causal, 1.0, 0.0)
        p_t = tl.trans((s * decay * scale).to(DT))
        kdec = (kc * to_end).to(DT)
        dq_acc = tl.zeros([BT, BK], dtype=tl.float32)
        dk_acc = tl.zeros([BT, BK], dtype=tl.float32)
        ds = tl.zeros([BT, BT], dtype=tl.float32)
        hdh = tl.zeros([BK], dtype=tl.float32)
        for cv in range(0, V, BV):
            doc, _, dq_acc, dk_acc, hdh, ds = _value_tile(v, do, hp, dhp, voff, nr, cv, 0, dq_acc, dk_acc, hdh, ds,
                                                          H, K, V, BT, BK, BV, PREC)  # fmt: skip
            dvc = mm(kdec, load_tile(dhp, 0, K, V, cv, V, BK, BV), PREC) + mm(p_t, doc, PREC)
            store_tile(dv + voff, dvc, 0, nr, H * V, cv, V, BT, BV)
        dqc = dq_acc * from_start * scale
        dkc = dk_acc * to_end
        ds = ds * scale * decay
        dq_sum += dqc
        dk_sum += dkc
        ds_sum += ds
        if GATE == SCALAR_GATE:
            g_last = tl.sum(hdh, 0) * tl.exp(bl) + tl.sum(tl.sum(kc.to(tl.float32) * dkc, 1), 0)
            intra = ds * s
            g_step = tl.sum(qc.to(tl.float32) * dqc - kc.to(tl.float32) * dkc, 1) + tl.sum(intra, 1) - tl.sum(intra, 0)
            g_step += tl.where(rows == last, g_last, 0.0)
            tl.store(dg + (tok + rows) * H + i_h, rev_cumsum(g_step, 0), mask=valid)
    dq_sum += mm(ds_sum.to(DT), kc, PREC)
    dk_sum += mm(tl.trans(ds_sum.to(DT)), qc, PREC)
    return dq_sum, dk_sum


@autotune(warps(82, 42, 22), key=["H", "HK", "K", "V", "BT", "BK", "BV", "GATE", "DELTA", "GH"], prune=_sm90_safe_configs)
@triton.jit
def _bwd_dqk_kernel(
    q, k, v, h, dh, b, span, A, do, dv_new, dq, dk, dv, dw, dg, dq_part, dk_part, dA, dg_last, cu_seqlens,
    chunk_indices, scale, SK, SPLIT_STRIDE,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, GATE: tl.constexpr, DELTA: tl.constexpr, LIMIT: tl.constexpr, PREC: tl.constexpr,
    GH: tl.constexpr, DV: tl.constexpr,
):  # fmt: skip
    # Full key width per program (BK >= K), but GLA keys of GLA_KEY_TILE or wider in key tiles of it (grid axis 2):
    # their dq, dk and dg columns need no other tile's keys, and dv (DV false) comes from _gla_dv_kernel. Value tiles
    # are looped over. For the delta rule v is v~ and, instead of dv, dw = -dv~ h^T is produced; dk and the decay
    # gradient are then partial (chunk_delta adds the terms of w and of the triangular solve). GLA chunks within the
    # span limit are finished here through the factored scores; for the others the inter-chunk parts of dq and dk
    # (dq_part, dk_part), the score gradient dA and the last-step decay term go to chunk_gla's sub-chunk kernel.
    # GH = 1: one head a program, its dq and dk at its own head's place ([T, H, K], also where q and k have fewer
    # heads). GH > 1 (q and k shared by groups of heads, no delta rule): GH heads of one group a program
    # (_dqk_group), their dq and dk summed here into [splits, T, HK, K] fp32 (split i_p % splits of the group; the host adds the splits),
    # which keeps the per-head copies (H / HK times q's size) out of memory.
    i_c, i_p = tl.program_id(0), tl.program_id(1)
    _, _, tok, nr = chunk_bounds(cu_seqlens, chunk_indices, i_c, BT)
    if GH == 1:
        dqc, dkc = _dqk_head(q, k, v, h, dh, b, span, A, do, dv_new, dq, dk, dv, dw, dg, dq_part, dk_part, dA, dg_last,
                             i_c, i_p, tl.program_id(2) * BK, tok, nr, scale, SK, H, HK, K, V, BT, BK, BV, GATE, DELTA,
                             LIMIT, PREC, DV)  # fmt: skip
        if GATE != KEY_GATE:
            off = (tok * H + i_p) * K
            store_tile(dq + off, dqc, 0, nr, H * K, 0, K, BT, BK)
            store_tile(dk + off, dkc, 0, nr, H * K, 0, K, BT, BK)
    else:
        dq_sum, dk_sum = _dqk_group(q, k, v, h, dh, b, do, dv, dg, i_c, i_p * GH, tok, nr, scale, SK, H, HK, K, V, BT,
                                    BK, BV, GATE, GH, PREC)  # fmt: skip
        splits = H // HK // GH
        out = (i_p % splits).to(tl.int64) * SPLIT_STRIDE + (tok * HK + i_p * GH // (H // HK)) * K
        store_tile(dq + out, dq_sum, 0, nr, HK * K, 0, K, BT, BK)
        store_tile(dk + out, dk_sum, 0, nr, HK * K, 0, K, BT, BK)


def fwd_o(
    q: Tensor, k: Tensor, v: Tensor, h: Tensor, b: Optional[Tensor], span: Optional[Tensor], A: Optional[Tensor],
    chunks: Chunks, gate: int, scale: float,
) -> Tensor:  # fmt: skip
    """Outputs [1, T, H, V] in v's dtype; A: GLA's intra-chunk scores of the chunks past the span limit."""
    heads, dk, dv = v.shape[2], q.shape[3], v.shape[3]
    o = empty(v.shape, v.dtype, v.device)
    bv = min(64, pow2(dv))
    _fwd_o_kernel[(chunks.num_chunks, cdiv(dv, bv), heads)](
        q, k, v, h, b, span, A, o, chunks.cu_seqlens, chunks.indices, scale, key_stride(q),
        H=heads, HK=q.shape[2], K=dk, V=dv, BT=chunks.size, BK=min(64, pow2(dk)), BV=bv, GATE=gate,
        LIMIT=span_limit(q.dtype), PREC=precision(q.dtype),
    )  # fmt: skip
    return o


def dv_local(q: Tensor, k: Tensor, b: Optional[Tensor], do: Tensor, chunks: Chunks, gate: int, scale: float) -> Tensor:
    """scale * P^T do per chunk, fp32: the intra-chunk part of the value gradient."""
    heads, dk, dv = do.shape[2], q.shape[3], do.shape[3]
    out = empty(do.shape, torch.float32, do.device)
    bv = min(64, pow2(dv))
    _dv_local_kernel[(chunks.num_chunks, cdiv(dv, bv), heads)](
        q, k, b, do, out, chunks.cu_seqlens, chunks.indices, scale, key_stride(q),
        H=heads, HK=q.shape[2], K=dk, V=dv, BT=chunks.size, BK=min(64, pow2(dk)), BV=bv, GATE=gate,
        PREC=precision(q.dtype),
    )  # fmt: skip
    return out


# Grouped heads (GH > 1) split each group over enough programs that a small batch still fills the GPU: the fewest
# splits (a divisor of the group's size) giving at least this many programs. Only for keys up to GROUP_KEYS wide: a
# program keeps q, k, q k^T and its dq, dk and dS sums live across its heads. Measured on an H100 (vision_speed.py and
# lm_train_speed.py, each against its own baseline row in the same process): mamba2-bi at 224 px (K 64, 12 heads a
# program) 2,010 img/s with the heads looped through _dqk_head, 2,377 through _dqk_group (a head a program: 1,971
# against 2,121 looped, an earlier machine); the LM's mamba2 at 4k (K 128, 8 heads a program, 4 splits) 181,895
# tokens/s a head a program, 203,427 through _dqk_group, peak 9.71 -> 9.54 GiB. 4,096 or 8,192 programs were no
# faster at 224 px than 1,024 (2,296 and 2,301 against 2,325 img/s).
GROUP_PROGRAMS = 1024
GROUP_KEYS = 128
# GLA's key columns per _bwd_dqk_kernel program where its keys are as wide or wider (dv then from _gla_dv_kernel).
# Measured on an H100, bf16 (benchmarks/results/kernels_notes.md, 2026-12-07): at the LM's gla (4 heads, K 128,
# V 256; B 4 x T 4,096) one program per head and chunk, holding [64, 128] fp32 dq and dk sums across the value loop,
# took 0.433 ms a call (an earlier session), key tiles of 64 0.230 ms and of 32 0.224 ms (_gla_dv_kernel 0.09 ms
# either way); at K = V = 64 (6 heads; 512 x 196 tokens) one program per head and chunk, dv included, took 0.962 ms
# (255 registers, 14 spilled: one program an SM), key tiles of 32 0.670 ms (121 registers) and _gla_dv_kernel
# 0.212 ms. At the ViT-S GLA's keys of 32 (expand_k 0.5, V 64; 512 x 196 tokens, 6 heads) dv in the same program
# held 249 registers and took 0.687 ms, made apart (one key tile) 0.336 ms at 121 registers and _gla_dv_kernel
# 0.152 ms (twentieth session; the gradients bit for bit the same).
GLA_KEY_TILE = 32


def head_splits(groups: int, programs: int) -> int:
    """Splits of each group of `groups` heads sharing q and k: the fewest (a divisor of `groups`) for which
    `programs` (chunks x key heads) times it reaches GROUP_PROGRAMS; `groups` (a head a program) at most."""
    return next(d for d in range(1, groups + 1) if groups % d == 0 and (programs * d >= GROUP_PROGRAMS or d == groups))


def bwd_dqk(
    q: Tensor, k: Tensor, v: Tensor, h: Tensor, dh: Tensor, b: Optional[Tensor], span: Optional[Tensor],
    A: Optional[Tensor], do: Tensor, dv_new: Optional[Tensor], chunks: Chunks, gate: int, scale: float,
) -> dict:  # fmt: skip
    """Gradients of one chunk pass (see _bwd_dqk_kernel): dq, dk, and dv, dw, dg, and for GLA the partial dq_part,
    dk_part, dA, dg_last of the chunks past the span limit. dq and dk have q's heads where groups of heads share q and
    k outside the delta rule (summed over each group in the kernel), else v's (chunk.py sums those over each group)."""
    heads, key_heads, dk_, dv_ = v.shape[2], q.shape[2], q.shape[3], v.shape[3]
    delta, key_gate = dv_new is not None, gate == KEY_GATE
    grouped_ok = not delta and pow2(dk_) <= GROUP_KEYS
    splits = head_splits(heads // key_heads, chunks.num_chunks * key_heads) if grouped_ok else heads // key_heads
    per_program = heads // key_heads // splits  # GH
    key_tiles = key_gate and not delta and pow2(dk_) >= GLA_KEY_TILE
    bk = GLA_KEY_TILE if key_tiles else pow2(dk_)

    def new(last: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return empty((*v.shape[:3], last), dtype, v.device)

    summed = (splits, *v.shape[:2], key_heads, dk_)
    out = {
        "dq": empty(summed, torch.float32, v.device) if per_program > 1 else new(dk_, q.dtype),
        "dk": empty(summed, torch.float32, v.device) if per_program > 1 else new(dk_, torch.float32 if delta else k.dtype),
        "dv": None if delta else new(dv_, v.dtype),
        "dw": new(dk_, k.dtype) if delta else None,  # wy_bwd reads it as a matmul operand in k's dtype (as dv_new)
        "dg": new(dk_) if key_gate else (empty(v.shape[:3], torch.float32, v.device) if gate == SCALAR_GATE else None),
        "dq_part": new(dk_) if key_gate else None,
        "dk_part": new(dk_) if key_gate else None,
        "dA": new(chunks.size) if key_gate else None,
        "dg_last": empty((chunks.num_chunks, heads, dk_), torch.float32, q.device) if key_gate else None,
    }
    names = ("dq", "dk", "dv", "dw", "dg", "dq_part", "dk_part", "dA", "dg_last")
    _bwd_dqk_kernel[(chunks.num_chunks, heads // per_program, cdiv(dk_, bk))](
        q, k, v, h, dh, b, span, A, do, dv_new, *(out[n] for n in names), chunks.cu_seqlens, chunks.indices, scale,
        key_stride(q), v.shape[1] * key_heads * dk_ if per_program > 1 else 0,  # 0: no new launch key per length
        H=heads, HK=key_heads, K=dk_, V=dv_, BT=chunks.size, BK=bk, BV=min(64, pow2(dv_)),
        GATE=gate, DELTA=delta, LIMIT=span_limit(q.dtype), PREC=precision(q.dtype), GH=per_program, DV=not key_tiles,
    )  # fmt: skip
    if key_tiles:
        _gla_dv_kernel[(chunks.num_chunks, heads)](
            q, k, b, span, A, do, dh, out["dv"], chunks.cu_seqlens, chunks.indices, scale,
            H=heads, K=dk_, V=dv_, BT=chunks.size, BK=pow2(dk_), BV=min(64, pow2(dv_)), LIMIT=span_limit(q.dtype),
            PREC=precision(q.dtype),
        )  # fmt: skip
    if per_program > 1:  # the splits added, in q's and k's dtype
        for name, like in (("dq", q), ("dk", k)):
            out[name] = out[name].sum(0).to(like.dtype)
    return out
