"""One decoding step for sequences at different positions, on top of the per-layer `Cache` API.

A `Cache` holds one `offset` for all the rows of a batch. A serving batch holds sequences that
joined at different times, so each sequence keeps its own caches (one batch-1 `Cache` per layer)
and `step` runs one token of every sequence through the model's own forward, with each layer's
token mixer wrapped by a `RowMixer` for the duration of the step:

- state-only mixers (linear attention without positions, Mamba, Mamba-2): the rows' fixed-size
  states are concatenated along the batch, the mixer runs once, the new states are split back;
- plain causal `attn` (an unbounded KV cache): each row's new token is projected and rotated at its
  own position, and attends over its own keys, right-padded to the longest row and masked;
- any other mixer (bounded or latent caches, RetNet's positions, hybrids): the rows at the same
  offset (equal cache shapes) run together as one batch of the mixer itself.

Everything outside the mixers (embedding, norms, FFN, head) runs once for all rows. Each row sees
exactly the state it would see alone, so greedy text equals one-by-one generation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmeff.blocks.attention import Attention
from mmeff.blocks.cache import Cache
from mmeff.blocks.linear import LinearMixer
from mmeff.blocks.ssm import Mamba, Mamba2
from mmeff.ops.varlen import to_device


class RowCaches(Cache):
    """The per-sequence caches of one layer ([1, ...] tensors each), handed to a `RowMixer` as its cache."""

    def __init__(self, rows: Sequence[Cache]) -> None:
        super().__init__()
        self.rows = list(rows)


def mixer_kind(mixer: nn.Module) -> str:
    """'state' (offset-free fixed-size state), 'attn' (padded per-row KV) or 'group' (rows of equal offset)."""
    if isinstance(mixer, (Mamba, Mamba2)) or (
        isinstance(mixer, LinearMixer) and type(mixer).position_qk is LinearMixer.position_qk
    ):
        return "state"
    if type(mixer) is Attention and mixer.causal and mixer.cache_bound() is None:
        return "attn"
    return "group"


def _signature(cache: Cache) -> tuple:
    return tuple(
        (k, _signature(v) if isinstance(v, Cache) else (tuple(v.shape[1:]), v.dtype)) for k, v in sorted(cache.items())
    )


def _rows_of(tensors: Sequence[Tensor]) -> Tensor:
    """The batch of batch-1 tensors: the tensor they are consecutive row views of (the last step's output,
    so a batch that did not change is not copied), else their concatenation."""
    base = tensors[0]._base
    if (
        base is not None
        and base.shape[0] == len(tensors)
        and base.shape[1:] == tensors[0].shape[1:]
        and all(t._base is base and t.storage_offset() == base.storage_offset() + i * base.stride(0) for i, t in enumerate(tensors))
    ):
        return base
    return torch.cat(list(tensors))


def stack(caches: Sequence[Cache]) -> Cache:
    """One batch cache of equally shaped batch-1 caches (nested caches too), with the first one's offset."""
    out = Cache()
    out.offset = caches[0].offset
    for key, value in caches[0].items():
        out[key] = stack([c[key] for c in caches]) if isinstance(value, Cache) else _rows_of([c[key] for c in caches])
    return out


def unstack(batch: Cache, caches: Sequence[Cache], tokens: int) -> None:
    """Row i of `batch` into `caches[i]` (views; nested caches too); every offset advances by `tokens`."""
    for cache in caches:
        cache.offset += tokens
    for key, value in batch.items():
        if isinstance(value, Cache):
            unstack(value, [c.setdefault(key, Cache()) for c in caches], tokens)
        else:
            for i, cache in enumerate(caches):
                cache[key] = value[i : i + 1]


KV_ROOM = 64  # positions a padded KV batch grows by, so that steps of an unchanged batch write in place


