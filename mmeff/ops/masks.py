"""Attention masks as FlexAttention `mask_mod` predicates (b, h, q_idx, kv_idx) -> bool (True: may attend).

Each mask is defined once here, on absolute token positions, and serves both engines: FlexAttention
block masks on CUDA (`mmeff.ops.flex`) and the dense boolean mask of the reference (`dense`). The
predicates use only elementwise tensor ops, so they broadcast over position grids and trace under
FlexAttention's vmap alike. Factories are cached: the same arguments give the same function object,
which keys the block-mask cache.

Windows count keys: a causal window `w` sees the `w` latest positions (itself included); a centred
window `w` sees the positions within `w // 2` on either side.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import _disable_current_modes

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
UNBOUNDED = 1 << 40  # a window no sequence reaches


def _causal(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
    return q >= kv


def causal() -> MaskMod:
    """Each query sees itself and the past (Vaswani et al., 2017)."""
    return _causal


@lru_cache(maxsize=None)
def sliding_window(window: int, causal: bool = True) -> MaskMod:
    """Local band: the `window` latest keys (causal) or the keys within `window // 2` (centred)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    half = window // 2

    def mask(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        if causal:
            return (q >= kv) & (q - kv < window)
        return (q - kv).abs() <= half

    return mask


@lru_cache(maxsize=None)
def dilated(windows: tuple[int, ...], dilations: tuple[int, ...], causal: bool, device: torch.device) -> MaskMod:
    """Head h sees every `dilations[h]`-th key within `windows[h]` such keys (Sparse Transformer strided, Longformer dilated).

    Dilation 1 is a sliding window; window UNBOUNDED with dilation s is the Sparse Transformer's strided head.
    """
    if len(windows) != len(dilations) or min(windows) < 1 or min(dilations) < 1:
        raise ValueError(f"need one window >= 1 and one dilation >= 1 per head, got {windows} and {dilations}")
    with _disable_current_modes():  # real tensors even while torch.export traces: the cache outlives the trace
        win = torch.tensor(windows, device=device)
        dil = torch.tensor(dilations, device=device)

    def mask(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        d, step, span = q - kv, dil[h], win[h]
        on_grid = d % step == 0
        if causal:
            return on_grid & (d >= 0) & (d < span * step)
        return on_grid & (d.abs() <= (span // 2) * step)

    return mask


@lru_cache(maxsize=None)
def longformer(window: int, global_tokens: int, causal: bool = True) -> MaskMod:
    """Sliding window plus global tokens (the first `global_tokens` positions), which see and are seen by all (Longformer)."""
    local = sliding_window(window, causal)

    def mask(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        if causal:
            return local(b, h, q, kv) | ((kv < global_tokens) & (q >= kv))
        return local(b, h, q, kv) | (kv < global_tokens) | (q < global_tokens)

    return mask


def sink(sinks: int, window: int) -> MaskMod:
    """StreamingLLM: the first `sinks` positions (attention sinks) plus the causal `window` (Xiao et al., 2023)."""
    return longformer(window, sinks, causal=True)


def random_blocks(n_blocks: int, count: int, seed: int, causal: bool) -> Tensor:
    """BigBird's random part [n_blocks, n_blocks] bool: `count` random key blocks per query block.

    Row i draws from its own generator seeded by (seed, i), among the earlier blocks when causal, so a
    causal row never changes with the sequence length (decoding sees the rows training saw).
    """
    table = torch.zeros(n_blocks, n_blocks, dtype=torch.bool)
    gen = torch.Generator()
    for i in range(n_blocks):
        pool = i if causal else n_blocks
        gen.manual_seed(seed * 1_000_003 + i)
        table[i, torch.randperm(pool, generator=gen)[:count]] = True
    return table


@lru_cache(maxsize=64)
def bigbird(
    window: int, global_tokens: int, block: int, count: int, seed: int, causal: bool, n_blocks: int, device: torch.device
) -> MaskMod:
    """BigBird: Longformer's window and global tokens plus `count` seeded random key blocks per query block (Zaheer et al., 2020)."""
    base = longformer(window, global_tokens, causal)
    with _disable_current_modes():  # real values even while torch.export traces (it takes them as a constant)
        table = random_blocks(n_blocks, count, seed, causal).to(device)

    def mask(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return base(b, h, q, kv) | table[q // block, kv // block]

    return mask


def selected_blocks(selected: Tensor, block: int, causal: bool, group: int = 1, first_row: int = 0) -> MaskMod:
    """Dynamic block selection (MoBA, NSA): query q sees key block j where `selected[b, h, q // group - first_row, j]`
    (one row per query, or per group of `group` queries sharing a selection)."""

    def mask(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        keep = selected[b, h, q // group - first_row, kv // block]
        return keep & (q >= kv) if causal else keep

    return mask


def dense(mask: MaskMod, q_pos: Tensor, kv_pos: Tensor, batch: int = 1, heads: int = 1) -> Tensor:
    """The boolean mask [B or 1, H or 1, Tq, Tk] of `mask` at query and key positions (the reference engine)."""
    device = q_pos.device
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)
    return mask(b, h, q_pos.view(1, 1, -1, 1), kv_pos.view(1, 1, 1, -1))


def per_head(values: int | Sequence[int | None], heads: int) -> tuple[int, ...]:
    """An int or a list (None: unbounded) cycled over `heads` heads, as the tuple the factories take."""
    items = [values] if isinstance(values, int) else list(values)
    if not items:
        raise ValueError("expected an int or a non-empty list")
    return tuple(UNBOUNDED if items[i % len(items)] is None else int(items[i % len(items)]) for i in range(heads))


@lru_cache(maxsize=64)
def with_prefix(base: MaskMod | None, prefix: int) -> MaskMod | None:
    """`base` plus every key among the first `prefix` tokens: the prefix sees itself both ways (prefix LM)."""
    if base is None:
        return None

    def mask(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return base(b, h, q, kv) | (kv < prefix)

    return mask


def within_documents(base: MaskMod | None, docs: Tensor, first: Tensor | None = None) -> MaskMod:
    """`base` restricted to keys of the query's own document; `docs` [B, T] holds each token's document index.

    With `first` [B, T] (the index of each token's document start), `base` sees positions within the
    document, so position-dependent masks (global tokens, sinks, blocks) start afresh in each document."""

    def mask(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        same = docs[b, q] == docs[b, kv]
        if base is None:
            return same
        if first is None:
            return same & base(b, h, q, kv)
        start = first[b, q]
        return same & base(b, h, q - start, kv - start)

    return mask
