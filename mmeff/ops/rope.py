"""Rotary position embedding (Su et al., 2021, RoFormer).

backend (mmeff.ops.dispatch) "triton" runs mmeff.kernels.rope on CUDA: one kernel each way that reads x through
its strides and writes the output in the dtype asked for. The reference (fp32 upcast, two strided halves, four
products and two sums, a cat, a cast back) ran as many passes over q and k: with it a bidirectional RetNet ViT-S at
1024 px trained at 0.62x timm's img/s on the H200, with the kernel at 0.89x (benchmarks/results/vision_speed_h200.md,
runs 23-24). While torch.compile traces, the reference is taken: Inductor fuses it itself.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mmeff.ops import dispatch
from mmeff.ops.dispatch import Backend

__all__ = ["apply_rope", "rope_angles"]


def rope_angles(positions: torch.Tensor, dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [..., T, dim // 2] for integer `positions` [..., T] (one row per sample, or shared)."""
    inv = base ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    ang = positions.float()[..., None] * inv
    return ang.cos(), ang.sin()


def apply_rope(
    x: Tensor, cos: Tensor, sin: Tensor, dtype: Optional[torch.dtype] = None, *, backend: Backend = "auto"
) -> Tensor:
    """Rotate the channel pairs (first half, second half) of `x` [B, T, H, D] by the angles [T, D/2] or [B, T, D/2]
    (computed in fp32), written in `dtype` (default x's)."""
    dtype = dtype or x.dtype

    def triton() -> str:
        if torch.compiler.is_compiling():
            return "torch.compile traces: Inductor fuses the reference"
        if dispatch.needs_grad(cos, sin):
            return "the angles need a gradient"
        return dispatch.triton_unsupported(x, "rope", lambda kernels: kernels.unsupported(x, cos, sin))

    if dispatch.choose("rope", backend, [("triton", triton)]) == "triton":
        return dispatch.triton_kernels("rope").Rope.apply(x, cos, sin, dtype)
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(dtype)
