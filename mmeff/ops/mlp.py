"""The second half of an MLP, activation then output projection, keeping only the pre-activation for the backward.

Autograd keeps both sides of the activation: GELU's input and output (the projection's input) in a ViT MLP,
SiLU(g), u and their product besides g in a SwiGLU one. `act_linear` keeps the inputs of the activation and
recomputes its output in the backward (one elementwise pass), where the projection's weight gradient needs it.
Gradients equal the plain composition's to rounding (`tests/ops/test_mlp.py`); the plain composition is the
reference (`MMEFF_FORCE_REFERENCE=1`, `recompute=False`, inference, and `torch.export`, which cannot trace a
function that saves tensors with dynamic shapes). Under `torch.compile` the plain composition runs as a selective
activation checkpoint (`mmeff.ops.recompute.compiled_recomputing`): Inductor's partitioner kept the activation's
output beside its input otherwise, since the projection's weight gradient reads it.

On CUDA the SwiGLU activation and its gradient are one Triton kernel each (mmeff.kernels.moe's, which the MoE experts
use too): PyTorch's are two kernels forward (silu, product) and four backward, each a pass over [tokens, hidden].
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mmeff.ops import dispatch
from mmeff.ops.dispatch import exporting, force_reference
from mmeff.ops.recompute import compiled_recomputing

__all__ = ["act_linear", "activation"]

Kind = Literal["gelu", "swiglu"]


def activation(a: Tensor, up: Optional[Tensor], kind: str) -> Tensor:
    """GELU(a) (kind "gelu") or SiLU(a) * up ("swiglu"): what act_linear feeds its projection."""
    return F.gelu(a) if kind == "gelu" else F.silu(a) * up


def _fused_swiglu(a: Tensor, up: Optional[Tensor], kind: str) -> bool:
    """Whether mmeff's SwiGLU kernels take this activation (CUDA, not while torch.compile traces)."""
    if kind != "swiglu":
        return False

    def triton() -> str:
        if torch.compiler.is_compiling():
            return "torch.compile traces: Inductor fuses the reference"
        if up.dtype != a.dtype or a.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"gate {a.dtype} and up {up.dtype} (the kernels compute in fp32 and take fp32, bf16, fp16 alike)"
        return dispatch.triton_unsupported(a, "moe")

    return dispatch.choose("swiglu", "auto", [("triton", triton)]) == "triton"


def _activate(a: Tensor, up: Optional[Tensor], kind: str, fused: bool) -> Tensor:
    """activation(a, up, kind), by mmeff's SwiGLU kernel where `fused`."""
    if not fused:
        return activation(a, up, kind)
    width = a.shape[-1]
    kernels = dispatch.triton_kernels("moe")
    return kernels.silu_mul(a.reshape(-1, width), up.reshape(-1, width), width).view(a.shape)


class _ActLinear(torch.autograd.Function):
    """y = act(a[, up]) @ W^T + b, in a's dtype; saves a (and up), not act's output."""

    @staticmethod
    def forward(ctx, a: Tensor, up: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], kind: str) -> Tensor:  # type: ignore[override]
        device = a.device.type
        # The projection in autocast's dtype where autocast is on (as F.linear under it), else in a's.
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else a.dtype
        fused = _fused_swiglu(a, up, kind)
        if fused:  # the kernels read rows at one stride
            a, up = a.contiguous(), up.contiguous()
        with torch.autocast(device, enabled=False):
            h = _activate(a, up, kind, fused).to(dtype)
            y = F.linear(h, weight.to(dtype), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(a, up, weight)
        ctx.kind, ctx.dtype, ctx.bias_dtype, ctx.fused = kind, dtype, None if bias is None else bias.dtype, fused
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        a, up, weight = ctx.saved_tensors
        with torch.autocast(a.device.type, enabled=False):
            dy = dy.to(ctx.dtype)
            h = _activate(a, up, ctx.kind, ctx.fused).to(ctx.dtype)  # recomputed
            flat_dy, flat_h = dy.reshape(-1, dy.shape[-1]), h.reshape(-1, h.shape[-1])
            dweight = (flat_dy.t() @ flat_h).to(weight.dtype) if ctx.needs_input_grad[2] else None
            dbias = flat_dy.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[3] else None
            # The activation's output, its gradient and the input's gradient, each [tokens, hidden], were alive at
            # once: the step's peak of a ViT-S with mmeff's attention (benchmarks/saved_memory.py --peak). Now the
            # output goes before the gradient is made, and the input's gradient is written over it.
            del h, flat_h
            dh = (dy @ weight.to(ctx.dtype)).to(a.dtype)
            if ctx.kind == "gelu":
                return torch.ops.aten.gelu_backward.grad_input(dh, a, grad_input=dh), None, dweight, dbias, None
            if ctx.fused:  # the kernel reads each element of dh before it writes da's there (a is contiguous)
                width = a.shape[-1]
                da, dup = dh.view(a.shape), torch.empty_like(up)
                dispatch.triton_kernels("moe").silu_mul_backward(
                    dh.reshape(-1, width), a.view(-1, width), up.view(-1, width), da.view(-1, width), dup.view(-1, width), width
                )  # fmt: skip
                return da, dup if ctx.needs_input_grad[1] else None, dweight, dbias, None
            dup = dh * F.silu(a) if ctx.needs_input_grad[1] else None
            return torch.ops.aten.silu_backward(dh * up, a), dup, dweight, dbias, None


def act_linear(
    a: Tensor, weight: Tensor, bias: Optional[Tensor] = None, kind: Kind = "gelu", up: Optional[Tensor] = None,
    recompute: bool = True,
) -> Tensor:  # fmt: skip
    """F.linear(act(a), weight, bias) with act GELU (kind "gelu") or SiLU(a) * up ("swiglu"); with `recompute` and
    a backward to record, the activation's output is recomputed there instead of kept."""
    if kind not in ("gelu", "swiglu"):
        raise ValueError(f"kind must be 'gelu' or 'swiglu', got {kind!r}")
    if (kind == "swiglu") != (up is not None):
        raise ValueError(f"kind {kind!r} takes {'an' if kind == 'swiglu' else 'no'} `up` tensor")
    if up is not None and up.shape != a.shape:
        raise ValueError(f"up {tuple(up.shape)} must have the shape of a {tuple(a.shape)}")
    inputs = (a, up, weight, bias)
    recorded = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    if not recompute or not recorded or force_reference() or exporting():
        return F.linear(activation(a, up, kind), weight, bias)
    if torch.compiler.is_compiling():

        def plain(a: Tensor, up: Optional[Tensor], weight: Tensor, bias: Optional[Tensor]) -> Tensor:
            return F.linear(activation(a, up, kind), weight, bias)

        return compiled_recomputing(plain, a, up, weight, bias)
    return _ActLinear.apply(a, up, weight, bias, kind)
