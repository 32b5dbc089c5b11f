"""Softmax attention: one projection / RoPE / KV-cache / mask path shared by every variant.

`SoftmaxAttention.forward` is the whole flow: `project` (queries + the per-token tensors to cache) ->
`remember` (KV cache, appended or a ring bounded by `cache_bound`) -> `attend` (the mask predicate
of `mask` through `mmeff.ops.flex.attention`) -> `merge` (heads -> output projection). Variants
override only the step they change: sparse masks (mmeff/blocks/sparse.py), latent projections,
head routing and quantised scores (mmeff/blocks/efficient.py).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask

from mmeff.blocks.cache import Cache
from mmeff.blocks.layout import Layout
from mmeff.blocks.registry import register
from mmeff.ops import flex, masks, varlen_attention
from mmeff.ops.masks import MaskMod
from mmeff.ops.rope import Positions, angles_of, apply_rope


def slot_positions(n: int, bound: tuple[int, int] | None, device: torch.device) -> Tensor:
    """Token positions held by the cache slots after `n` tokens: all of them, or the first `keep` and a ring of `window`."""
    if bound is None or n <= sum(bound):
        return torch.arange(n, device=device)
    keep, window = bound
    slots = torch.arange(keep + window, device=device)
    return torch.where(slots < keep, slots, n - 1 - (n - 1 - slots) % window)


def remember(cache: Cache, new: dict[str, Tensor], bound: tuple[int, int] | None) -> tuple[dict[str, Tensor], Tensor | None]:
    """Add the per-token tensors `new` ([B, h, T, d] each) to `cache`; return what the queries attend over and its positions.

    Positions are None when nothing was cached before (keys aligned with the queries). With `bound`
    = (keep, window) the cache holds the first `keep` tokens plus a ring buffer of the latest `window`
    (slot of position p: p < keep ? p : keep + (p - keep) % window), so its size never grows past them.
    """
    n = cache.offset
    T = next(iter(new.values())).shape[2]
    device = next(iter(new.values())).device
    cache.offset += T
    if n == 0:
        full, positions = new, None
    else:
        positions = torch.cat([slot_positions(n, bound, device), torch.arange(n, n + T, device=device)])
        full = {name: torch.cat([cache[name], t], dim=2) for name, t in new.items()}
    if bound is None or n + T <= sum(bound):
        cache.update(full)
    else:
        held = min(n, sum(bound))
        kept = slot_positions(n + T, bound, device)
        index = torch.where(kept < n, torch.arange(kept.numel(), device=device), held + kept - n)
        cache.update({name: t.index_select(2, index) for name, t in full.items()})
    return full, positions


class SoftmaxAttention(nn.Module):
    """The shared flow of every softmax-attention mixer; subclasses define `project` and may override any step."""

    per_head_mask = False  # True where `mask` depends on the head (FlexAttention then needs one block mask per head)

    def __init__(
        self,
        dim: int,
        heads: int,
        kv_heads: int | None,
        causal: bool,
        rope: bool,
        rope_base: float,
        dropout: float,
        bias: bool,
    ) -> None:
        super().__init__()
        kv_heads = kv_heads or heads
        if dim % heads or heads % kv_heads:
            raise ValueError(f"dim={dim} must divide by heads={heads}, and heads by kv_heads={kv_heads}")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.causal, self.rope, self.rope_base, self.dropout = causal, rope, rope_base, dropout
        self.out = nn.Linear(dim, dim, bias=bias)

    def project(self, x: Tensor, pos: Positions) -> tuple[Tensor, dict[str, Tensor]]:
        """Queries [B, H, T, Dk] and the per-token tensors to cache, each [B, h, T, d]; `pos` for `rotate`."""
        raise NotImplementedError

    def mask(self, length: int, device: torch.device) -> MaskMod | None:
        """Which keys each query may see among `length` positions (a `mmeff.ops.masks` predicate); None: all."""
        return masks.causal() if self.causal else None

    def cache_bound(self) -> tuple[int, int] | None:
        """(first tokens kept, recent window) that bound a causal decoding cache; None keeps every token."""
        return None

    def rotate(self, pos: Positions, *xs: Tensor) -> tuple[Tensor, ...]:
        """RoPE at positions `pos` ([T] or [B, T], or the first of T consecutive ones) on each [B, T, h, d] tensor
        (unchanged when `rope` is off)."""
        if not self.rope:
            return xs
        cos, sin = angles_of(pos, xs[0].shape[1], xs[0].shape[-1], xs[0].device, self.rope_base)
        return tuple(apply_rope(x, cos, sin) for x in xs)

    def attention(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        offset: int,
        kv_pos: Tensor | None,
        mask: MaskMod | None,
        layout: Layout,
        scale: float | None = None,
        block: BlockMask | None = None,
    ) -> Tensor:
        """`mmeff.ops.flex.attention` for queries at positions offset.. over keys at `kv_pos` (None: aligned),
        kept within the documents and prefix of `layout`."""
        q_pos = None if kv_pos is None else torch.arange(offset, offset + q.shape[2], device=q.device)
        docs, engine = layout.docs, None
        dropout = self.dropout if self.training else 0.0
        plain = mask is None or mask is masks.causal()  # a mask that knows nothing but the documents and causality
        if docs is not None and plain and not layout.prefix and kv_pos is None and block is None:
            if varlen_attention.wants_varlen(q, k, dropout):
                return varlen_attention.attention(q, k, v, layout.cu_seqlens, mask is not None, scale)
        if layout.prefix:
            mask = masks.with_prefix(mask, layout.prefix)
        if docs is not None:
            first = torch.arange(docs.shape[1], device=docs.device) - layout.replace(offset=0).positions(docs.shape[1], docs.device)
            mask = masks.within_documents(mask, docs, first)
            # Documents differ per sample: a block mask of this batch's own, never cached.
            if block is not None:
                engine = "reference"  # a prebuilt (selection) block mask knows nothing of the documents
            elif flex.wants_flex(q, kv_pos is None, dropout):
                # Compiled: eager, create_block_mask evaluates the predicate on every (query, key) pair of the batch
                # (an attn LM at T = 16k with 8 documents a row ran at 0.40x its unpacked speed on the H200).
                block = flex.create_block_mask(mask, q.shape[0], None, q.shape[2], k.shape[2], device=q.device, _compile=True)
        return flex.attention(
            q, k, v, mask, q_pos=q_pos, kv_pos=kv_pos, per_head=self.per_head_mask,
            dropout=dropout, scale=scale, block=block, engine=engine,
        )

    def attend(
        self, q: Tensor, kv: dict[str, Tensor], offset: int, kv_pos: Tensor | None, layout: Layout, cache: Cache | None
    ) -> Tensor:
        """Per-head outputs [B, H, T, Dv] of the queries over the cached and new tokens."""
        mask = self.mask(offset + q.shape[2], q.device)
        return self.attention(q, kv["k"], kv["v"], offset, kv_pos, mask, layout)

    def merge(self, o: Tensor, x: Tensor) -> Tensor:
        """Heads [B, H, T, Dv] -> [B, T, D] through the output projection."""
        B, H, T, _ = o.shape
        return self.out(o.transpose(1, 2).reshape(B, T, -1))

    def forward(self, x: Tensor, cache: Cache | None = None, layout: Layout | None = None) -> Tensor:
        """Tokens [B, T, D] -> [B, T, D]; `layout` keeps packed documents apart and opens the prefix both ways."""
        layout = layout or Layout()
        if layout.docs is not None and cache is not None:
            raise ValueError("layout.docs (packed documents) is for training and evaluation; decoding takes one sequence per row")
        offset = cache.offset if cache is not None else 0
        # RoPE positions: consecutive from the first one (their angles are kept), or restarting at each document.
        pos = layout.offset + offset if layout.docs is None else layout.replace(offset=layout.offset + offset).positions(x.shape[1], x.device)
        q, kv = self.project(x, pos)
        kv_pos = None
        if cache is not None:
            kv, kv_pos = remember(cache, kv, self.cache_bound() if self.causal else None)
        return self.merge(self.attend(q, kv, offset, kv_pos, layout, cache), x)


@register("attn")
class Attention(SoftmaxAttention):
    """Multi-head softmax attention (Vaswani et al., 2017) with GQA/MQA `kv_heads` (Ainslie et al., 2023)."""

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        kv_heads: int | None = None,
        causal: bool = True,
        rope: bool = True,
        rope_base: float = 10000.0,
        qk_norm: bool = False,
        bias: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(dim, heads, kv_heads, causal, rope, rope_base, dropout, bias)
        self.q = nn.Linear(dim, dim, bias=bias)
        self.kv = nn.Linear(dim, 2 * self.kv_heads * self.head_dim, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim) if qk_norm else nn.Identity()

    def project(self, x: Tensor, pos: Positions) -> tuple[Tensor, dict[str, Tensor]]:
        B, T, _ = x.shape
        q = self.q_norm(self.q(x).view(B, T, self.heads, self.head_dim))
        k, v = self.kv(x).view(B, T, 2, self.kv_heads, self.head_dim).unbind(2)
        q, k = self.rotate(pos, q, self.k_norm(k))
        return q.transpose(1, 2), {"k": k.transpose(1, 2), "v": v.transpose(1, 2)}
