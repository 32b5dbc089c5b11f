"""Non-causal linear attention: every token reads one state summed over its whole sequence, no scan.

o_t = scale * q_t^T S with S = sum_s k_s v_s^T over the token's sequence (Katharopoulos et al., 2020,
the non-causal form). Two matmuls per head, O(T K V), instead of a recurrence along a route; layout
[B, T, H, D] as the other linear ops.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

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
        q = q * scale
        o = torch.einsum("bthk,bhkv->bthv", q, torch.einsum("bthk,bthv->bhkv", k, v))
        if normalize:
            o = o / (torch.einsum("bthk,bhk->bth", q, k.sum(1)).unsqueeze(-1) + eps)
        return o.to(v.dtype)
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens packs sequences along T of one row, got batch {q.shape[0]}")
    bounds = cu_seqlens.tolist()
    parts = [
        global_linear_attention(q[:, a:b], k[:, a:b], v[:, a:b], scale, None, normalize, eps)
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(parts, dim=1)
