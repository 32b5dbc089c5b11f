"""Chunked linear recurrence on the GPU: the kernels of each pass in order, and the autograd function around them.

Forward: gate cumsum (utils) -> WY representation (chunk_delta, delta rule) or the GLA scores of chunks
past the span limit (chunk_gla) -> chunk-entry states (chunk_h) -> outputs (chunk_o). Backward keeps the WY
matrix X of the forward but makes its products w, u again and recomputes the states (and GLA's sub-chunk scores),
then: dh pass (chunk_h) -> dq, dk, dv (chunk_o) -> the kind's own finishing kernel.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from mmeff.kernels.chunk_delta import wy_again, wy_bwd, wy_fwd
from mmeff.kernels.chunk_gla import intra_bwd, intra_scores
from mmeff.kernels.chunk_h import bwd_dh, fwd_h
from mmeff.kernels.chunk_o import bwd_dqk, dv_local, fwd_o
from mmeff.kernels.utils import KEY_GATE, Chunks, chunk_cumsum


def _forward_states(
    q: Tensor, k: Tensor, v: Tensor, b: Optional[Tensor], span: Optional[Tensor], wy: Optional[Tuple[Tensor, ...]],
    h0: Optional[Tensor], chunks: Chunks, gate: int, output_final_state: bool,
) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:  # fmt: skip
    """Everything the outputs and gradients read besides the WY pieces `wy` = (X, w, u) of the delta rule:
    states h, the values to mix (v or v~), GLA scores A of the chunks past the span limit, the final state."""
    A = None
    if gate == KEY_GATE:
        A = intra_scores(q, k, b, span, chunks)
    w = None if wy is None else wy[1]
    h, v_new, ht = fwd_h(k, v if wy is None else wy[2], w, b, h0, chunks, gate, output_final_state)
    return h, (v if w is None else v_new), A, ht


def chunk_forward(
    q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], beta: Optional[Tensor], h0: Optional[Tensor], scale: float,
    chunks: Chunks, gate: int, output_final_state: bool,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:  # fmt: skip
    """The forward passes on packed inputs (g the raw log decay, fp32): (o, the final state or None, the delta rule's
    X for the backward or None)."""
    b, span = (None, None) if g is None else chunk_cumsum(g, chunks)
    wy = None if beta is None else wy_fwd(k, v, b, beta, chunks, gate)
    h, values, A, ht = _forward_states(q, k, v, b, span, wy, h0, chunks, gate, output_final_state)
    return fwd_o(q, k, values, h, b, span, A, chunks, gate, scale), ht, None if wy is None else wy[0]


def chunk_backward(
    q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], beta: Optional[Tensor], h0: Optional[Tensor],
    X: Optional[Tensor], do: Tensor, dht: Optional[Tensor], scale: float, chunks: Chunks, gate: int, want_dh0: bool,
) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:  # fmt: skip
    """(dq, dk, dv, d log decay, dbeta, dh0) from the output gradient `do` (contiguous) and the final state's `dht`
    (fp32 or None): the gate cumsum, the delta rule's w and u (from X, the forward's, or X solved again where None)
    and the states made again, then dh (chunk_h) -> dq, dk, dv (chunk_o) -> the kind's finishing kernel. q and k may
    have fewer heads than v (a divisor: groups of heads share them), under a scalar gate or none."""
    b, span = (None, None) if g is None else chunk_cumsum(g, chunks)
    w = u = None
    if beta is not None:
        X, w, u = wy_fwd(k, v, b, beta, chunks, gate) if X is None else (X, *wy_again(k, v, b, beta, X, chunks, gate))
    # Each buffer is dropped once its last reader is queued, so that the allocator can hand its memory to the next
    # pass's outputs: gated_deltanet-bi's training step peaked 16.6 KiB per token lower (saved_memory.py --peak). The
    # dh pass runs before the states are made again, which only chunk_o reads: the states and v~ are not held beside
    # the dh pass's buffers (dv_local's fp32 gradient among them).
    local = None if beta is None else dv_local(q, k, b, do, chunks, gate, scale)
    dh, dh0, dv_new = bwd_dh(q, k, w, b, do, local, dht, chunks, gate, scale, want_dh0)
    del local
    h, values, A, _ = _forward_states(q, k, v, b, span, None if w is None else (X, w, u), h0, chunks, gate, False)
    del u, w
    parts = bwd_dqk(q, k, values, h, dh, b, span, A, do, dv_new, chunks, gate, scale)
    del values, h, dh, A
    if gate == KEY_GATE:
        intra_bwd(q, k, b, span, parts, chunks)
    dq, dk, dv, dg, dbeta = parts["dq"], parts["dk"], parts["dv"], parts["dg"], None
    if beta is not None:
        dk, dv, dbeta, dg = wy_bwd(k, v, b, beta, X, parts, dv_new, chunks, gate)
    if dq.shape[2] != q.shape[2]:  # q and k shared by groups of heads: each head's gradient summed into its group's
        dq, dk = (d.unflatten(2, (q.shape[2], -1)).sum(3) for d in (dq, dk))
    return dq, dk, dv, dg, dbeta, dh0


class ChunkRecurrence(torch.autograd.Function):
    """(o, final state) of packed [1, T, H, *] inputs; g is the raw log decay (fp32), beta fp32 or None."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, scale, chunks, gate, output_final_state):  # type: ignore[override]
        # Of the WY pieces the backward keeps X, each chunk's lower triangle in the inputs' dtype ([T, H, 33] at
        # chunks of 64; solving it again cost a fifth of the backward's time), and makes w and u again from it in one
        # light pass (wy_again): they are as large as k and v. States are not kept, nor the gate cumsum (one cheap
        # kernel): the raw gates are kept, which a bidirectional scan keeps unstacked.
        o, ht, X = chunk_forward(q, k, v, g, beta, h0, scale, chunks, gate, output_final_state)
        ctx.save_for_backward(q, k, v, g, beta, h0, *(() if X is None else (X,)))
        ctx.scale, ctx.chunks, ctx.gate = scale, chunks, gate
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dht):  # type: ignore[override]
        q, k, v, g, beta, h0, *kept = ctx.saved_tensors
        do = torch.zeros_like(v) if do is None else do.contiguous()
        dht = None if dht is None else dht.float().contiguous()
        want_dh0 = h0 is not None and ctx.needs_input_grad[5]
        X = kept[0] if kept else None
        grads = chunk_backward(q, k, v, g, beta, h0, X, do, dht, ctx.scale, ctx.chunks, ctx.gate, want_dh0)
        return (*grads, None, None, None, None)
