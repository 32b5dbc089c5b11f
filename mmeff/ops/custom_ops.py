"""mmeff's Triton kernels as torch custom ops, so that torch.compile captures them without a graph break (dynamo
cannot trace into Triton's autotuner: "Mutating a variable not in the current scope").

The grid convolution (`mmeff::grid_conv`, mmeff.kernels.conv2d) and non-causal linear attention
(`mmeff::global_linear_attention`, mmeff.kernels.noncausal) run through their ops eagerly too: their backwards need
only the inputs, so one path serves both. The short convolution (`mmeff::causal_conv`, mmeff.kernels.conv) takes
its op only while torch.compile traces; eagerly it stays the autograd.Function that the kernel tests and benchmarks
call.

The rotary embedding (`mmeff::rope`, mmeff.kernels.rope) also takes its op only while torch.compile traces. Left to
Inductor, the reference fused the angles' pow, cos and sin into each rotation, forward and backward, made again for
every element of q and k: on an H100 the four kernels took 13.9 of the compiled attn LM's 61.5 GPU ms a step at
T 4,096 (the eager kernel 1.2 ms; benchmarks/results/lm_train_speed_h100.md). Through the op the angles are made
once a layer, [T, D/2], and the kernel reads them.

`mmeff::linear_recurrence` runs mmeff.kernels.linear_recurrence_triton; its fake implementation gives dynamo the
output shapes, and `mmeff::linear_recurrence_backward` gives the gradients. Of the forward's intermediates the op
returns, for a backward, the delta rule's WY matrix X (kept by token, [1, T, H, BT / 2 + 1]: a shape the inputs
give, where the chunks' count depends on cu_seqlens' values); its backward makes the gate cumsum again, as the eager
autograd.Function of mmeff.kernels does, then runs that function's backward passes (which recompute the states
either way). Until X was kept, the backward solved it again: a fifth of the eager backward's time when measured.
`mmeff.ops.recurrence` takes this path only while torch.compile traces.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from mmeff.ops import dispatch

__all__ = ["bidirectional_gla_op", "causal_conv_op", "global_linear_attention_op", "grid_conv_op", "linear_recurrence_op", "rope_op"]


def _absent(like: Tensor) -> Tensor:
    """Stand-in for a missing optional tensor among a custom op's outputs (they cannot be None)."""
    return like.new_empty(0)


