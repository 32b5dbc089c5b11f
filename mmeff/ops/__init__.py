"""Functional sequence-mixing ops: linear attention family and state-space models, layout [B, T, H, D]."""

from mmeff.ops import dispatch
from mmeff.ops.bidirectional import bidirectional_gla, bidirectional_gla_backend
from mmeff.ops.conv import causal_conv1d
from mmeff.ops.gates import log_sigmoid_gate, scaled_sigmoid, softplus_decay
from mmeff.ops.noncausal import global_linear_attention
from mmeff.ops.norm import add_norm, norm
from mmeff.ops.linear import delta_rule, gated_delta_rule, gated_linear_attention, linear_attention, retention
from mmeff.ops.mlp import act_linear
from mmeff.ops.recurrence import linear_recurrence
from mmeff.ops.rope import apply_rope
from mmeff.ops.ssm import selective_scan, ssd
from mmeff.ops.varlen import cu_seqlens_from_docs

dispatch.preload_kernels()

__all__ = [
    "act_linear",
    "add_norm",
    "apply_rope",
    "bidirectional_gla",
    "bidirectional_gla_backend",
    "causal_conv1d",
    "cu_seqlens_from_docs",
    "delta_rule",
    "gated_delta_rule",
    "gated_linear_attention",
    "global_linear_attention",
    "linear_attention",
    "linear_recurrence",
    "log_sigmoid_gate",
    "norm",
    "retention",
    "scaled_sigmoid",
    "selective_scan",
    "softplus_decay",
    "ssd",
]
