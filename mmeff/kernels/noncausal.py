"""Triton kernels of non-causal linear attention with its feature map fused (mmeff.ops.noncausal's semantics):

    S = sum_t phi(k_t)^T v_t,  z = sum_t phi(k_t)   (per sequence and head, fp32)
    o_t = scale phi(q_t) S / (scale phi(q_t) . z + eps)   (without `normalize`: scale phi(q_t) S)

q, k, v [B, T, H, D] are read where they lie (views of one qkv projection: any strides but the last), raw: phi
(identity, elu+1 or relu) is applied on load, in the backward too, so only q, k, v are kept for the backward (not
phi(q), phi(k), the normaliser or the state). The PyTorch path of one ViT-S layer runs about 30 ops over whole
[B, T, H*D] tensors in its forward and backward (feature maps, normaliser, casts, the recomputation of its
checkpoint; torch.profiler on the CPU). Here the forward reads k, v once for the state and q once for the output;
the backward reads k, v for the state again, q and dy once (dq, dS, dz) and k, v once more (dk, dv).

The state kernels give each (sequence, head) several programs over stretches of the sequence (few heads and long
sequences would otherwise leave most SMs idle); their fp32 partial sums are added on the host (deterministic).
Transposed operands are loaded transposed from memory, never `tl.trans` of a computed tile (mmeff.kernels.utils).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmeff.kernels.launch import jit
from mmeff.kernels.utils import cdiv, empty, last_dim_contiguous, pow2, precision

FEATURES = {"identity": 0, "elu": 1, "relu": 2}
BLOCK_T = 64
PROGRAMS = 256  # state programs aimed for: about two per SM of an H100 / H200 (132 SMs)


@triton.jit
def _phi(x, FEATURE: tl.constexpr):
    """The feature map of fp32 x: identity, elu(x) + 1, relu."""
    if FEATURE == 1:
        return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FEATURE == 2:
        return tl.maximum(x, 0.0)
    else:
        return x


@triton.jit
def _dphi(x, FEATURE: tl.constexpr):
    """phi'(x) of fp32 x."""
    if FEATURE == 1:
        return tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FEATURE == 2:
        return tl.where(x > 0, 1.0, 0.0)
    else:
        return x * 0.0 + 1.0


@triton.jit
def _tile(ptr, b, h, t0, T, D, s_b, s_t, s_h, BT: tl.constexpr, BD: tl.constexpr, TRANS: tl.constexpr):
    """Tokens t0.. of sequence b, head h: [BT, BD] (or [BD, BT] with TRANS) as stored and its in-bounds mask."""
    t = t0 + tl.arange(0, BT)
    d = tl.arange(0, BD)
    base = ptr + b * s_b + h * s_h
    # One return: Triton 3.6 refuses returns of different shapes even under a constexpr branch (its interpreter runs
    # them)
    if TRANS:
        mask = (d < D)[:, None] & (t < T)[None, :]
        x = tl.load(base + t.to(tl.int64)[None, :] * s_t + d[:, None], mask=mask, other=0.0)
    else:
        mask = (t < T)[:, None] & (d < D)[None, :]
        x = tl.load(base + t.to(tl.int64)[:, None] * s_t + d[None, :], mask=mask, other=0.0)
    return x, mask


@triton.jit
def _features(ptr, b, h, t0, T, D, s_b, s_t, s_h, BT: tl.constexpr, BD: tl.constexpr, TRANS: tl.constexpr,
              FEATURE: tl.constexpr):  # fmt: skip
    """(phi(x), x) of a tile as fp32, phi zero out of bounds (elu+1 of a padded 0 would be 1)."""
    x, mask = _tile(ptr, b, h, t0, T, D, s_b, s_t, s_h, BT, BD, TRANS)
    x = x.to(tl.float32)
    return tl.where(mask, _phi(x, FEATURE), 0.0), x


