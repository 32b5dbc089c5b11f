"""Softmax attention within packed documents through torch's `varlen_attn` (FlashAttention over cu_seqlens).

q [B, H, T, D], k, v [B, Hkv, T, D] hold documents bounded by `cu_seqlens` over the flattened B*T tokens (none
crosses a row); each query sees the keys of its own document (causal: up to itself). Packed documents through
FlexAttention need a block mask built for every batch and a compiled kernel per mask; `varlen_attn` takes the
boundaries as they are. It runs on CUDA with torch >= 2.10, bf16 or fp16 inputs and FlashAttention's head sizes;
the longest document is a host integer, read from `mmeff.ops.varlen.host_bounds` (no sync for a layout built with
host bounds). Elsewhere attention keeps the documents apart through the document mask (mmeff.ops.flex), which is
this op's reference: `MMEFF_ATTENTION=reference` or MMEFF_FORCE_REFERENCE=1 choose it everywhere.
"""

from __future__ import annotations

import importlib
import inspect
from functools import lru_cache
from types import ModuleType

import torch
from torch import Tensor

from mmeff.ops import dispatch
from mmeff.ops.flex import default_engine
from mmeff.ops.varlen import host_bounds

__all__ = ["attention", "wants_varlen"]


@lru_cache(maxsize=None)
def _module() -> ModuleType | None:
    try:
        return importlib.import_module("torch.nn.attention.varlen")
    except ImportError:  # torch < 2.10
        return None


@lru_cache(maxsize=None)
def _parameters() -> frozenset[str]:
    return frozenset(inspect.signature(_module().varlen_attn).parameters)


def _unsupported(q: Tensor, k: Tensor, dropout: float) -> str:
    if not dispatch.on_cuda(q):
        return "inputs not on CUDA"
    if _module() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (2.10 and later)"
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype:
        return f"FlashAttention takes bf16 or fp16, got {q.dtype} and {k.dtype}"
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        return f"head size {q.shape[-1]}: FlashAttention takes multiples of 8 up to 256"
    if dropout:
        return "attention dropout"
    if torch.compiler.is_compiling():
        return "torch.compile traces (the longest document is a host integer)"
    return ""


def wants_varlen(q: Tensor, k: Tensor, dropout: float = 0.0) -> bool:
    """Whether packed-document attention of these inputs runs `varlen_attn` (else the document mask)."""
    backend = "torch" if default_engine() == "reference" else "auto"
    fast = [("varlen_attn", lambda: _unsupported(q, k, dropout))]
    return dispatch.choose("packed-document attention", backend, fast, ("auto", "torch")) == "varlen_attn"


def attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, causal: bool, scale: float | None = None) -> Tensor:
    """Attention of q [B, H, T, D] over k, v [B, Hkv, T, D*] within the documents of `cu_seqlens` (int32 [N+1]
    over the B*T tokens) -> [B, H, T, D*]; call where `wants_varlen` says so."""
    B, H, T, D = q.shape
    bounds = host_bounds(cu_seqlens)
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    params = _parameters()

    def tokens(x: Tensor, heads: int) -> Tensor:
        x = x.transpose(1, 2).reshape(B * T, x.shape[1], x.shape[3])  # no copy from the projections' [B, T, h, d]
        return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)

    options: dict = {}
    if "is_causal" in params:  # torch 2.10
        options["is_causal"] = causal
    else:  # later: a window of (left, right) keys, -1 unbounded
        options["window_size"] = (-1, 0) if causal else (-1, -1)
    if scale is not None and "scale" not in params:
        q = q * (scale * D**0.5)  # torch 2.10 scales by D ** -0.5 only
    elif scale is not None:
        options["scale"] = scale
    gqa = "enable_gqa" in params and H != k.shape[1]
    if gqa:
        options["enable_gqa"] = True
    kv_heads = k.shape[1] if gqa else H
    o = _module().varlen_attn(tokens(q, H), tokens(k, kv_heads), tokens(v, kv_heads), cu_seqlens, cu_seqlens, longest, longest, **options)
    return o.view(B, T, H, -1).transpose(1, 2)
