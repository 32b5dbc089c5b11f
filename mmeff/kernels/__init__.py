"""Triton kernels of the linear-recurrence family (linear attention, retention, GLA, (gated) delta rule, SSD).

`linear_recurrence_triton` has the semantics of `mmeff.ops.linear_recurrence` on CUDA tensors, packed
variable-length batches included; `unsupported` says why it cannot take a call (mmeff.ops.dispatch asks). Importing this
package imports Triton, so mmeff.ops imports it only when it dispatches a CUDA call.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from mmeff.kernels.chunk import ChunkRecurrence, chunk_backward, chunk_forward
from mmeff.kernels.recurrent import fused_recurrent
from mmeff.kernels.utils import KEY_GATE, NO_GATE, SCALAR_GATE, Chunks, make_chunks

__all__ = [
    "ChunkRecurrence",
    "chunk_backward",
    "chunk_forward",
    "chunk_rows",
    "linear_recurrence_triton",
    "pack",
    "unsupported",
    "MAX_HEADS",
    "MAX_KEY_DIM",
    "MAX_TOKENS",
    "RECURRENT_MAX_LEN",
]

# Widest key dimension: the backward holds a chunk's full [64, K] key tile and [K, 64] state tile.
MAX_KEY_DIM = 256
# Longest sequence the fused step-by-step kernel runs (decoding, short prefills; forward only).
RECURRENT_MAX_LEN = 16
# Tokens of a call (B * T): sequence bounds (cu_seqlens) are int32; every element offset is computed in int64.
MAX_TOKENS = 2**31
# Heads: the chunk-parallel kernels launch one grid row per head along a grid dimension of at most 65535.
MAX_HEADS = 65535
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd will need gradients of any of tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _max_len(q: Tensor, cu_seqlens: Optional[Tensor]) -> int:
    """Longest sequence of the batch (a host sync for packed batches)."""
    return q.shape[1] if cu_seqlens is None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())


def _shared_keys_refused(q: Tensor, v: Tensor, log_decay: Optional[Tensor], beta: Optional[Tensor]) -> str:
    """Why the kernels cannot read q and k shared by groups of v's heads; "" where they can or need not."""
    if q.shape[2] == v.shape[2] or not ((log_decay is not None and log_decay.dim() == 4) or beta is not None):
        return ""
    return (f"q {tuple(q.shape)} shared by groups of v's {v.shape[2]} heads with per-key decay or the delta rule "
            "(the kernels take them only under a scalar gate or none)")  # fmt: skip


def unsupported(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Optional[Tensor] = None,
    beta: Optional[Tensor] = None,
    initial_state: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    mode: str = "chunk",
) -> str:
    """Why linear_recurrence_triton cannot take this call on CUDA tensors, "" when it can: fp32/bf16/fp16,
    K <= MAX_KEY_DIM, token and head counts within the kernels' index range; per-key decay together with the
    delta rule, and mode "recurrent", only through the forward-only fused recurrent kernel; q and k with fewer heads
    than v (shared by groups) under a scalar gate or none (mmeff.ops.linear_recurrence repeats them for the others)."""
    if not {q.dtype, k.dtype, v.dtype} <= set(_DTYPES):
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype} (the kernels take float32, bfloat16, float16)"
    if q.shape[-1] > MAX_KEY_DIM:
        return f"key dim {q.shape[-1]} > {MAX_KEY_DIM}"
    tokens, heads = q.shape[0] * q.shape[1], v.shape[2]
    if tokens >= MAX_TOKENS:
        return f"B*T = {tokens} tokens (q {tuple(q.shape)}): token indices and cu_seqlens are int32, limit 2**31 - 1"
    if heads > MAX_HEADS:
        return f"{heads} heads (q {tuple(q.shape)}): a launch grid dimension holds at most {MAX_HEADS}"
    if refused := _shared_keys_refused(q, v, log_decay, beta):
        return refused
    grad = _needs_grad(q, k, v, log_decay, beta, initial_state)
    if mode == "recurrent":
        return "mode='recurrent' with gradients (the fused recurrent kernel is forward-only)" if grad else ""
    if log_decay is not None and log_decay.dim() == 4 and beta is not None:
        if grad:
            return "per-key decay with the delta rule and gradients (no chunked kernel)"
        if _max_len(q, cu_seqlens) > RECURRENT_MAX_LEN:
            return f"per-key decay with the delta rule past {RECURRENT_MAX_LEN} steps (no chunked kernel)"
    return ""


