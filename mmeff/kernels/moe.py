"""Triton kernels of the dropless MoE glue around the grouped matmuls: token dispatch, weighted combine, SwiGLU.

Layout: N tokens of width D, each with k assignments; `order` [N * k] sorts the assignments (token-major index
a = n * k + j) by expert, and `inv` is its inverse (the sorted row of assignment a). Each kernel reads and
writes every row once, with no atomics: the gradient of a gather is computed as another gather through the
inverse permutation, so results are deterministic. Reference semantics (plain PyTorch, autograd):

    dispatch(x, order, inv, k) = x[order // k]                                      [N * k, D]
    combine(rows, order, inv, w) = (w[..., None] * rows[inv].view(N, k, D)).sum(1)  [N, D]
    swiglu(h) = silu(h[:, :H]) * h[:, H:]                                           [M, H]

The SwiGLU kernels also serve the dense SwiGLU MLP (mmeff.ops.mlp), whose gate and up are two tensors.

`mmeff.ops.grouped` calls these on CUDA and the reference elsewhere.
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from mmeff.kernels.launch import jit
from mmeff.kernels.utils import cdiv, empty, next_pow2


@jit
def _gather_sum_kernel(src, index, weight, out, D, K: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_D: tl.constexpr):
    # out[n] = sum_j weight[n, j] * src[index[n * K + j]]; one program per (token, column block).
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    inside = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(K):
        row = tl.load(index + n * K + j).to(tl.int64)
        x = tl.load(src + row * D + cols, mask=inside, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            x *= tl.load(weight + n * K + j).to(tl.float32)
        acc += x
    tl.store(out + n * D + cols, acc.to(out.dtype.element_ty), mask=inside)


@jit
def _combine_bwd_kernel(grad_out, order, weight, rows, grad_rows, grad_weight, D, K: tl.constexpr, BLOCK_D: tl.constexpr):
    # Sorted row i holds assignment a = order[i] of token a // K: its gradient is weight[a] * grad_out[token],
    # and weight[a]'s is <grad_out[token], rows[i]>. One program per sorted row.
    i = tl.program_id(0).to(tl.int64)
    a = tl.load(order + i).to(tl.int64)
    n = a // K
    w = tl.load(weight + a).to(tl.float32)
    dot = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        inside = cols < D
        g = tl.load(grad_out + n * D + cols, mask=inside, other=0.0).to(tl.float32)
        r = tl.load(rows + i * D + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(grad_rows + i * D + cols, (w * g).to(grad_rows.dtype.element_ty), mask=inside)
        dot += g * r
    tl.store(grad_weight + a, tl.sum(dot, axis=0))


@jit
def _swiglu_fwd_kernel(gate, up, out, H, s_in, BLOCK: tl.constexpr):
    # Row `row` of gate and up starts at row * s_in (2H: the halves of one [M, 2H] tensor; H: two tensors).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < H
    g = tl.load(gate + row * s_in + cols, mask=inside, other=0.0).to(tl.float32)
    u = tl.load(up + row * s_in + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(out + row * H + cols, (g * tl.sigmoid(g) * u).to(out.dtype.element_ty), mask=inside)


@jit
def _swiglu_bwd_kernel(gate, up, grad_out, grad_gate, grad_up, H, s_in, BLOCK: tl.constexpr):
    # The gradients are laid out as the inputs (row stride s_in).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < H
    g = tl.load(gate + row * s_in + cols, mask=inside, other=0.0).to(tl.float32)
    u = tl.load(up + row * s_in + cols, mask=inside, other=0.0).to(tl.float32)
    d = tl.load(grad_out + row * H + cols, mask=inside, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(grad_gate + row * s_in + cols, (d * u * sig * (1.0 + g * (1.0 - sig))).to(grad_gate.dtype.element_ty), mask=inside)
    tl.store(grad_up + row * s_in + cols, (d * g * sig).to(grad_up.dtype.element_ty), mask=inside)


def _block(n: int) -> int:
    return min(next_pow2(n), 1024)


def gather_sum(src: Tensor, index: Tensor, weight: Tensor | None, k: int) -> Tensor:
    """out[n] = sum_j weight[n, j] * src[index[n * k + j]] (weight None: 1) -> [len(index) // k, D] in src's dtype."""
    src, index = src.contiguous(), index.contiguous()  # the kernel reads rows of D elements at stride D
    D = src.shape[1]
    out = empty((index.numel() // k, D), src.dtype, src.device)
    block = _block(D)
    w = weight if weight is not None else index  # any pointer: HAS_WEIGHT keeps it unread
    _gather_sum_kernel[(out.shape[0], cdiv(D, block))](src, index, w, out, D, k, weight is not None, block)
    return out


class Dispatch(torch.autograd.Function):
    """x [N, D] -> its rows per assignment in sorted order [N * k, D]; the backward sums each token's k rows."""

    @staticmethod
    def forward(ctx, x: Tensor, order: Tensor, inv: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(inv)
        ctx.k = k
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inv,) = ctx.saved_tensors
        return gather_sum(grad.contiguous(), inv, None, ctx.k), None, None, None


class Combine(torch.autograd.Function):
    """Sorted expert outputs [N * k, D] and float32 weights [N, k] -> each token's weighted sum [N, D]."""

    @staticmethod
    def forward(ctx, rows: Tensor, order: Tensor, inv: Tensor, weight: Tensor) -> Tensor:
        rows, weight = rows.contiguous(), weight.float().contiguous()
        ctx.save_for_backward(rows, order.contiguous(), weight)
        return gather_sum(rows, inv, weight, weight.shape[1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        rows, order, weight = ctx.saved_tensors
        grad = grad.contiguous()
        D, k = rows.shape[1], weight.shape[1]
        grad_rows = empty(rows.shape, rows.dtype, rows.device)
        grad_weight = empty(weight.shape, torch.float32, rows.device)
        _combine_bwd_kernel[(rows.shape[0],)](grad, order, weight, rows, grad_rows, grad_weight, D, k, _block(D))
        return grad_rows, None, None, grad_weight


class SwiGLU(torch.autograd.Function):
    """h [M, 2H] as [gate | up] -> silu(gate) * up [M, H], recomputing the activation in the backward."""

    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        h = h.contiguous()
        ctx.save_for_backward(h)
        return silu_mul(h, h[:, h.shape[1] // 2 :], h.shape[1] // 2)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (h,) = ctx.saved_tensors
        grad_h = empty(h.shape, h.dtype, h.device)
        H = h.shape[1] // 2
        silu_mul_backward(grad, h, h[:, H:], grad_h, grad_h[:, H:], H)
        return grad_h


def silu_mul(gate: Tensor, up: Tensor, width: int) -> Tensor:
    """silu(gate) * up [M, width] (computed in fp32, written in gate's dtype) of `width` columns of the rows of gate
    and up, which share one row stride and have unit column stride."""
    M = gate.shape[0]
    out = empty((M, width), gate.dtype, gate.device)
    if out.numel():
        block = _block(width)
        _swiglu_fwd_kernel[(M, cdiv(width, block))](gate, up, out, width, gate.stride(0), block)
    return out


def silu_mul_backward(grad: Tensor, gate: Tensor, up: Tensor, grad_gate: Tensor, grad_up: Tensor, width: int) -> None:
    """Write the gradients of silu_mul(gate, up, width) from `grad` [M, width] into grad_gate and grad_up (laid out
    as gate and up)."""
    M = gate.shape[0]
    if M and width:
        block = _block(width)
        _swiglu_bwd_kernel[(M, cdiv(width, block))](gate, up, grad.contiguous(), grad_gate, grad_up, width, gate.stride(0), block)
