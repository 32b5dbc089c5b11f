"""Non-causal linear attention: every token reads one state summed over its whole sequence, no scan.

o_t = scale * q_t^T S with S = sum_s k_s v_s^T over the token's sequence (Katharopoulos et al., 2020,
the non-causal form). Layout [B, T, H, D] as the other linear ops.

The heads are not taken apart: with q, k and v flattened to [B, T, H*D], S of every head is a diagonal block of one
[H*K, H*V] matrix, so the state and the output are each one batched GEMM over the tokens as they lie, where per-head
einsums copied q, k, v and o into head-major order. The off-diagonal blocks cost H times the per-head matmul FLOPs:
2 T (H K)(H V) a GEMM, as much as a [H*K -> H*V] projection. In the ViT-S of benchmarks/vision_speed.py at 2048 px on
the H200 (16,384 tokens a sequence, H = 6) the step's copies took 27.5 of its 86 GPU ms with the per-head einsums,
most of them theirs; with these GEMMs the step took 64 GPU ms (vision_speed_h200.md, profiles of runs 12 and 14).

`feature_map` (identity, elu (elu+1), relu; others through mmeff.ops.features) is applied to q and k by the op:
backend "triton" runs mmeff.kernels.noncausal, which fuses it and the normaliser into four kernels (CUDA); "torch"
the GEMMs above, with phi(q), phi(k) recomputed in the backward (a checkpoint) rather than kept.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from mmeff.ops import dispatch
from mmeff.ops.custom_ops import global_linear_attention_op
from mmeff.ops.dispatch import Backend
from mmeff.ops.features import FEATURE_MAPS
from mmeff.ops.varlen import host_bounds

__all__ = ["global_linear_attention"]

_ALIGN = 8  # the normaliser's H columns padded so the output rows stay 16-byte aligned in bf16


def global_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: Optional[float] = None,
    cu_seqlens: Optional[Tensor] = None,
    normalize: bool = False,
    eps: float = 1e-6,
    feature_map: str = "identity",
    *,
    backend: Backend = "auto",
) -> Tensor:
    """q, k [B, T, H, K], v [B, T, H, V] -> o [B, T, H, V] in v's dtype, over phi(q), phi(k) (`feature_map`);
    `cu_seqlens` (int32 [N+1], batch 1) packs N sequences along T, each summing its own state. `normalize` divides by
    scale * phi(q_t)^T sum_s phi(k_s) + eps (the paper's normaliser), computed from the summed keys rather than a
    ones channel appended to v."""
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)}, got {feature_map!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is not None:
        if q.shape[0] != 1:
            raise ValueError(f"cu_seqlens packs sequences along T of one row, got batch {q.shape[0]}")
        bounds = host_bounds(cu_seqlens)
        parts = [
            global_linear_attention(q[:, a:b], k[:, a:b], v[:, a:b], scale, None, normalize, eps, feature_map, backend=backend)
            for a, b in zip(bounds[:-1], bounds[1:])
        ]
        return torch.cat(parts, dim=1)

    def triton() -> str:
        if not q.numel() or not v.numel():
            return "empty input"
        if dispatch.exporting():
            return "torch.export (ONNX has no lowering of the custom op)"
        return dispatch.triton_unsupported(q, "noncausal", lambda kernels: kernels.unsupported(q, v, feature_map))

    if dispatch.choose("global_linear_attention", backend, [("triton", triton)]) == "triton":
        return global_linear_attention_op(q, k, v, scale, normalize, eps, feature_map)
    if feature_map == "identity":
        return _GlobalLinearAttention.apply(q, k, v, scale, normalize, eps)
    # phi(q), phi(k) recomputed in the backward: the op keeps q, k, v, views of the one qkv projection. In the ViT-S
    # of benchmarks/vision_speed.py (bf16 autocast, CPU census of saved tensors) that took the layer from 15.5 to 13.8
    # KiB kept per token, softmax attention's 13.8.
    return checkpoint(_mapped, q, k, v, scale, normalize, eps, feature_map, use_reentrant=False)


def _mapped(q: Tensor, k: Tensor, v: Tensor, scale: float, normalize: bool, eps: float, feature_map: str) -> Tensor:
    """The reference over phi(q), phi(k) in v's dtype."""
    phi = FEATURE_MAPS[feature_map]
    return _GlobalLinearAttention.apply(phi(q).to(v.dtype), phi(k).to(v.dtype), v, scale, normalize, eps)


def _heads(rows: int, cols: int, H: int, device: torch.device) -> Tensor:
    """[rows, cols] bool, true where row and column belong to the same of H equal head blocks."""
    return (torch.arange(rows, device=device) // (rows // H))[:, None] == (torch.arange(cols, device=device) // (cols // H))


def _reader(k: Tensor, v: Tensor, scale: float, normalize: bool) -> Tensor:
    """What q is multiplied by: [B, H*K, H*V (+ padded H)], the block-diagonal state scaled, then (normalising) the
    summed keys of head h in column H*V + h."""
    B, T, H, K = k.shape
    k2, v2 = k.flatten(2), v.flatten(2)
    S = torch.bmm(k2.transpose(1, 2), v2)
    S = S * (_heads(H * K, H * v.shape[-1], H, S.device) * scale).to(S.dtype)
    if not normalize:
        return S
    z = k2.sum(1).to(S.dtype)  # [B, H*K]; CUDA autocast sums in fp32, and the backward runs outside autocast
    Z = z.unsqueeze(-1) * (_heads(H * K, H, H, z.device) * scale).to(z.dtype)
    pad = S.new_zeros(B, H * K, -(-H // _ALIGN) * _ALIGN - H)
    return torch.cat([S, Z, pad], dim=-1)


def _read(q2: Tensor, R: Tensor, H: int, V: int, eps: float, normalize: bool) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """(o [B, T, H, V], numerator, normaliser [B, T, H]) of q2 [B, T, H*K] against the reader; no normaliser when
    not normalising (o is the numerator)."""
    out = torch.bmm(q2, R)
    num = out[..., : H * V].unflatten(-1, (H, V))
    if not normalize:
        return num, None, None
    den = out[..., H * V : H * V + H] + eps
    return num / den.unsqueeze(-1), num, den


class _GlobalLinearAttention(torch.autograd.Function):
    """The op with hand-written gradients: it keeps q, k, v and the [B, H*K, H*V] reader for the backward, where
    autograd through the einsums kept their permuted copies and the normaliser's operands as well."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float, normalize: bool, eps: float) -> Tensor:  # type: ignore[override]
        R = _reader(k, v, scale, normalize)
        o, _, _ = _read(q.flatten(2), R, q.shape[2], v.shape[-1], eps, normalize)
        ctx.save_for_backward(q, k, v, R)
        ctx.scale, ctx.eps, ctx.normalize = scale, eps, normalize
        return o.to(v.dtype)

    @staticmethod
    def backward(ctx, do: Tensor):  # type: ignore[override]
        q, k, v, R = ctx.saved_tensors
        B, T, H, K = q.shape
        V = v.shape[-1]
        q2, k2, v2 = q.flatten(2), k.flatten(2), v.flatten(2)
        do = do.to(q.dtype)
        if ctx.normalize:  # o = num / den: d num = do / den, d den = -sum_v do * num / den^2
            _, num, den = _read(q2, R, H, V, ctx.eps, True)
            dnum = do / den.unsqueeze(-1)
            dden = -(dnum * num).sum(-1) / den
            dout = torch.cat([dnum.flatten(2), dden, dden.new_zeros(B, T, R.shape[-1] - H * V - H)], dim=-1)
        else:
            dout = do.flatten(2)
        dq = torch.bmm(dout, R.transpose(1, 2)).unflatten(-1, (H, K))
        dR = torch.bmm(q2.transpose(1, 2), dout) * ctx.scale
        dS = dR[..., : H * V] * _heads(H * K, H * V, H, dR.device).to(dR.dtype)
        dv = torch.bmm(k2, dS).unflatten(-1, (H, V))
        if ctx.normalize:  # z = sum_t k_t reaches every token's key gradient
            dz = (dR[..., H * V : H * V + H] * _heads(H * K, H, H, dR.device).to(dR.dtype)).sum(-1)
            dk = torch.baddbmm(dz.unsqueeze(1), v2, dS.transpose(1, 2))
        else:
            dk = torch.bmm(v2, dS.transpose(1, 2))
        return dq, dk.unflatten(-1, (H, K)), dv, None, None, None