def linear_recurrence_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Optional[Tensor] = None,
    beta: Optional[Tensor] = None,
    scale: float = 1.0,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[Tensor] = None,
    chunk_size: int = 64,
    mode: str = "chunk",
) -> Tuple[Tensor, Optional[Tensor]]:
    """mmeff.ops.linear_recurrence on q, k [B,T,H,K] (or [B,T,G,K], G dividing H, for a scalar gate or none), v
    [B,T,H,V], log_decay [B,T,H] or [B,T,H,K], beta [B,T,H]; with cu_seqlens (int32 [N+1], B = 1) the N packed
    sequences are independent and initial_state / the final state are [N,H,K,V]. chunk_size is rounded to 16, 32
    or 64. Mode "recurrent" (no gradients) takes the fused step-by-step kernel, as do, without gradients, sequences
    of at most RECURRENT_MAX_LEN steps."""
    args, chunks, gate = pack(q, k, v, log_decay, beta, initial_state, cu_seqlens, chunk_size)
    grad = _needs_grad(q, k, v, log_decay, beta, initial_state)
    if mode == "recurrent" and grad:
        raise ValueError("mode='recurrent' runs the forward-only fused kernel: no gradients")
    # No chunk at all (empty sequences) leaves nothing to differentiate but has no chunk grid either.
    fused = mode == "recurrent" or (chunks.max_len <= RECURRENT_MAX_LEN and not grad) or chunks.num_chunks == 0
    if fused:
        o, ht = fused_recurrent(*args[:5], scale, args[5], chunks, gate, output_final_state)
    else:
        o, ht = ChunkRecurrence.apply(*args, scale, chunks, gate, output_final_state)
    return o.reshape(v.shape).to(v.dtype), (ht if output_final_state else None)


def chunk_rows(chunk_size: int) -> int:
    """The kernels' chunk length for a requested chunk_size: rounded up to 16, 32 or 64."""
    return 1 << max(4, min(6, (max(chunk_size, 1) - 1).bit_length()))


def pack(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Optional[Tensor],
    beta: Optional[Tensor],
    initial_state: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    chunk_size: int,
) -> Tuple[Tuple[Optional[Tensor], ...], Chunks, int]:
    """The kernels' inputs (q, k, v in their common dtype, log decay, beta, initial state in fp32; all but the
    state as [1, B*T, H, *]), their chunk layout (chunk_size rounded to 16, 32 or 64) and gate kind."""
    batch, seqlen, heads, dk = *v.shape[:3], q.shape[3]
    if refused := _shared_keys_refused(q, v, log_decay, beta):
        raise ValueError(refused)
    if cu_seqlens is not None and batch != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need batch size 1, got {batch}")
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)

    def packed(x: Optional[Tensor], to: torch.dtype) -> Optional[Tensor]:
        return None if x is None else x.to(to).reshape(1, batch * seqlen, *x.shape[2:]).contiguous()

    def keys(x: Tensor) -> Tensor:
        # Under a scalar gate or none the kernels read q and k through one token-row stride (key_row): columns of a
        # wider tensor stay views (Mamba-2's B and C, of its short conv's output); the other kernels take them dense.
        y = x.to(dtype).reshape(1, batch * seqlen, *x.shape[2:])
        return y if y.stride()[2:] == (dk, 1) and not (beta is not None or gate == KEY_GATE.value) else y.contiguous()

    chunks = make_chunks(cu_seqlens, batch, seqlen, chunk_rows(chunk_size), q.device)
    if initial_state is not None and initial_state.shape != (chunks.num_seqs, heads, dk, v.shape[-1]):
        raise ValueError(f"initial_state must be [N,H,K,V], got {tuple(initial_state.shape)}")
    gate = (NO_GATE if log_decay is None else (KEY_GATE if log_decay.dim() == 4 else SCALAR_GATE)).value
    pq, pk = keys(q), keys(k)
    if pq.stride(1) != pk.stride(1):  # one stride for both
        pq, pk = pq.contiguous(), pk.contiguous()
    args = (
        pq,
        pk,
        packed(v, dtype),
        packed(log_decay, torch.float32),
        packed(beta, torch.float32),
        None if initial_state is None else initial_state.float().contiguous(),
    )
    return args, chunks, gate
