"""Bidirectional GLA: the mean of gated linear attention along the token order and along its reverse (a GLA mixer's
`scan: bi` over a plain token order), in one op.

    o = (GLA(q, k, v, g) + flip(GLA(flip(q), flip(k), flip(v), flip(g)))) / 2     (flip: along T)

Backend "triton" runs mmeff.kernels.bidirectional_gla through the custom op mmeff::bidirectional_gla (eagerly and
under torch.compile): in the forward each chunk's program reads both directions' states from the other chunks, with
no scan, no reversed copy and no stacked batch; the backward is the scan routes'. "torch" is the definition above on
mmeff.ops.gated_linear_attention, the reference the kernels are tested against; the mixers leave it to their scan
routes (mmeff.blocks.scan), which run the same two recurrences as one call on a route-stacked batch.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from mmeff.ops import dispatch
from mmeff.ops.custom_ops import bidirectional_gla_op
from mmeff.ops.dispatch import Backend
from mmeff.ops.linear import gated_linear_attention

__all__ = ["bidirectional_gla", "bidirectional_gla_backend"]


def bidirectional_gla_backend(q: Tensor, v: Tensor, log_g: Tensor, backend: Backend = "auto") -> str:
    """The implementation bidirectional_gla takes for q [B, T, H, K], v [B, T, H, V], log_g [B, T, H, K]:
    "triton" or "torch"."""

    def triton() -> str:
        if not q.numel() or not v.numel():
            return "empty input"
        if dispatch.exporting():
            return "torch.export (ONNX has no lowering of the custom op)"
        return dispatch.triton_unsupported(q, "bidirectional_gla", lambda kernels: kernels.unsupported(q, v, log_g))

    return dispatch.choose("bidirectional_gla", backend, [("triton", triton)])


def bidirectional_gla(
    q: Tensor, k: Tensor, v: Tensor, log_g: Tensor, scale: Optional[float] = None, *, backend: Backend = "auto"
) -> Tensor:
    """q, k [B, T, H, K], v [B, T, H, V], per-key log decay log_g [B, T, H, K] -> o [B, T, H, V] in v's dtype: the
    mean of GLA (scale `scale`, default K**-0.5) along the tokens and along their reverse."""
    if k.shape != q.shape or log_g.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, log_g {tuple(log_g.shape)} do not match")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if bidirectional_gla_backend(q, v, log_g, backend) == "triton":
        return bidirectional_gla_op(q.to(v.dtype), k.to(v.dtype), v, log_g, scale)
    ahead, _ = gated_linear_attention(q, k, v, log_g, scale=scale, backend=backend)
    back, _ = gated_linear_attention(*(x.flip(1) for x in (q, k, v, log_g)), scale=scale, backend=backend)
    return (ahead + back.flip(1)) / 2
