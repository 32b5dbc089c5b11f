"""Linear-attention family as thin wrappers over the shared recurrence; layout [B, T, H, D] as in fla.

Each op takes the recurrence's options: mode (the algorithm), backend (the implementation: auto, torch, triton),
initial_state / output_final_state, and cu_seqlens (int32 [N+1], batch 1: N packed sequences, each with its own
initial and final state [N, H, K, V]).
"""

from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from mmeff.ops.dispatch import Backend
from mmeff.ops.recurrence import Mode, linear_recurrence

__all__ = ["delta_rule", "gated_delta_rule", "gated_linear_attention", "linear_attention", "retention"]


def _run(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Optional[Tensor],
    beta: Optional[Tensor],
    mode: Mode,
    chunk_size: int,
    initial_state: Optional[Tensor],
    output_final_state: bool,
    scale: Optional[float],
    cu_seqlens: Optional[Tensor],
    backend: Backend,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Call the core with fla's default scale K**-0.5."""
    return linear_recurrence(
        q,
        k,
        v,
        log_decay,
        beta,
        scale=q.shape[-1] ** -0.5 if scale is None else scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        mode=mode,
        chunk_size=chunk_size,
        cu_seqlens=cu_seqlens,
        backend=backend,
    )


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mode: Mode = "chunk",
    chunk_size: int = 64,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
    scale: Optional[float] = None,
    cu_seqlens: Optional[Tensor] = None,
    backend: Backend = "auto",
) -> Tuple[Tensor, Optional[Tensor]]:
    """Unnormalised linear attention: S_t = S_{t-1} + k_t v_t^T, o_t = scale * q_t^T S_t."""
    return _run(q, k, v, None, None, mode, chunk_size, initial_state, output_final_state, scale, cu_seqlens, backend)


def retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    mode: Mode = "chunk",
    chunk_size: int = 64,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
    scale: Optional[float] = None,
    cu_seqlens: Optional[Tensor] = None,
    backend: Backend = "auto",
) -> Tuple[Tensor, Optional[Tensor]]:
    """Retention with a fixed per-head decay: S_t = exp(log_decay_h) S_{t-1} + k_t v_t^T."""
    batch, seqlen, heads = q.shape[:3]
    if log_decay.shape != (heads,):
        raise ValueError(f"log_decay must be [H]={heads}, got {tuple(log_decay.shape)}")
    g = log_decay.float().expand(batch, seqlen, heads)
    return _run(q, k, v, g, None, mode, chunk_size, initial_state, output_final_state, scale, cu_seqlens, backend)


def gated_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_g: Tensor,
    mode: Mode = "chunk",
    chunk_size: int = 64,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
    scale: Optional[float] = None,
    cu_seqlens: Optional[Tensor] = None,
    backend: Backend = "auto",
) -> Tuple[Tensor, Optional[Tensor]]:
    """GLA, decay per key channel: S_t = diag(exp(log_g_t)) S_{t-1} + k_t v_t^T with log_g [B,T,H,K]."""
    if log_g.shape != q.shape:
        raise ValueError(f"log_g must be [B,T,H,K]={tuple(q.shape)}, got {tuple(log_g.shape)}")
    return _run(q, k, v, log_g, None, mode, chunk_size, initial_state, output_final_state, scale, cu_seqlens, backend)


def delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    mode: Mode = "chunk",
    chunk_size: int = 64,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
    scale: Optional[float] = None,
    cu_seqlens: Optional[Tensor] = None,
    backend: Backend = "auto",
) -> Tuple[Tensor, Optional[Tensor]]:
    """DeltaNet: S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T; k is expected L2-normalised."""
    return _run(q, k, v, None, beta, mode, chunk_size, initial_state, output_final_state, scale, cu_seqlens, backend)


def gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_g: Tensor,
    beta: Tensor,
    mode: Mode = "chunk",
    chunk_size: int = 64,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
    scale: Optional[float] = None,
    cu_seqlens: Optional[Tensor] = None,
    backend: Backend = "auto",
) -> Tuple[Tensor, Optional[Tensor]]:
    """Gated DeltaNet: S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, log_g [B,T,H]."""
    if log_g.shape != q.shape[:3]:
        raise ValueError(f"log_g must be [B,T,H]={tuple(q.shape[:3])}, got {tuple(log_g.shape)}")
    return _run(q, k, v, log_g, beta, mode, chunk_size, initial_state, output_final_state, scale, cu_seqlens, backend)
