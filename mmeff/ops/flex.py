"""Masked softmax attention: FlexAttention on CUDA, a dense boolean mask through SDPA as the reference.

`attention(q, k, v, mask)` takes a `mmeff.ops.masks` predicate and picks the engine:
- no mask, or the causal mask over aligned positions: SDPA (flash) directly;
- CUDA, aligned positions (no cached keys before the queries), no dropout (FlexAttention has none):
  FlexAttention, compiled once, with the block mask built once per (mask, shape, device) and cached;
- otherwise (CPU, decoding from a cache, attention dropout): the predicate materialised as a dense
  boolean mask for `scaled_dot_product_attention`.
`engine` is the op's backend: `MMEFF_ATTENTION=reference` (or `engine="reference"`) forces the dense path
everywhere; `flex` takes FlexAttention wherever it applies (eager on CPU: for parity tests only, it
materialises the scores). MMEFF_FORCE_REFERENCE=1 forces the dense path too (mmeff.ops.dispatch decides).
Layout [B, H, T, D]; grouped keys/values (fewer heads than queries) are shared as in GQA.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Callable, Literal

import sympy
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from mmeff.ops import dispatch, masks
from mmeff.ops.masks import MaskMod

Engine = Literal["auto", "flex", "reference"]
_MASKED_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
BLOCK = 128  # FlexAttention's block-mask tile; captured tables must cover positions padded to it


def default_engine() -> Engine:
    """The engine asked for by the environment: MMEFF_ATTENTION = auto (default) | flex | reference."""
    value = os.environ.get("MMEFF_ATTENTION", "auto")
    if value not in ("auto", "flex", "reference"):
        raise ValueError(f"MMEFF_ATTENTION must be auto, flex or reference, got {value!r}")
    return value  # type: ignore[return-value]


def padded(length: int) -> int:
    """`length` rounded up to FlexAttention's tile, the largest position a mask_mod may be asked about."""
    return -(-length // BLOCK) * BLOCK


def block_count(length: int, block: int) -> int:
    """How many `block`-token blocks cover `length` tokens; while torch.export traces, one more (empty) block: a
    count export can prove is never 1, so the program does not specialise on it (a tensor of one element)."""
    if dispatch.exporting():
        return (length + 2 * block - 1) // block
    return -(-length // block)


def largest(length: int) -> int:
    """`length`; while torch.export traces a dynamic length (a SymInt), the largest value its range allows."""
    if not isinstance(length, torch.SymInt):
        return length
    upper = length.node.shape_env.bound_sympy(length.node.expr).upper
    if not isinstance(upper, sympy.Integer):  # int_oo: unbounded
        raise ValueError(f"export: the length {length} needs an upper bound (torch.export.Dim's max)")
    return int(upper)


@lru_cache(maxsize=64)
def block_mask(mask: MaskMod, batch: int | None, heads: int | None, q_len: int, kv_len: int, device: torch.device) -> BlockMask:
    """The FlexAttention block mask of `mask`, built once per shape and device (None: shared over that dim)."""
    build = _compiled(create_block_mask) if device.type == "cuda" else create_block_mask
    return build(mask, batch, heads, q_len, kv_len, device=device)


@lru_cache(maxsize=None)
def _compiled(fn: Callable, mode: str | None = None) -> Callable:
    # Every (mask, shape) pair is its own graph of the one flex_attention function; past dynamo's
    # default of 8 it would silently fall back to the eager kernel, which materialises the scores.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(fn, dynamic=False, mode=mode)


def flex(q: Tensor, k: Tensor, v: Tensor, mask: BlockMask, scale: float | None = None) -> Tensor:
    """FlexAttention with a prepared block mask: compiled on CUDA, eager elsewhere.

    Key tiles narrower than BLOCK (dynamic selections of small key blocks) need kernel tiles that divide them.
    torch 2.11 offers none by default for the backward on Hopper, only under max-autotune, so those calls
    compile in that mode (tens of seconds, once per shape) with the tiles pinned, which makes every candidate
    the same kernel: the same speed in every run.
    """
    if not q.is_cuda:
        return flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    kv_tile = mask.BLOCK_SIZE[1]
    if kv_tile >= BLOCK:
        fn, options = _compiled(flex_attention), None
    else:
        fn = _compiled(flex_attention, "max-autotune-no-cudagraphs")
        tile = min(64, kv_tile)
        options = {"fwd_BLOCK_M": BLOCK, "fwd_BLOCK_N": kv_tile, "num_warps": 4, "num_stages": 3}
        options |= {f"bwd_BLOCK_{name}": tile for name in ("M1", "N1", "M2", "N2")}
    return fn(q, k, v, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1], kernel_options=options)


def sdpa(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, *, causal: bool = False, dropout: float = 0.0, scale: float | None = None
) -> Tensor:
    """`scaled_dot_product_attention` with grouped heads; `mask` is boolean (True: attend)."""
    call = lambda: F.scaled_dot_product_attention(  # noqa: E731
        q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    if mask is None or not q.is_cuda:
        return call()
    # cuDNN, which torch picks first for masked calls on Hopper, builds a plan per shape: 2.5 ms of host time
    # at every decoding step (the keys grow by one), 6x the step's GPU time (H100, torch 2.11).
    with sdpa_kernel(_MASKED_BACKENDS):
        return call()


def wants_flex(q: Tensor, aligned: bool, dropout: float, engine: Engine | None = None) -> bool:
    """Whether `attention` runs FlexAttention for these queries (see the module docstring)."""
    engine = engine or default_engine()

    def check() -> str:
        if not aligned:
            return "keys at given positions (decoding from a cache)"
        if dropout:
            return "attention dropout (FlexAttention has none)"
        return "inputs not on CUDA" if engine == "auto" and not dispatch.on_cuda(q) else ""

    backend = "torch" if engine == "reference" else "auto"
    return dispatch.choose("attention", backend, [("flex", check)], ("auto", "torch")) == "flex"


def selection_block_mask(selected: Tensor, block: int, group: int, mask: MaskMod, q_len: int, kv_len: int, causal: bool) -> BlockMask:
    """Block mask of a dynamic selection `selected` [B, H, rows, n_blocks] of key blocks of `block` tokens, one row
    per group of `group` queries (aligned positions).

    Query tiles are BLOCK long; key tiles are the key blocks themselves when those are 16, 32 or 64 long, else
    BLOCK. A tile of queries visits the union of the key tiles its queries selected. Tiles that every query of
    the tile selected whole (and, causal, that lie before the diagonal) are full and skip the predicate; in the
    others `mask` (the exact per-query predicate) is applied.
    """
    B, H, rows, n_blocks = selected.shape
    kv_tile = block if block in (16, 32, 64) else BLOCK
    q_tiles, kv_tiles = padded(q_len) // BLOCK, -(-kv_len // kv_tile)
    if BLOCK % group:  # groups straddle tiles: go through one row per query
        selected, group = selected.repeat_interleave(group, 2), 1
    if causal:  # drop the blocks that start after a row's last query
        last = (torch.arange(selected.shape[2], device=selected.device) + 1) * group - 1
        selected = selected & (torch.arange(n_blocks, device=selected.device) * block <= last[:, None])
    per = BLOCK // group
    tiled = F.pad(selected, (0, 0, 0, q_tiles * per - selected.shape[2])).view(B, H, q_tiles, per, n_blocks)
    starts = torch.arange(n_blocks, device=selected.device) * block
    tiles = torch.arange(kv_tiles, device=selected.device)
    covers = ((tiles >= (starts // kv_tile)[:, None]) & (tiles <= ((starts + block - 1) // kv_tile)[:, None])).float()
    touched = (tiled.any(3).float() @ covers) > 0  # [B, H, q_tiles, kv_tiles]
    full = touched & ((~tiled.all(3)).float() @ covers == 0)
    if causal:  # a key tile is before a query tile's first query, or overlaps its queries, or lies after them
        q_start = torch.arange(q_tiles, device=selected.device)[:, None] * BLOCK
        touched &= tiles * kv_tile < q_start + BLOCK
        full &= (tiles + 1) * kv_tile <= q_start + 1
    partial = touched & ~full

    def listed(table: Tensor) -> tuple[Tensor, Tensor]:
        return table.sum(-1, dtype=torch.int32), table.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)

    return BlockMask.from_kv_blocks(
        *listed(partial), *listed(full), BLOCK_SIZE=(BLOCK, kv_tile), mask_mod=mask, seq_lengths=(q_len, kv_len)
    )


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: MaskMod | None,
    *,
    q_pos: Tensor | None = None,
    kv_pos: Tensor | None = None,
    per_head: bool = False,
    dropout: float = 0.0,
    scale: float | None = None,
    block: BlockMask | None = None,
    engine: Engine | None = None,
) -> Tensor:
    """Attention of q [B, H, Tq, D] over k, v [B, Hkv, Tk, D*] where `mask` allows; None: every key.

    Positions default to aligned (0..Tq-1 and 0..Tk-1); with cached keys pass their absolute positions.
    `per_head`: the mask differs between heads. `block`: a prebuilt block mask for a dynamic `mask`.
    """
    if mask is None:
        return sdpa(q, k, v, dropout=dropout, scale=scale)
    aligned = q_pos is None and kv_pos is None
    if aligned and mask is masks.causal():
        return sdpa(q, k, v, causal=True, dropout=dropout, scale=scale)
    if wants_flex(q, aligned, dropout, engine):
        if block is None:
            block = block_mask(mask, None, q.shape[1] if per_head else None, q.shape[2], k.shape[2], q.device)
        return flex(q, k, v, block, scale)
    q_pos = torch.arange(q.shape[2], device=q.device) if q_pos is None else q_pos
    kv_pos = torch.arange(k.shape[2], device=q.device) if kv_pos is None else kv_pos
    dense = masks.dense(mask, q_pos, kv_pos, q.shape[0], q.shape[1])
    return sdpa(q, k, v, dense, dropout=dropout, scale=scale)
