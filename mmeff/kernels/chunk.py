"""Chunked linear recurrence on the GPU: the autograd function that runs the kernels of each pass in order.

Forward: gate cumsum (utils) -> WY representation (chunk_delta, delta rule) or the GLA scores of chunks
past the span limit (chunk_gla) -> chunk-entry states (chunk_h) -> outputs (chunk_o). Backward keeps the WY
pieces of the forward but recomputes the states (and GLA's sub-chunk scores), then: dh pass (chunk_h) -> dq, dk,
dv (chunk_o) -> the kind's own finishing kernel.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from mmeff.kernels.chunk_delta import wy_bwd, wy_fwd
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


class ChunkRecurrence(torch.autograd.Function):
    """(o, final state) of packed [1, T, H, *] inputs; g is the raw log decay (fp32), beta fp32 or None."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, scale, chunks, gate, output_final_state):  # type: ignore[override]
        b, span = (None, None) if g is None else chunk_cumsum(g, chunks)
        # The WY pieces are kept for the backward (recomputing them cost a fifth of its time); states are not.
        wy = None if beta is None else wy_fwd(k, v, b, beta, chunks, gate)
        h, values, A, ht = _forward_states(q, k, v, b, span, wy, h0, chunks, gate, output_final_state)
        o = fwd_o(q, k, values, h, b, span, A, chunks, gate, scale)
        ctx.save_for_backward(q, k, v, b, span, beta, h0, *(wy or ()))
        ctx.scale, ctx.chunks, ctx.gate = scale, chunks, gate
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dht):  # type: ignore[override]
        q, k, v, b, span, beta, h0, *wy = ctx.saved_tensors
        scale, chunks, gate = ctx.scale, ctx.chunks, ctx.gate
        do = torch.zeros_like(v) if do is None else do.contiguous()
        dht = None if dht is None else dht.float().contiguous()
        X, w, _ = wy or (None, None, None)
        h, values, A, _ = _forward_states(q, k, v, b, span, wy or None, h0, chunks, gate, False)
        local = None if beta is None else dv_local(q, k, b, do, chunks, gate, scale)
        want_dh0 = h0 is not None and ctx.needs_input_grad[5]
        dh, dh0, dv_new = bwd_dh(q, k, w, b, do, local, dht, chunks, gate, scale, want_dh0)
        parts = bwd_dqk(q, k, values, h, dh, b, span, A, do, dv_new, chunks, gate, scale)
        if gate == KEY_GATE:
            intra_bwd(q, k, b, span, parts, chunks)
        dq, dk, dv, dg, dbeta = parts["dq"], parts["dk"], parts["dv"], parts["dg"], None
        if beta is not None:
            dk, dv, dbeta, dg = wy_bwd(k, v, b, beta, X, parts, dv_new, chunks, gate)
        return dq, dk, dv, dg, dbeta, dh0, None, None, None, None