@torch.library.custom_op("mmeff::linear_recurrence", mutates_args=())
def _forward(
    q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], beta: Optional[Tensor], h0: Optional[Tensor],
    cu_seqlens: Optional[Tensor], scale: float, chunk_size: int, final: bool, keep_wy: bool,
) -> Tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(o, the final state, the delta rule's X where `keep_wy` asks for it and beta is given; absent ones empty)."""
    kernels = dispatch.triton_kernels()
    if _keeps_wy(beta, keep_wy):
        args, chunks, gate = kernels.pack(q, k, v, g, beta, h0, cu_seqlens, chunk_size)
        if chunks.num_chunks:
            with torch.no_grad():
                o, ht, X = kernels.chunk_forward(*args, scale, chunks, gate, final)
            return o.reshape(v.shape).to(v.dtype), (ht if final else _absent(q)), X
    with torch.no_grad():
        o, ht = kernels.linear_recurrence_triton(q, k, v, g, beta, scale, h0, final, cu_seqlens, chunk_size)
    X = _wy_like(q, k, v, chunk_size) if _keeps_wy(beta, keep_wy) else _absent(q)  # no chunk: never read
    return o, (ht if final else _absent(q)), X


@_forward.register_fake
def _(q, k, v, g, beta, h0, cu_seqlens, scale, chunk_size, final, keep_wy):
    seqs = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    ht = q.new_empty(seqs, v.shape[2], q.shape[3], v.shape[3], dtype=torch.float32) if final else _absent(q)
    return torch.empty_like(v), ht, _wy_like(q, k, v, chunk_size) if _keeps_wy(beta, keep_wy) else _absent(q)


def _keeps_wy(beta: Optional[Tensor], keep_wy: bool) -> bool:
    return keep_wy and beta is not None


def _wy_like(q: Tensor, k: Tensor, v: Tensor, chunk_size: int) -> Tensor:
    """An empty tensor of the shape and dtype of the X the kernels keep (mmeff.kernels.chunk_delta.wy_fwd)."""
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    rows = dispatch.triton_kernels().chunk_rows(chunk_size)
    return q.new_empty(1, v.shape[0] * v.shape[1], v.shape[2], rows // 2 + 1, dtype=dtype)


@torch.library.custom_op("mmeff::linear_recurrence_backward", mutates_args=())
def _backward(
    do: Tensor, dht: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], beta: Optional[Tensor],
    h0: Optional[Tensor], cu_seqlens: Optional[Tensor], X: Optional[Tensor], scale: float, chunk_size: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients of q, k, v, g, beta, h0 (absent ones empty); X: the forward's, else solved again."""
    kernels = dispatch.triton_kernels()
    args, chunks, gate = kernels.pack(q, k, v, g, beta, h0, cu_seqlens, chunk_size)
    inputs = (q, k, v, g, beta, h0)
    if chunks.num_chunks == 0:  # only empty sequences: the final states are the initial ones
        grads = [None] * 5 + [dht]
    else:
        pq, pk, pv, pg, pbeta, ph0 = args
        do = do.reshape(pv.shape).to(pv.dtype).contiguous()
        dht = None if dht is None else dht.float().contiguous()
        grads = kernels.chunk_backward(pq, pk, pv, pg, pbeta, ph0, X, do, dht, scale, chunks, gate, ph0 is not None)
    return tuple(  # type: ignore[return-value]
        _absent(q) if x is None else (torch.zeros_like(x) if d is None else d.reshape(x.shape).to(x.dtype))
        for x, d in zip(inputs, grads)
    )


@_backward.register_fake
def _(do, dht, q, k, v, g, beta, h0, cu_seqlens, X, scale, chunk_size):
    return tuple(_absent(q) if t is None else torch.empty_like(t) for t in (q, k, v, g, beta, h0))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, g, beta, h0, cu_seqlens, scale, chunk_size, final, keep_wy = inputs
    ctx.save_for_backward(q, k, v, g, beta, h0, cu_seqlens, output[2] if _keeps_wy(beta, keep_wy) else None)
    ctx.scale, ctx.chunk_size, ctx.final, ctx.ht_shape = scale, chunk_size, final, output[1].shape


def _autograd(ctx, do: Optional[Tensor], dht: Optional[Tensor], dX: Optional[Tensor]):
    q, k, v, g, beta, h0, cu_seqlens, X = ctx.saved_tensors
    do = torch.zeros_like(v) if do is None else do
    if not ctx.final:
        dht = None
    elif dht is None:
        dht = torch.zeros(ctx.ht_shape, dtype=torch.float32, device=q.device)
    grads = _backward(do, dht, q, k, v, g, beta, h0, cu_seqlens, X, ctx.scale, ctx.chunk_size)
    present = [t is not None for t in (q, k, v, g, beta, h0)]
    return (*(grad if there else None for grad, there in zip(grads, present)), None, None, None, None, None)


_forward.register_autograd(_autograd, setup_context=_setup_context)


def linear_recurrence_op(
    q: Tensor, k: Tensor, v: Tensor, log_decay: Optional[Tensor], beta: Optional[Tensor], scale: float,
    initial_state: Optional[Tensor], output_final_state: bool, cu_seqlens: Optional[Tensor], chunk_size: int,
) -> Tuple[Tensor, Optional[Tensor]]:  # fmt: skip
    """mmeff.kernels.linear_recurrence_triton (mode "chunk") through the custom op."""
    # X is kept only for a backward to come: inference keeps linear_recurrence_triton's choice of kernels.
    inputs = (q, k, v, log_decay, beta, initial_state)
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    o, ht, _ = _forward(q, k, v, log_decay, beta, initial_state, cu_seqlens, scale, chunk_size, output_final_state,
                        training)  # fmt: skip
    return o, (ht if output_final_state else None)


@torch.library.custom_op("mmeff::grid_conv", mutates_args=())
def _grid_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], height: int, width: int) -> Tensor:
    return dispatch.triton_kernels("conv2d").grid_conv(x, weight, bias, height, width)


