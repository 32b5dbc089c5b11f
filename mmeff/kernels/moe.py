"""Triton kernels of the dropless MoE glue around the grouped matmuls: token dispatch, weighted combine, SwiGLU.

Layout: N tokens of width D, each with k assignments; `order` [N * k] sorts the assignments (token-major index
a = n * k + j) by expert, and `inv` is its inverse (the sorted row of assignment a). Each kernel reads and
writes every row once, with no atomics: the gradient of a gather is computed as another gather through the
inverse permutation, so results are deterministic. Reference semantics (plain PyTorch, autograd):

    dispatch(x, order, inv, k) = x[order // k]                                      [N * k, D]
    combine(rows, order, inv, w) = (w[..., None] * rows[inv].view(N, k, D)).sum(1)  [N, D]
    swiglu(h) = silu(h[:, :H]) * h[:, H:]                                           [M, H]

`mmeff.ops.grouped` calls these on CUDA and the reference elsewhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmeff.kernels.utils import empty


@triton.jit
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


@triton.jit
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


@triton.jit
def _swiglu_fwd_kernel(h, out, H, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < H
    gate = tl.load(h + row * 2 * H + cols, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(h + row * 2 * H + H + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(out + row * H + cols, (gate * tl.sigmoid(gate) * up).to(out.dtype.element_ty), mask=inside)


@triton.jit
def _swiglu_bwd_kernel(h, grad_out, grad_h, H, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < H
    gate = tl.load(h + row * 2 * H + cols, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(h + row * 2 * H + H + cols, mask=inside, other=0.0).to(tl.float32)
    g = tl.load(grad_out + row * H + cols, mask=inside, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    d_gate = g * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(grad_h + row * 2 * H + cols, d_gate.to(grad_h.dtype.element_ty), mask=inside)
    tl.store(grad_h + row * 2 * H + H + cols, (g * gate * sig).to(grad_h.dtype.element_ty), mask=inside)


def _block(n: int) -> int:
    return min(triton.next_power_of_2(n), 1024)


def gather_sum(src: Tensor, index: Tensor, weight: Tensor | None, k: int) -> Tensor:
    """out[n] = sum_j weight[n, j] * src[index[n * k + j]] (weight None: 1) -> [len(index) // k, D] in src's dtype."""
    src, index = src.contiguous(), index.contiguous()  # the kernel reads rows of D elements at stride D
    D = src.shape[1]
    out = empty((index.numel() // k, D), src.dtype, src.device)
    block = _block(D)
    w = weight if weight is not None else index  # any pointer: HAS_WEIGHT keeps it unread
    _gather_sum_kernel[(out.shape[0], triton.cdiv(D, block))](src, index, w, out, D, k, weight is not None, block)
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
        M, H = h.shape[0], h.shape[1] // 2
        out = empty((M, H), h.dtype, h.device)
        block = _block(H)
        _swiglu_fwd_kernel[(M, triton.cdiv(H, block))](h, out, H, block)
        ctx.save_for_backward(h)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (h,) = ctx.saved_tensors
        M, H = h.shape[0], h.shape[1] // 2
        grad_h = empty(h.shape, h.dtype, h.device)
        block = _block(H)
        _swiglu_bwd_kernel[(M, triton.cdiv(H, block))](h, grad.contiguous(), grad_h, H, block)
        return grad_h