def _padded_kv(caches: Sequence[Cache], name: str, new: Tensor, offsets: list[int], where: Tensor) -> Tensor:
    """[N, h, >= longest, d]: row i's cached keys (or values) `name` followed by its `new` ones [N, h, T, d] at
    positions `where` [N, T] (row i's offset onwards, on the device).

    Each row's cache keeps a view of that batch; when the next step has the same rows in the same order and the
    batch has room, the new tokens are written into it in place instead of copying every row again.
    """
    N, _, T, _ = new.shape
    lengths = [o + T for o in offsets]
    views = [c.get(name) for c in caches]
    base = views[0]._base if views[0] is not None else None
    reuse = (
        base is not None
        and base.shape[0] == N
        and max(lengths) <= base.shape[2]
        and all(v is not None and v._base is base and v.storage_offset() == base.storage_offset() + i * base.stride(0) for i, v in enumerate(views))
    )
    if not reuse:
        room = -(-max(lengths) // KV_ROOM) * KV_ROOM + KV_ROOM
        base = new.new_zeros(N, new.shape[1], room, new.shape[3])
        for i, view in enumerate(views):
            if offsets[i]:
                base[i, :, : offsets[i]] = view[0, :, : offsets[i]]
    rows = torch.arange(N, device=new.device)[:, None]
    base[rows, :, where] = new.transpose(1, 2)  # [N, T, h, d] at (row, position)
    for i, cache in enumerate(caches):
        cache[name] = base[i : i + 1, :, : lengths[i]]
    return base


def _attend_rows(mixer: Attention, x: Tensor, caches: Sequence[Cache]) -> Tensor:
    """`attn` over x [N, T, D] where row i continues `caches[i]` at its own offset; appends each row's keys/values."""
    N, T, _ = x.shape
    offsets = [c.offset for c in caches]
    # [N, T]: each new token's position in its row. A pinned, non-blocking copy: the host does not wait for the
    # queued kernels here, in every attention layer of every step.
    pos = to_device(offsets, torch.long, x.device)[:, None] + torch.arange(T, device=x.device)
    # Projections, q/k norms and RoPE act per token: the N rows' tokens as one sequence [1, N*T, D] with
    # each token at its own position give every row exactly its own q, k and v.
    q, kv = mixer.project(x.reshape(1, N * T, -1), pos.reshape(-1))
    q = q.unflatten(2, (N, T)).transpose(0, 2).squeeze(2)  # [1, H, N*T, d] -> [N, H, T, d]
    longest = max(offsets) + T
    k, v = (
        _padded_kv(caches, name, kv[name].unflatten(2, (N, T)).transpose(0, 2).squeeze(2), offsets, pos)[:, :, :longest]
        for name in ("k", "v")
    )
    for cache in caches:
        cache.offset += T
    key_pos = torch.arange(longest, device=x.device)
    mask = key_pos[None, None, :] <= pos[:, :, None]  # [N, T, L]: causal within each row's own keys
    if mixer.kv_heads != mixer.heads:
        k, v = (t.repeat_interleave(mixer.heads // mixer.kv_heads, dim=1) for t in (k, v))
    o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask[:, None])
    return mixer.merge(o, x)


class RowMixer(nn.Module):
    """Wraps a token mixer: with a `RowCaches` cache it steps every row at its own offset, otherwise it is the mixer."""

    def __init__(self, mixer: nn.Module) -> None:
        super().__init__()
        self.inner = mixer
        self.kind = mixer_kind(mixer)

    def forward(self, x: Tensor, cache: Cache | None = None, **context: Any) -> Tensor:
        if not isinstance(cache, RowCaches):
            return self.inner(x, cache=cache, **context)
        layout = context.get("layout")
        if layout is not None and (layout.docs is not None or layout.offset or layout.prefix):
            raise ValueError("a row step takes one plain sequence per row: the caches hold each row's position")
        if self.kind == "attn":
            return _attend_rows(self.inner, x, cache.rows)
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(cache.rows):
            key = _signature(row) if self.kind == "state" else (row.offset, _signature(row))
            groups.setdefault(key, []).append(i)
        if len(groups) == 1:  # every row in one batch (always for state mixers: one cache shape): no gather, no scatter
            return self._run(x, cache.rows).to(x.dtype)
        out = torch.empty_like(x)
        for members in groups.values():
            index = to_device(members, torch.long, x.device)
            y = self._run(x.index_select(0, index), [cache.rows[i] for i in members])
            out = out.index_copy(0, index, y.to(out.dtype))
        return out

    def _run(self, x: Tensor, rows: list[Cache]) -> Tensor:
        """The mixer over rows of equal cache shapes as one batch; each row's cache then holds its own row."""
        batch = stack(rows)
        y = self.inner(x, cache=batch)
        unstack(batch, rows, x.shape[1])
        return y


@contextmanager
def row_mixers(backbone: nn.Module) -> Iterator[None]:
    """Wrap every layer's token mixer in a `RowMixer` while the block runs (the model is unchanged after)."""
    layers = list(backbone.layers)
    mixers = [layer.mixer for layer in layers]
    try:
        for layer, mixer in zip(layers, mixers):
            layer.mixer = RowMixer(mixer)
        yield
    finally:
        for layer, mixer in zip(layers, mixers):
            layer.mixer = mixer


def step(model: nn.Module, tokens: Tensor, caches: Sequence[list[Cache]]) -> Tensor:
    """Next-token logits [N, V] after feeding tokens [N, T] to N sequences, each with its own per-layer caches."""
    if len(caches) == 1:  # one sequence: the model's own cached forward
        return model.head(model.hidden(model.embed(tokens), cache=caches[0])[:, -1])
    layers = len(caches[0])
    batch = [RowCaches([c[i] for c in caches]) for i in range(layers)]
    with row_mixers(model.backbone):
        hidden = model.hidden(model.embed(tokens), cache=batch)
    return model.head(hidden[:, -1])