@_grid_conv.register_fake
def _(x, weight, bias, height, width):
    return x.new_empty(x.shape)


@torch.library.custom_op("mmeff::grid_conv_backward", mutates_args=())
def _grid_conv_backward(
    dy: Tensor, x: Tensor, weight: Tensor, has_bias: bool, height: int, width: int
) -> Tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = dispatch.triton_kernels("conv2d").grid_conv_backward(dy, x, weight, has_bias, height, width)
    return dx, dw.to(weight.dtype), (_absent(x) if db is None else db)


@_grid_conv_backward.register_fake
def _(dy, x, weight, has_bias, height, width):
    db = x.new_empty(x.shape[-1], dtype=torch.float32) if has_bias else _absent(x)
    return x.new_empty(x.shape), torch.empty_like(weight), db


def _grid_conv_setup(ctx, inputs, output) -> None:
    x, weight, bias, height, width = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias, ctx.grid = bias is not None, (height, width)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _grid_conv_autograd(ctx, dy: Tensor):
    x, weight = ctx.saved_tensors
    dx, dw, db = _grid_conv_backward(dy, x, weight, ctx.has_bias, *ctx.grid)
    return dx, dw, (db.to(ctx.bias_dtype) if ctx.has_bias else None), None, None


_grid_conv.register_autograd(_grid_conv_autograd, setup_context=_grid_conv_setup)


def grid_conv_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], height: int, width: int) -> Tensor:
    """mmeff.kernels.conv2d.grid_conv (and its backward) through the custom op."""
    return _grid_conv(x, weight, bias, height, width)


@torch.library.custom_op("mmeff::causal_conv", mutates_args=())
def _causal_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool, runs: Optional[Tensor]) -> Tensor:
    return dispatch.triton_kernels("conv").causal_conv(x, weight, bias, silu, runs)


@_causal_conv.register_fake
def _(x, weight, bias, silu, runs):
    return torch.empty_like(x)


@torch.library.custom_op("mmeff::causal_conv_backward", mutates_args=())
def _causal_conv_backward(
    dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool, runs: Optional[Tensor]
) -> Tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = dispatch.triton_kernels("conv").causal_conv_backward(dy, x, weight, bias, silu, runs)
    return dx, dw, (_absent(x) if db is None else db)


@_causal_conv_backward.register_fake
def _(dy, x, weight, bias, silu, runs):
    return torch.empty_like(x), torch.empty_like(weight), (_absent(x) if bias is None else torch.empty_like(bias))


def _causal_conv_setup(ctx, inputs, output) -> None:
    x, weight, bias, silu, runs = inputs
    ctx.save_for_backward(x, weight, bias, runs)
    ctx.silu = silu


def _causal_conv_autograd(ctx, dy: Tensor):
    x, weight, bias, runs = ctx.saved_tensors
    dx, dw, db = _causal_conv_backward(dy, x, weight, bias, ctx.silu, runs)
    return dx, dw, (None if bias is None else db), None, None


_causal_conv.register_autograd(_causal_conv_autograd, setup_context=_causal_conv_setup)


def causal_conv_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool, runs: Optional[Tensor]) -> Tensor:
    """mmeff.kernels.conv.causal_conv (and its backward) through the custom op; x, weight and runs made contiguous."""
    runs = None if runs is None else runs.to(torch.int32).contiguous()
    return _causal_conv(x.contiguous(), weight.contiguous(), bias, silu, runs)


