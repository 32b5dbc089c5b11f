"""Non-causal linear attention: every token reads one state summed over its whole sequence, no scan.

o_t = scale * q_t^T S with S = sum_s k_s v_s^T over the token's sequence (Katharopoulos et al., 2020,
the non-causal form). Two matmuls per head, O(T K V), instead of a recurrence along a route; layout
[B, T, H, D] as the other linear ops.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from mmeff.ops.varlen import host_bounds

__all__ = ["global_linear_attention"]


def global_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: Optional[float] = None,
    cu_seqlens: Optional[Tensor] = None,
    normalize: bool = False,
    eps: float = 1e-6,
) -> Tensor:
    """q, k [B, T, H, K], v [B, T, H, V] -> o [B, T, H, V] in v's dtype; `cu_seqlens` (int32 [N+1], batch 1)
    packs N sequences along T, each summing its own state. `normalize` divides by scale * q_t^T sum_s k_s + eps
    (the paper's normaliser), computed from the summed keys rather than a ones channel appended to v."""
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is None:
        return _GlobalLinearAttention.apply(q, k, v, scale, normalize, eps)
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens packs sequences along T of one row, got batch {q.shape[0]}")
    bounds = host_bounds(cu_seqlens)
    parts = [
        global_linear_attention(q[:, a:b], k[:, a:b], v[:, a:b], scale, None, normalize, eps)
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(parts, dim=1)


def _state(k: Tensor, v: Tensor) -> Tensor:
    """S = sum_t k_t v_t^T per sequence and head: [B, T, H, K], [B, T, H, V] -> [B, H, K, V]."""
    return torch.einsum("bthk,bthv->bhkv", k, v)


def _output(qs: Tensor, S: Tensor, z: Optional[Tensor], eps: float) -> Tuple[Tensor, Optional[Tensor]]:
    """(o, its normaliser or None): o = qs S, divided by qs z + eps [B, T, H] when z (the summed keys) is given."""
    o = torch.einsum("bthk,bhkv->bthv", qs, S)
    if z is None:
        return o, None
    den = torch.einsum("bthk,bhk->bth", qs, z) + eps
    return o / den.unsqueeze(-1), den


class _GlobalLinearAttention(torch.autograd.Function):
    """The op with hand-written gradients: it keeps q, k, v and the [B, H, K, V] state for the backward, where
    autograd through the einsums kept their permuted copies and the normaliser's operands as well: in the ViT-S of
    benchmarks/vision_speed.py (bf16 autocast, CPU census of saved tensors) 17.8 KiB per token and layer, 15.5
    with this op, softmax attention's 13.8."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float, normalize: bool, eps: float) -> Tensor:  # type: ignore[override]
        S = _state(k, v)
        z = k.sum(1) if normalize else None
        o, _ = _output(q * scale, S, z, eps)
        ctx.save_for_backward(q, k, v, S, z)
        ctx.scale, ctx.eps = scale, eps
        return o.to(v.dtype)

    @staticmethod
    def backward(ctx, do: Tensor):  # type: ignore[override]
        q, k, v, S, z = ctx.saved_tensors
        S = S.to(q.dtype)
        do = do.to(q.dtype)
        qs = q * ctx.scale
        if z is not None:  # o = num / den: d num = do / den, d den = -sum_v do * o / den
            z = z.to(q.dtype)
            o, den = _output(qs, S, z, ctx.eps)
            dnum = do / den.unsqueeze(-1)
            dden = -(dnum * o).sum(-1)
        else:
            dnum, dden = do, None
        dS = torch.einsum("bthk,bthv->bhkv", qs, dnum)
        dqs = torch.einsum("bthv,bhkv->bthk", dnum, S)
        dk = torch.einsum("bthv,bhkv->bthk", v, dS)
        if dden is not None:
            dqs = dqs + dden.unsqueeze(-1) * z.unsqueeze(1)
            dk = dk + torch.einsum("bthk,bth->bhk", qs, dden).unsqueeze(1)
        dv = torch.einsum("bthk,bhkv->bthv", k, dS)
        return dqs * ctx.scale, dk, dv, None, None, None