@triton.jit
def _matrix(ptr, bh, R, C, BR: tl.constexpr, BC: tl.constexpr, TRANS: tl.constexpr):
    """[BR, BC] fp32 of the bh-th contiguous [R, C] matrix (with TRANS: of its transpose, R and C as stored)."""
    r = tl.arange(0, BR)
    c = tl.arange(0, BC)
    if TRANS:  # element (r, c) is stored at (c, r)
        x = tl.load(ptr + bh * R * C + c[None, :] * C + r[:, None], mask=(r < C)[:, None] & (c < R)[None, :], other=0.0)
    else:
        x = tl.load(ptr + bh * R * C + r[:, None] * C + c[None, :], mask=(r < R)[:, None] & (c < C)[None, :], other=0.0)
    return x


@triton.jit
def _token_tile(T, H, BT: tl.constexpr):
    """(sequence as int64, first token, head, sequence * H + head) of a program of the per-token kernels."""
    NT = tl.cdiv(T, BT)
    pid = tl.program_id(0).to(tl.int64)
    b, h = pid // NT, tl.program_id(1)
    return b, (pid % NT).to(tl.int32) * BT, h, b * H + h


@triton.jit
def _span(T, BT: tl.constexpr):
    """Tokens of the stretch of this program (axis 1 of the grid: the sequence in that many stretches): [start, end)."""
    span = tl.cdiv(tl.cdiv(T, tl.num_programs(1)), BT) * BT
    start = tl.program_id(1) * span
    return start, tl.minimum(start + span, T)


@jit
def _state_kernel(k, v, s_part, z_part, T, H, K, V, skb, skt, skh, svb, svt, svh, BT: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, FEATURE: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), bh % H
    start, end = _span(T, BT)
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    zacc = tl.zeros([BK], dtype=tl.float32)
    for t0 in range(start, end, BT):
        phik_t, _ = _features(k, b, h, t0, end, K, skb, skt, skh, BT, BK, True, FEATURE)  # [BK, BT]
        vt, _ = _tile(v, b, h, t0, end, V, svb, svt, svh, BT, BV, False)
        acc += tl.dot(phik_t.to(vt.dtype), vt, input_precision=PREC)
        zacc += tl.sum(phik_t, 1)
    part = bh * tl.num_programs(1) + tl.program_id(1)
    r, c = tl.arange(0, BK), tl.arange(0, BV)
    tl.store(s_part + part * K * V + r[:, None] * V + c[None, :], acc, mask=(r < K)[:, None] & (c < V)[None, :])
    tl.store(z_part + part * K + r, zacc, mask=r < K)