@torch.library.custom_op("mmeff::global_linear_attention", mutates_args=())
def _global_la(q: Tensor, k: Tensor, v: Tensor, scale: float, normalize: bool, eps: float, feature_map: str) -> Tensor:
    return dispatch.triton_kernels("noncausal").forward(q, k, v, scale, normalize, eps, feature_map)


@_global_la.register_fake
def _(q, k, v, scale, normalize, eps, feature_map):
    return v.new_empty(*q.shape[:3], v.shape[-1])


@torch.library.custom_op("mmeff::global_linear_attention_backward", mutates_args=())
def _global_la_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float, normalize: bool, eps: float,
                        feature_map: str) -> Tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    return dispatch.triton_kernels("noncausal").backward(do, q, k, v, scale, normalize, eps, feature_map)


@_global_la_backward.register_fake
def _(do, q, k, v, scale, normalize, eps, feature_map):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _global_la_setup(ctx, inputs, output) -> None:
    q, k, v, scale, normalize, eps, feature_map = inputs
    ctx.save_for_backward(q, k, v)
    ctx.options = (scale, normalize, eps, feature_map)


def _global_la_autograd(ctx, do: Tensor):
    q, k, v = ctx.saved_tensors
    return (*_global_la_backward(do, q, k, v, *ctx.options), None, None, None, None)


_global_la.register_autograd(_global_la_autograd, setup_context=_global_la_setup)


def global_linear_attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float, normalize: bool, eps: float,
                               feature_map: str) -> Tensor:  # fmt: skip
    """mmeff.kernels.noncausal (forward and backward) through the custom op: o [B, T, H, V]."""
    return _global_la(q, k, v, scale, normalize, eps, feature_map)


@torch.library.custom_op("mmeff::bidirectional_gla", mutates_args=())
def _bigla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float) -> Tensor:
    return dispatch.triton_kernels("bidirectional_gla").forward(q, k, v, g, scale)


@_bigla.register_fake
def _(q, k, v, g, scale):
    return torch.empty_like(v)


@torch.library.custom_op("mmeff::bidirectional_gla_backward", mutates_args=())
def _bigla_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return dispatch.triton_kernels("bidirectional_gla").backward(do, q, k, v, g, scale)


@_bigla_backward.register_fake
def _(do, q, k, v, g, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g)


def _bigla_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:4])
    ctx.scale = inputs[4]


def _bigla_autograd(ctx, do: Tensor):
    return (*_bigla_backward(do, *ctx.saved_tensors, ctx.scale), None)


_bigla.register_autograd(_bigla_autograd, setup_context=_bigla_setup)


def bidirectional_gla_op(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float) -> Tensor:
    """mmeff.kernels.bidirectional_gla (forward and backward) through the custom op: o [B, T, H, V]."""
    return _bigla(q, k, v, g, scale)


@torch.library.custom_op("mmeff::rope", mutates_args=())
def _rope(x: Tensor, cos: Tensor, sin: Tensor, out_dtype: torch.dtype, inverse: bool) -> Tensor:
    return dispatch.triton_kernels("rope").rotate(x, cos, sin, out_dtype, inverse)


@_rope.register_fake
def _(x, cos, sin, out_dtype, inverse):
    return x.new_empty(x.shape, dtype=out_dtype)


def _rope_setup(ctx, inputs, output) -> None:
    x, cos, sin, out_dtype, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.x_dtype, ctx.inverse = x.dtype, inverse


def _rope_autograd(ctx, dy: Tensor):
    cos, sin = ctx.saved_tensors
    return _rope(dy, cos, sin, ctx.x_dtype, not ctx.inverse), None, None, None, None


_rope.register_autograd(_rope_autograd, setup_context=_rope_setup)


def rope_op(x: Tensor, cos: Tensor, sin: Tensor, out_dtype: torch.dtype) -> Tensor:
    """mmeff.kernels.rope's rotation (and its backward, the inverse rotation) through the custom op (no gradient
    for the angles)."""
    return _rope(x, cos, sin, out_dtype, False)
