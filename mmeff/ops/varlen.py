"""Packed documents: conversions between per-token document ids and sequence boundaries.

A batch `docs` [B, T] gives each token a document id; a document is a run of equal ids along a row (an id may
come back later in a row: that is another document), and no document crosses a row. The ops take the
documents as `cu_seqlens` (int32 [N+1], the starts of the N documents over the flattened B*T tokens and the
total, as flash-attn and fla) or, for the short convolution, as `docs` itself.

Kernel grids and per-document loops need the boundaries on the host. `cu_seqlens_to` makes the device tensor from
boundaries the host already knows (the loader's documents, before the batch moves) and remembers them, so
`host_bounds` returns them without reading the GPU back, which would wait for every queued kernel.
"""

from __future__ import annotations

import weakref
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["check_bounds", "cu_seqlens_from_docs", "cu_seqlens_to", "doc_bounds", "doc_runs", "host_bounds", "per_document", "seq_idx_from_cu_seqlens", "to_device", "version"]

# Host copies of cu_seqlens tensors by id, with a weak reference to the tensor and its version at the time: an
# entry goes with its tensor and is not trusted after an in-place write. (Not a WeakKeyDictionary: its lookups
# compare tensors with ==, which is elementwise.)
_HOST: dict[int, tuple[weakref.ref, int, list[int]]] = {}


def _check_docs(docs: Tensor) -> None:
    if docs.dim() != 2 or docs.is_floating_point() or docs.is_complex():
        raise ValueError(f"docs must be integer document ids [B, T], got {docs.dtype} {tuple(docs.shape)}")


def doc_runs(docs: Tensor) -> Tensor:
    """int32 [B, T]: the index of each token's document within its row (0, 1, ... at each change of id)."""
    _check_docs(docs)
    change = (docs[:, 1:] != docs[:, :-1]).to(torch.int32)
    return torch.cat([torch.zeros_like(docs[:, :1], dtype=torch.int32), change.cumsum(1, dtype=torch.int32)], 1)


def cu_seqlens_from_docs(docs: Tensor) -> Tensor:
    """int32 [N+1]: the starts of the N documents of `docs` [B, T] over the flattened B*T tokens, then B*T
    (a document starts at every row start and at every change of id along a row). One host sync."""
    _check_docs(docs)
    starts = torch.ones(docs.shape, dtype=torch.bool, device=docs.device)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    first = starts.flatten().nonzero().flatten()
    return torch.cat([first, first.new_full((1,), docs.numel())]).to(torch.int32)


def doc_bounds(docs: Tensor) -> tuple[int, ...]:
    """The cu_seqlens of `docs` [B, T] as host integers; call it while `docs` is on the CPU (no host sync)."""
    return tuple(cu_seqlens_from_docs(docs).tolist())


def seq_idx_from_cu_seqlens(cu_seqlens: Tensor, total: int) -> Tensor:
    """int32 [total]: the sequence index of each of `total` packed tokens (mamba-ssm's `seq_idx`)."""
    tokens = torch.arange(total, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), tokens, right=True).to(torch.int32)


def to_device(values: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """A 1-d tensor of host `values` on `device`, without a host sync on CUDA (a pinned, non-blocking copy;
    `torch.tensor(values, device=...)` waits for the queued kernels)."""
    host = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def cu_seqlens_to(bounds: Sequence[int], device: torch.device | str) -> Tensor:
    """int32 cu_seqlens on `device` from host `bounds` (checked), without a host sync; `host_bounds` of the
    result returns `bounds` without reading it back."""
    bounds = check_bounds(bounds)
    out = to_device(bounds, torch.int32, device)
    _remember(out, bounds)
    return out


def check_bounds(bounds: Sequence[int]) -> list[int]:
    """`bounds` as a list of ints, or a ValueError showing them unless they rise (or stay) from 0."""
    bounds = [int(b) for b in bounds]
    if not bounds or bounds[0] != 0 or any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
        shown = bounds if len(bounds) <= 8 else [*bounds[:4], "...", *bounds[-3:]]
        raise ValueError(f"document bounds must rise from 0, got {shown}")
    return bounds


def host_bounds(cu_seqlens: Tensor) -> list[int]:
    """`cu_seqlens` as a host list: the bounds it was made from (`cu_seqlens_to`), else read back once (a host
    sync) and remembered while the tensor lives unchanged."""
    held = _HOST.get(id(cu_seqlens))
    if held is not None and held[0]() is cu_seqlens and held[1] == version(cu_seqlens):
        return held[2]
    bounds = cu_seqlens.reshape(-1).tolist()
    if not torch.compiler.is_compiling():
        _remember(cu_seqlens, bounds)
    return bounds


def _remember(cu_seqlens: Tensor, bounds: list[int]) -> None:
    key = id(cu_seqlens)
    if key not in _HOST:
        weakref.finalize(cu_seqlens, _HOST.pop, key, None)
    _HOST[key] = (weakref.ref(cu_seqlens), version(cu_seqlens), bounds)


def version(x: Tensor) -> int:
    """How often `x` was written in place (0 for an inference tensor, which cannot be written after it is made)."""
    return 0 if x.is_inference() else x._version


def per_document(fn: Callable[..., tuple[Tensor, ...]], bounds: Sequence[int], *xs: Tensor) -> tuple[Tensor, ...]:
    """Apply `fn` to each document's tokens of `xs` [B, h, T, d] separately, reassembled in place: the documents
    are the host `bounds` (cu_seqlens) over the flattened B*T tokens. For steps whose statistics span tokens
    (block scores, quantisation scales), so that no document sees another."""
    B, T = xs[0].shape[0], xs[0].shape[2]
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        b, t0 = divmod(start, T)
        parts.append(fn(*(x[b : b + 1, :, t0 : t0 + end - start] for x in xs)))
    # Documents come in flattened B*T order: [1, h, B*T, d] -> [B, h, T, d].
    return tuple(torch.cat([p[i] for p in parts], dim=2)[0].unflatten(1, (B, T)).transpose(0, 1) for i in range(len(parts[0])))