@jit
def _output_kernel(q, S, z, o, T, H, K, V, sqb, sqt, sqh, scale, eps, BT: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, FEATURE: tl.constexpr, NORMALIZE: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    b, t0, h, bh = _token_tile(T, H, BT)
    phiq, _ = _features(q, b, h, t0, T, K, sqb, sqt, sqh, BT, BK, False, FEATURE)
    state = _matrix(S, bh, K, V, BK, BV, False)
    num = tl.dot(phiq.to(q.dtype.element_ty), state.to(q.dtype.element_ty), input_precision=PREC) * scale
    if NORMALIZE:
        zk = tl.load(z + bh * K + tl.arange(0, BK), mask=tl.arange(0, BK) < K, other=0.0)
        num = num / (scale * tl.sum(phiq * zk[None, :], 1) + eps)[:, None]
    t = t0 + tl.arange(0, BT)
    c = tl.arange(0, BV)
    off = ((b * T + t.to(tl.int64)) * H + h)[:, None] * V + c[None, :]
    tl.store(o + off, num.to(o.dtype.element_ty), mask=(t < T)[:, None] & (c < V)[None, :])


@jit
def _dq_kernel(q, do, S, z, dq, ds_part, dz_part, T, H, K, V, sqb, sqt, sqh, scale, eps, BT: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr, FEATURE: tl.constexpr, NORMALIZE: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    # num = scale phi(q) S, den = scale phi(q).z + eps, o = num / den:
    #   d num = do / den, d den = -sum_v do * o / den;  d phi(q) = scale (d num S^T + d den z)
    #   dS = scale sum_t phi(q_t)^T d num_t,  dz = scale sum_t d den_t phi(q_t)   (scale applied on the host)
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), bh % H
    start, end = _span(T, BT)
    dt = q.dtype.element_ty
    state = _matrix(S, bh, K, V, BK, BV, False).to(dt)
    state_t = _matrix(S, bh, K, V, BV, BK, True).to(dt)  # [BV, BK]
    zk = tl.load(z + bh * K + tl.arange(0, BK), mask=tl.arange(0, BK) < K, other=0.0)
    ds = tl.zeros([BK, BV], dtype=tl.float32)
    dzacc = tl.zeros([BK], dtype=tl.float32)
    c = tl.arange(0, BV)
    for t0 in range(start, end, BT):
        phiq, x = _features(q, b, h, t0, end, K, sqb, sqt, sqh, BT, BK, False, FEATURE)
        phiq_t, _ = _features(q, b, h, t0, end, K, sqb, sqt, sqh, BT, BK, True, FEATURE)
        t = t0 + tl.arange(0, BT)
        rows = ((b * T + t.to(tl.int64)) * H + h)[:, None]
        g = tl.load(do + rows * V + c[None, :], mask=(t < end)[:, None] & (c < V)[None, :], other=0.0).to(tl.float32)
        if NORMALIZE:
            den = scale * tl.sum(phiq * zk[None, :], 1) + eps
            o = tl.dot(phiq.to(dt), state, input_precision=PREC) * scale / den[:, None]
            g = g / den[:, None]  # d num
            dden = -tl.sum(g * o, 1)
            dphiq = scale * (tl.dot(g.to(dt), state_t, input_precision=PREC) + dden[:, None] * zk[None, :])
            dzacc += tl.sum(phiq_t * dden[None, :], 1)
        else:
            dphiq = scale * tl.dot(g.to(dt), state_t, input_precision=PREC)
        ds += tl.dot(phiq_t.to(dt), g.to(dt), input_precision=PREC)
        r = tl.arange(0, BK)
        tl.store(dq + rows * K + r[None, :], (dphiq * _dphi(x, FEATURE)).to(dt), mask=(t < end)[:, None] & (r < K)[None, :])
    part = bh * tl.num_programs(1) + tl.program_id(1)
    r = tl.arange(0, BK)
    tl.store(ds_part + part * K * V + r[:, None] * V + c[None, :], ds, mask=(r < K)[:, None] & (c < V)[None, :])
    tl.store(dz_part + part * K + r, dzacc, mask=r < K)


@jit
def _dkv_kernel(k, v, dS, dz, dk, dv, T, H, K, V, skb, skt, skh, svb, svt, svh, BT: tl.constexpr, BK: tl.constexpr,
                BV: tl.constexpr, FEATURE: tl.constexpr, NORMALIZE: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    # S = sum_s phi(k_s)^T v_s, z = sum_s phi(k_s):  d phi(k_s) = v_s dS^T + dz,  dv_s = phi(k_s) dS
    b, t0, h, bh = _token_tile(T, H, BT)
    dt = v.dtype.element_ty
    phik, x = _features(k, b, h, t0, T, K, skb, skt, skh, BT, BK, False, FEATURE)
    vt, _ = _tile(v, b, h, t0, T, V, svb, svt, svh, BT, BV, False)
    dphik = tl.dot(vt, _matrix(dS, bh, K, V, BV, BK, True).to(dt), input_precision=PREC)  # [BT, BK]
    if NORMALIZE:
        dphik += tl.load(dz + bh * K + tl.arange(0, BK), mask=tl.arange(0, BK) < K, other=0.0)[None, :]
    grad_v = tl.dot(phik.to(dt), _matrix(dS, bh, K, V, BK, BV, False).to(dt), input_precision=PREC)
    t = t0 + tl.arange(0, BT)
    rows = ((b * T + t.to(tl.int64)) * H + h)[:, None]
    r, c = tl.arange(0, BK), tl.arange(0, BV)
    tl.store(dk + rows * K + r[None, :], (dphik * _dphi(x, FEATURE)).to(dk.dtype.element_ty), mask=(t < T)[:, None] & (r < K)[None, :])
    tl.store(dv + rows * V + c[None, :], grad_v.to(dv.dtype.element_ty), mask=(t < T)[:, None] & (c < V)[None, :])


def unsupported(q: Tensor, v: Tensor, feature_map: str) -> str:
    """Why these kernels cannot take q [B, T, H, K], v [B, T, H, V], "" when they can."""
    if feature_map not in FEATURES:
        return f"feature_map {feature_map!r} (the kernels fuse {', '.join(FEATURES)})"
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or v.dtype != q.dtype:
        return f"dtypes q {q.dtype}, v {v.dtype} (the kernels take one of float32, bfloat16, float16)"
    if max(q.shape[-1], v.shape[-1]) > 128:
        return f"head widths K {q.shape[-1]}, V {v.shape[-1]} (at most 128)"
    return ""


def _split(T: int, heads: int) -> int:
    """Programs per (sequence, head) of the state kernels."""
    return max(1, min(cdiv(T, BLOCK_T), cdiv(PROGRAMS, heads)))


def _state(k: Tensor, v: Tensor, feature: int) -> tuple[Tensor, Tensor]:
    """S [B, H, K, V] and z [B, H, K], fp32, of k and v (last dimension contiguous)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    split = _split(T, B * H)
    s_part = empty((B * H * split, K, V), torch.float32, k.device)
    z_part = empty((B * H * split, K), torch.float32, k.device)
    _state_kernel[(B * H, split)](
        k, v, s_part, z_part, T, H, K, V, *k.stride()[:3], *v.stride()[:3], BT=BLOCK_T, BK=pow2(K),
        BV=pow2(V), FEATURE=feature, PREC=precision(v.dtype),
    )  # fmt: skip
    return s_part.view(B, H, split, K, V).sum(2), z_part.view(B, H, split, K).sum(2)


def forward(q: Tensor, k: Tensor, v: Tensor, scale: float, normalize: bool, eps: float, feature_map: str) -> Tensor:
    """o [B, T, H, V] in v's dtype."""
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    B, T, H, K = q.shape
    V = v.shape[-1]
    BK, BV, feature, prec = pow2(K), pow2(V), FEATURES[feature_map], precision(v.dtype)
    S, z = _state(k, v, feature)
    o = empty((B, T, H, V), v.dtype, q.device)
    _output_kernel[(B * cdiv(T, BLOCK_T), H)](
        q, S, z, o, T, H, K, V, *q.stride()[:3], scale, eps, BT=BLOCK_T, BK=BK, BV=BV, FEATURE=feature,
        NORMALIZE=normalize, PREC=prec,
    )  # fmt: skip
    return o


def backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float, normalize: bool, eps: float, feature_map: str
             ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(dq, dk, dv), contiguous, in q's, k's and v's dtypes; the state recomputed (one more read of k and v), not kept."""
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    do = do.contiguous()
    B, T, H, K = q.shape
    V = v.shape[-1]
    BK, BV, feature, prec = pow2(K), pow2(V), FEATURES[feature_map], precision(v.dtype)
    S, z = _state(k, v, feature)
    split = _split(T, B * H)
    dq = empty(q.shape, q.dtype, q.device)
    ds_part = empty((B * H * split, K, V), torch.float32, q.device)
    dz_part = empty((B * H * split, K), torch.float32, q.device)
    _dq_kernel[(B * H, split)](
        q, do, S, z, dq, ds_part, dz_part, T, H, K, V, *q.stride()[:3], scale, eps, BT=BLOCK_T, BK=BK,
        BV=BV, FEATURE=feature, NORMALIZE=normalize, PREC=prec,
    )  # fmt: skip
    dS = ds_part.view(B, H, split, K, V).sum(2) * scale
    dz = dz_part.view(B, H, split, K).sum(2) * scale
    dk, dv = empty(k.shape, k.dtype, q.device), empty(v.shape, v.dtype, q.device)
    _dkv_kernel[(B * cdiv(T, BLOCK_T), H)](
        k, v, dS, dz, dk, dv, T, H, K, V, *k.stride()[:3], *v.stride()[:3], BT=BLOCK_T, BK=BK, BV=BV,
        FEATURE=feature, NORMALIZE=normalize, PREC=prec,
    )  # fmt: skip
    return dq, dk, dv
