"""Rotary position embedding (Su et al., 2021, RoFormer).

backend (mmeff.ops.dispatch) "triton" runs mmeff.kernels.rope on CUDA: one kernel each way that reads x through
its strides and writes the output in the dtype asked for. The reference (fp32 upcast, two strided halves, four
products and two sums, a cat, a cast back) ran as many passes over q and k: with it a bidirectional RetNet ViT-S at
1024 px trained at 0.62x timm's img/s on the H200, with the kernel at 0.89x (benchmarks/results/vision_speed_h200.md,
runs 23-24). While torch.compile traces, the kernel runs as the custom op mmeff::rope (mmeff.ops.custom_ops): left
to Inductor, the reference made the angles again for every element of q and k.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Union

import torch
from torch import Tensor

from mmeff.ops import dispatch
from mmeff.ops.custom_ops import rope_op
from mmeff.ops.dispatch import Backend

__all__ = ["Positions", "apply_rope", "angles_of", "range_angles", "rope_angles"]

# Where RoPE is applied: a [T] or [B, T] tensor of positions, or the first of T consecutive ones (an int).
Positions = Union[Tensor, int]
_KEPT = 8  # range angles kept (the most recently used): the lengths and offsets a run trains and decodes at
_ranges: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()


def rope_angles(positions: torch.Tensor, dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [..., T, dim // 2] for integer `positions` [..., T] (one row per sample, or shared)."""
    inv = base ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    ang = positions.float()[..., None] * inv
    return ang.cos(), ang.sin()


def range_angles(start: int, length: int, dim: int, device: torch.device, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """rope_angles of positions start .. start + length - 1, made once and kept for the calls after it (every layer of
    a model and its backward ask for the same angles, each time nine small kernels: a quarter of the eager RetNet LM
    step's launches on the H200, lm_train_speed_h200.md run 12). Made anew while torch.compile
    traces (Inductor fuses them) or a CUDA graph is captured (a replay must not read a tensor the cache may drop)."""
    device = torch.device(device)
    if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return rope_angles(torch.arange(start, start + length, device=device), dim, base)
    key = (device, start, length, dim, base, torch.is_inference_mode_enabled())  # inference tensors cannot be saved
    if key in _ranges:
        _ranges.move_to_end(key)
        return _ranges[key]
    with torch.no_grad():
        angles = _ranges[key] = rope_angles(torch.arange(start, start + length, device=device), dim, base)
    if len(_ranges) > _KEPT:
        _ranges.popitem(last=False)
    return angles


def angles_of(positions: Positions, length: int, dim: int, device: torch.device, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin for `positions`: a tensor of them, or the first of `length` consecutive ones (kept, range_angles)."""
    if isinstance(positions, int):
        return range_angles(positions, length, dim, device, base)
    return rope_angles(positions, dim, base)


def apply_rope(
    x: Tensor, cos: Tensor, sin: Tensor, dtype: Optional[torch.dtype] = None, *, backend: Backend = "auto"
) -> Tensor:
    """Rotate the channel pairs (first half, second half) of `x` [B, T, H, D] by the angles [T, D/2] or [B, T, D/2]
    (computed in fp32), written in `dtype` (default x's)."""
    dtype = dtype or x.dtype

    def triton() -> str:
        if dispatch.exporting():
            return "torch.export (ONNX has no lowering of the custom op)"
        if dispatch.needs_grad(cos, sin):
            return "the angles need a gradient"
        return dispatch.triton_unsupported(x, "rope", lambda kernels: kernels.unsupported(x, cos, sin))

    if dispatch.choose("rope", backend, [("triton", triton)]) == "triton":
        if torch.compiler.is_compiling():  # no graph break on the kernel
            return rope_op(x, cos, sin, dtype)
        return dispatch.triton_kernels("rope").Rope.apply(x, cos, sin, dtype)
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(dtype)
