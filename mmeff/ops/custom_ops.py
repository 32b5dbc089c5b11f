"""mmeff's chunked Triton recurrence as torch custom ops, so that torch.compile captures it without a graph break.

`mmeff::linear_recurrence` runs mmeff.kernels.linear_recurrence_triton; its fake implementation gives dynamo the
output shapes, and `mmeff::linear_recurrence_backward` gives the gradients. The custom op cannot keep the
forward's intermediates (their sizes depend on cu_seqlens' values), so its backward recomputes what the eager
autograd.Function of mmeff.kernels keeps (the gate cumsum, the delta rule's WY pieces), then runs that function's
backward passes (which recompute the states either way). `mmeff.ops.recurrence` takes this path only while
torch.compile traces.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from mmeff.ops import dispatch

__all__ = ["linear_recurrence_op"]


def _absent(like: Tensor) -> Tensor:
    """Stand-in for a missing optional tensor among a custom op's outputs (they cannot be None)."""
    return like.new_empty(0)


@torch.library.custom_op("mmeff::linear_recurrence", mutates_args=())
def _forward(
    q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], beta: Optional[Tensor], h0: Optional[Tensor],
    cu_seqlens: Optional[Tensor], scale: float, chunk_size: int, final: bool,
) -> Tuple[Tensor, Tensor]:  # fmt: skip
    with torch.no_grad():
        o, ht = dispatch.triton_kernels().linear_recurrence_triton(q, k, v, g, beta, scale, h0, final, cu_seqlens, chunk_size)
    return o, (ht if final else _absent(q))


@_forward.register_fake
def _(q, k, v, g, beta, h0, cu_seqlens, scale, chunk_size, final):
    seqs = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    ht = q.new_empty(seqs, q.shape[2], q.shape[3], v.shape[3], dtype=torch.float32) if final else _absent(q)
    return torch.empty_like(v), ht


@torch.library.custom_op("mmeff::linear_recurrence_backward", mutates_args=())
def _backward(
    do: Tensor, dht: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], beta: Optional[Tensor],
    h0: Optional[Tensor], cu_seqlens: Optional[Tensor], scale: float, chunk_size: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    kernels = dispatch.triton_kernels()
    args, chunks, gate = kernels.pack(q, k, v, g, beta, h0, cu_seqlens, chunk_size)
    inputs = (q, k, v, g, beta, h0)
    if chunks.num_chunks == 0:  # only empty sequences: the final states are the initial ones
        grads = [None] * 5 + [dht]
    else:
        pq, pk, pv, pg, pbeta, ph0 = args
        b, span, wy = kernels.chunk_prepare(pk, pv, pg, pbeta, chunks, gate)
        do = do.reshape(pv.shape).to(pv.dtype).contiguous()
        dht = None if dht is None else dht.float().contiguous()
        grads = kernels.chunk_backward(pq, pk, pv, b, span, pbeta, ph0, wy, do, dht, scale, chunks, gate, ph0 is not None)
    return tuple(  # type: ignore[return-value]
        _absent(q) if x is None else (torch.zeros_like(x) if d is None else d.reshape(x.shape).to(x.dtype))
        for x, d in zip(inputs, grads)
    )


@_backward.register_fake
def _(do, dht, q, k, v, g, beta, h0, cu_seqlens, scale, chunk_size):
    return tuple(_absent(q) if t is None else torch.empty_like(t) for t in (q, k, v, g, beta, h0))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, g, beta, h0, cu_seqlens, scale, chunk_size, final = inputs
    ctx.save_for_backward(q, k, v, g, beta, h0, cu_seqlens)
    ctx.scale, ctx.chunk_size, ctx.final, ctx.ht_shape = scale, chunk_size, final, output[1].shape


def _autograd(ctx, do: Optional[Tensor], dht: Optional[Tensor]):
    q, k, v, g, beta, h0, cu_seqlens = ctx.saved_tensors
    do = torch.zeros_like(v) if do is None else do
    if not ctx.final:
        dht = None
    elif dht is None:
        dht = torch.zeros(ctx.ht_shape, dtype=torch.float32, device=q.device)
    grads = _backward(do, dht, q, k, v, g, beta, h0, cu_seqlens, ctx.scale, ctx.chunk_size)
    present = [t is not None for t in (q, k, v, g, beta, h0)]
    return (*(grad if there else None for grad, there in zip(grads, present)), None, None, None, None)


_forward.register_autograd(_autograd, setup_context=_setup_context)


def linear_recurrence_op(
    q: Tensor, k: Tensor, v: Tensor, log_decay: Optional[Tensor], beta: Optional[Tensor], scale: float,
    initial_state: Optional[Tensor], output_final_state: bool, cu_seqlens: Optional[Tensor], chunk_size: int,
) -> Tuple[Tensor, Optional[Tensor]]:  # fmt: skip
    """mmeff.kernels.linear_recurrence_triton (mode "chunk") through the custom op."""
    o, ht = _forward(q, k, v, log_decay, beta, initial_state, cu_seqlens, scale, chunk_size, output_final_state)
    return o, (ht if output_final_state else None)
