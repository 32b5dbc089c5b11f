"""Packed documents: conversions between per-token document ids and sequence boundaries.

A batch `docs` [B, T] gives each token a document id; a document is a run of equal ids along a row (an id may
come back later in a row: that is another document), and no document crosses a row. The ops take the
documents as `cu_seqlens` (int32 [N+1], the starts of the N documents over the flattened B*T tokens and the
total, as flash-attn and fla) or, for the short convolution, as `docs` itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["cu_seqlens_from_docs", "doc_runs", "seq_idx_from_cu_seqlens"]


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


def seq_idx_from_cu_seqlens(cu_seqlens: Tensor, total: int) -> Tensor:
    """int32 [total]: the sequence index of each of `total` packed tokens (mamba-ssm's `seq_idx`)."""
    tokens = torch.arange(total, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), tokens, right=True).to(torch.int32)
