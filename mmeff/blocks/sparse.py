"""Sparse softmax attention: `attn` with a sparse mask (static or chosen per query), the rest of its path shared.

Static masks: sliding, dilated, longformer, bigbird; dynamic: block_topk; training-free: sink. Each
keeps `attn`'s options (heads, kv_heads, rope, rope_base, qk_norm, bias, dropout) and weights, so an
`attn` checkpoint loads into any of them. The masks live in `mmeff.ops.masks`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from mmeff.blocks.attention import Attention
from mmeff.blocks.cache import Cache
from mmeff.blocks.layout import Layout
from mmeff.blocks.registry import register
from mmeff.ops import flex, masks
from mmeff.ops.masks import MaskMod
from mmeff.ops.varlen import per_document


@register("sliding")
class SlidingWindow(Attention):
    """Sliding-window attention (Beltagy et al., 2020 'Longformer'): the `window` latest keys, or a centred window when bidirectional.

    Decoding keeps a ring buffer of `window` keys: memory does not grow with the generated length.
    """

    def __init__(self, dim: int, *, window: int = 256, causal: bool = True, **options: Any) -> None:
        super().__init__(dim, causal=causal, **options)
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window

    def mask(self, length: int, device: torch.device) -> MaskMod | None:
        if statically_known_true((self.window if self.causal else self.window // 2 + 1) >= length):  # export: any length
            return super().mask(length, device)  # the window spans the sequence: plain (flash) attention
        return self.pattern(length, device)

    def pattern(self, length: int, device: torch.device) -> MaskMod:
        """The sparse mask, for sequences longer than the window."""
        return masks.sliding_window(self.window, self.causal)

    def cache_bound(self) -> tuple[int, int] | None:
        return (0, self.window)


@register("longformer")
class Longformer(SlidingWindow):
    """Longformer attention (Beltagy et al., 2020): a sliding window plus `global_tokens` leading tokens (e.g. a class token) seen by and seeing all.

    Causal decoding keeps the global tokens and a ring buffer of the window.
    """

    def __init__(self, dim: int, *, window: int = 256, global_tokens: int = 1, causal: bool = True, **options: Any) -> None:
        super().__init__(dim, window=window, causal=causal, **options)
        self.global_tokens = global_tokens

    def pattern(self, length: int, device: torch.device) -> MaskMod:
        return masks.longformer(self.window, self.global_tokens, self.causal)

    def cache_bound(self) -> tuple[int, int] | None:
        return (self.global_tokens, self.window)


@register("sink")
class Sink(Longformer):
    """StreamingLLM attention sinks (Xiao et al., 2023): the first `sinks` tokens plus the `window` latest, with a bounded cache.

    Training-free: it has `attn`'s weights, so a model trained with full causal attention decodes
    with it (pattern `sink` in place of `attn`) in constant memory. Positions stay absolute (RoPE
    distances to the sinks keep growing); its forward is the same sink + window mask, so cached
    decoding equals it.
    """

    def __init__(self, dim: int, *, sinks: int = 4, window: int = 1024, causal: bool = True, **options: Any) -> None:
        if not causal:
            raise ValueError("sink is a causal (streaming decoding) mixer; use longformer for bidirectional inputs")
        super().__init__(dim, window=window, global_tokens=sinks, causal=True, **options)

    def pattern(self, length: int, device: torch.device) -> MaskMod:
        return masks.sink(self.global_tokens, self.window)


@register("bigbird")
class BigBird(Longformer):
    """BigBird attention (Zaheer et al., 2020): window + global tokens + `random_blocks` seeded random key blocks per query block of `block` tokens.

    Causal rows draw only earlier blocks and never change with the length, so decoding (with a
    full cache: random blocks reach anywhere back) sees what training saw.
    """

    def __init__(
        self,
        dim: int,
        *,
        window: int = 128,
        global_tokens: int = 1,
        block: int = 64,
        random_blocks: int = 2,
        seed: int = 0,
        causal: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(dim, window=window, global_tokens=global_tokens, causal=causal, **options)
        self.block, self.random_blocks, self.seed = block, random_blocks, seed

    def pattern(self, length: int, device: torch.device) -> MaskMod:
        n_blocks = -(-flex.padded(length) // self.block)
        if isinstance(n_blocks, torch.SymInt):  # torch.export traces every length at once
            if not self.causal:
                raise ValueError(
                    "bigbird: torch.export takes causal bigbird only; a bidirectional query block draws its random key"
                    " blocks among all the blocks of the length, a different table for every length"
                )
            n_blocks = flex.largest(n_blocks)  # causal rows never change with the length: the longest table serves all
        return masks.bigbird(
            self.window, self.global_tokens, self.block, self.random_blocks, self.seed, self.causal, n_blocks, device
        )

    def cache_bound(self) -> tuple[int, int] | None:
        return None


@register("dilated")
class Dilated(Attention):
    """Dilated / strided attention (Child et al., 2019 'Sparse Transformers'; Beltagy et al., 2020 'Longformer' dilation): head h sees every `dilation[h]`-th key, `window[h]` of them.

    `window` and `dilation` are an int or a list cycled over the heads; a window of None is unbounded.
    The Sparse Transformer's strided pattern with stride s is `window: [s, null]`, `dilation: [1, s]`.
    """

    per_head_mask = True

    def __init__(
        self,
        dim: int,
        *,
        window: int | Sequence[int | None] = 64,
        dilation: int | Sequence[int] = (1, 2, 4, 8),
        causal: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(dim, causal=causal, **options)
        self.windows = masks.per_head(window, self.heads)
        self.dilations = masks.per_head(dilation, self.heads)

    def mask(self, length: int, device: torch.device) -> MaskMod | None:
        return masks.dilated(self.windows, self.dilations, self.causal, device)

    def cache_bound(self) -> tuple[int, int] | None:
        if max(self.windows) == masks.UNBOUNDED:
            return None
        return (0, max(w * d for w, d in zip(self.windows, self.dilations)))


@register("block_topk")
class BlockTopK(Attention):
    """Mixture of block attention (Lu et al., 2025 'MoBA'; Yuan et al., 2025 'NSA' selection): each query attends its own block plus the `topk` key blocks whose mean key scores highest.

    Keys are mean-pooled per `block`; a gate query scores the blocks with q . mean(k) (per head) and
    the best `topk` of the competing blocks are kept. `query_block` = 0: every query is its own gate
    and competes over the complete blocks before its own. `query_block` = n: consecutive groups of n
    queries share one selection, which FlexAttention runs block-sparse (tiles of whole groups); each
    query then also sees the blocks its group spans, and the blocks before them compete. Causal groups
    select with their first query, so no selection depends on a later token and cached decoding
    (which keeps that query) equals the forward; bidirectional groups select with their mean query.
    """

    per_head_mask = True

    def __init__(
        self, dim: int, *, block: int = 64, topk: int = 4, query_block: int = 0, causal: bool = True, **options: Any
    ) -> None:
        super().__init__(dim, causal=causal, **options)
        if isinstance(query_block, bool) or not isinstance(query_block, int) or query_block < 0:
            raise ValueError(f"query_block is a number of queries sharing a selection (0: none), got {query_block!r}")
        if block < 1 or topk < 0:
            raise ValueError(f"need block >= 1 and topk >= 0, got block={block}, topk={topk}")
        self.block, self.topk, self.query_block = block, topk, query_block

    def gates(self, q: Tensor, offset: int, carried: Tensor | None = None) -> Tensor:
        """Gate queries [B, H, groups, D] of the query groups that positions offset.. touch; `carried` [B, H, 1, D]:
        the first query of a causal group that began before `offset` (kept by the decoding cache)."""
        g = self.query_block
        if g <= 1:
            return q
        T = q.shape[2]
        starts = torch.arange(offset // g, flex.block_count(offset + T, g), device=q.device) * g - offset
        if not self.causal:
            if offset % g:
                raise ValueError("bidirectional query groups need queries that start a group")
            rows = F.pad(q, (0, 0, 0, starts.shape[0] * g - T)).unflatten(2, (-1, g))
            return rows.sum(3) / (T - starts).clamp(1, g)[:, None]  # 1: export's empty group
        gates = q[:, :, starts.clamp(0, T - 1)]  # T - 1: export's empty group
        if offset % g:
            if carried is None:
                raise ValueError(f"block_topk: queries from position {offset} continue a query group; pass the decoding cache")
            gates[:, :, :1] = carried
        return gates

    @torch.no_grad()
    def select(self, gates: Tensor, k: Tensor, offset: int, q_len: int) -> Tensor:
        """Selected key blocks [B, H, groups, n_blocks] (bool) of the query groups (or queries) at offset..offset+q_len-1
        with gate queries `gates`, over keys at 0..Tk-1."""
        B, H, _, D = gates.shape
        g = max(self.query_block, 1)
        Tk = k.shape[2]
        n_blocks = flex.block_count(Tk, self.block)
        blocks = torch.arange(n_blocks, device=gates.device)
        counts = (Tk - blocks * self.block).clamp(1, self.block).float()[:, None]  # keys per block (1: export's empty one)
        blocks_k = F.pad(k, (0, 0, 0, n_blocks * self.block - Tk)).view(B, self.kv_heads, n_blocks, self.block, D)
        pooled = (blocks_k.sum(3, dtype=torch.float32) / counts).repeat_interleave(H // self.kv_heads, 1)
        starts = (torch.arange(gates.shape[2], device=gates.device) + offset // g) * g
        first = (starts // self.block)[:, None]  # the group's own blocks start here
        if self.causal:
            own = blocks >= first  # the causal mask hides the later ones
        else:
            own = (blocks >= first) & (blocks <= ((starts + g).clamp(max=offset + q_len) - 1)[:, None] // self.block)
        compete = blocks < first if self.causal else ~own & (blocks * self.block < Tk)  # not export's empty block
        scores = (gates.float() @ pooled.transpose(-1, -2)).masked_fill(~compete, float("-inf"))
        best = scores.topk(torch.sym_min(self.topk, n_blocks), dim=-1).indices
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, best, True)
        return (chosen & compete) | own

    def attend(
        self, q: Tensor, kv: dict[str, Tensor], offset: int, kv_pos: Tensor | None, layout: Layout, cache: Cache | None
    ) -> Tensor:
        k, v = kv["k"], kv["v"]
        if layout.docs is not None:  # block scores span documents: select within each document on its own
            alone = layout.replace(docs=None, bounds=None)
            return per_document(lambda q, k, v: (self.attend(q, {"k": k, "v": v}, 0, None, alone, None),), layout.host_bounds, q, k, v)[0]
        gates = self.gates(q, offset, cache.get("gate") if cache is not None else None)
        if cache is not None and self.query_block > 1 and self.causal:
            cache["gate"] = gates[:, :, -1:]
        chosen = self.select(gates, k, offset, q.shape[2])
        g = max(self.query_block, 1)
        # FlexAttention may ask the mask about positions up to its padded tile: cover them.
        pad_rows = torch.sym_max(0, (offset + flex.padded(q.shape[2]) - 1) // g - offset // g + 1 - chosen.shape[2])
        pad_blocks = torch.sym_max(0, -(-flex.padded(k.shape[2]) // self.block) - chosen.shape[3])  # < 0: export's empty ones
        mask = masks.selected_blocks(F.pad(chosen, (0, pad_blocks, 0, pad_rows)), self.block, self.causal, g, offset // g)
        block = None
        if flex.wants_flex(q, kv_pos is None, self.dropout if self.training else 0.0):
            block = flex.selection_block_mask(chosen, self.block, g, mask, q.shape[2], k.shape[2], self.causal)
        return self.attention(q, k, v, offset, kv_pos, mask, layout, block=block)
