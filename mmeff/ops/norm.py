"""Layer norm and RMS norm over the last dim, optionally in `groups` equal slices (per-head norms).

backend (mmeff.ops.dispatch) "triton" runs mmeff.kernels.norm on CUDA: one kernel each way, output written in
the autocast dtype. It exists because PyTorch's eager layer norm under bf16 autocast computes and writes fp32
and its backward's weight-gradient kernel is slow at vision widths: on the H200, the 25 layer norms of a
ViT-S/16 step at 224 px took 15.5 of its 51.5 GPU ms (benchmarks/vision_speed.py --profile). The reference is
F.layer_norm / F.rms_norm. While torch.compile traces, the reference is taken: Inductor fuses it itself.
An optional swish gate (the gated output norms of the linear and SSM mixers) is fused into the kernels: one
launch each way instead of three elementwise passes, and only x and the gate kept for the backward.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mmeff.ops import dispatch

__all__ = ["add_norm", "norm", "norm_reference", "output_dtype"]

Kind = Literal["layer", "rms"]


def output_dtype(x: Tensor) -> torch.dtype:
    """The dtype a norm of `x` writes: the autocast dtype when autocast is on for x's device, else x's."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def norm(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor] = None,
    eps: float = 1e-6,
    kind: Kind = "layer",
    groups: int = 1,
    backend: str = "auto",
    gate: Optional[Tensor] = None,
    gate_first: bool = False,
) -> Tensor:
    """x [..., G * N] normalised over each of its `groups` slices of N, times weight [G * N] (+ bias), in
    `output_dtype(x)`; with `gate` z (x's shape) norm(x) * silu(z), or norm(x * silu(z)) if `gate_first`."""
    if kind not in ("layer", "rms"):
        raise ValueError(f"kind must be 'layer' or 'rms', got {kind!r}")
    if x.shape[-1] % groups:
        raise ValueError(f"last dim {x.shape[-1]} of x {tuple(x.shape)} does not split into {groups} groups")
    if kind == "rms" and bias is not None:
        raise ValueError("an RMS norm has no bias")
    if gate is not None and gate.shape != x.shape:
        raise ValueError(f"the gate {tuple(gate.shape)} must have the shape of x {tuple(x.shape)}")
    width = x.shape[-1] // groups

    def triton() -> str:
        if torch.compiler.is_compiling():
            return "torch.compile traces: Inductor fuses the reference"
        return dispatch.triton_unsupported(
            x, "norm", lambda kernels: kernels.unsupported(x, width) or (gate is not None and kernels.unsupported(gate, width))
        )

    out_dtype = output_dtype(x)
    if dispatch.choose("norm", backend, [("triton", triton)]) == "triton":
        kernels = dispatch.triton_kernels("norm")
        mode = kernels.NO_GATE if gate is None else kernels.GATE_BEFORE if gate_first else kernels.GATE_AFTER
        return kernels.Norm.apply(x, weight, bias, eps, kind == "rms", groups, out_dtype, gate, mode.value)
    if gate is not None and gate_first:
        x = x * F.silu(gate)
    y = norm_reference(x, weight, bias, eps, kind, groups).to(out_dtype)
    return y * F.silu(gate) if gate is not None and not gate_first else y


def add_norm(
    x: Tensor, r: Tensor, weight: Optional[Tensor], bias: Optional[Tensor] = None, eps: float = 1e-6,
    kind: Kind = "layer", backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """(x + r, norm(x + r)): a pre-norm layer's residual add and the norm after it. The sum is in torch's dtype of
    x + r (the fp32 stream plus a bf16 branch under autocast: fp32), the norm in `output_dtype(x)`. backend "triton"
    runs both in one kernel each way (mmeff.kernels.norm.AddNorm), with the backward's sum of the stream's two
    gradients and the branch's cast: on the H200, gla-bi's 24 residual adds and 24 gradient sums apart took 3.0 of a
    52.3 GPU ms ViT-S step at 224 px, in 48 of its 1,577 launches."""
    if r.shape != x.shape:
        raise ValueError(f"the residual {tuple(r.shape)} must have the shape of x {tuple(x.shape)}")
    if kind not in ("layer", "rms"):
        raise ValueError(f"kind must be 'layer' or 'rms', got {kind!r}")
    if kind == "rms" and bias is not None:
        raise ValueError("an RMS norm has no bias")

    def triton() -> str:
        width = x.shape[-1]
        return dispatch.eager_triton_unsupported(
            x, "norm", lambda kernels: kernels.unsupported(x, width) or kernels.unsupported(r, width)
        )

    out_dtype = output_dtype(x)
    if dispatch.choose("norm", backend, [("triton", triton)]) == "triton":
        return dispatch.triton_kernels("norm").AddNorm.apply(x, r, weight, bias, eps, kind == "rms", out_dtype)
    s = x + r
    return s, norm_reference(s, weight, bias, eps, kind, 1).to(out_dtype)


def norm_reference(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, kind: Kind, groups: int) -> Tensor:
    """The plain-PyTorch norm (fp32 statistics inside PyTorch's fused norm ops)."""
    if groups == 1:
        if kind == "rms":
            return F.rms_norm(x, x.shape[-1:], weight, eps=eps)
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps=eps)
    g = x.unflatten(-1, (groups, -1))
    norm_fn = F.rms_norm if kind == "rms" else F.layer_norm
    y = norm_fn(g, g.shape[-1:], eps=eps).flatten(-2)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y
