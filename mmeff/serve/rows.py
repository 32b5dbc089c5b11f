"""One decoding step for sequences at different positions, on top of the per-layer `Cache` API.

A `Cache` holds one `offset` for all the rows of a batch. A serving batch holds sequences that
joined at different times, so each sequence keeps its own caches (one batch-1 `Cache` per layer)
and `step` runs one token of every sequence through the model's own forward, with each layer's
token mixer wrapped by a `RowMixer` for the duration of the step:

- state-only mixers (linear attention without positions, Mamba, Mamba-2): the rows' fixed-size
  states are concatenated along the batch, the mixer runs once, the new states are split back;
- plain causal `attn` (an unbounded KV cache): each row's new token is projected and rotated at its
  own position, and attends over its own keys, kept in a slot of a per-layer KV batch (`KVSlots`)
  that steps write into in place and rows join (one copy) and leave (none); padding is masked;
- any other mixer (bounded or latent caches, RetNet's positions, hybrids): the rows at the same
  offset (equal cache shapes) run together as one batch of the mixer itself.

Everything outside the mixers (embedding, norms, FFN, head) runs once for all rows. Each row sees
exactly the state it would see alone, so greedy text equals one-by-one generation.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
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
    """The per-sequence caches of one layer ([1, ...] tensors each), handed to a `RowMixer` as its cache; `memo`
    is shared by the layers of one step."""

    def __init__(self, rows: Sequence[Cache], memo: dict | None = None) -> None:
        super().__init__()
        self.rows = list(rows)
        self.memo = {} if memo is None else memo


def mixer_kind(mixer: nn.Module) -> str:
    """'state' (offset-free fixed-size state), 'attn' (padded per-row KV) or 'group' (rows of equal offset)."""
    if isinstance(mixer, (Mamba, Mamba2)) or (
        isinstance(mixer, LinearMixer) and type(mixer).position is LinearMixer.position
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
    # Told from their storage, not `_base`: a view made under inference_mode has no `_base`.
    first, n = tensors[0], len(tensors)
    ptr, at, stride = first.untyped_storage().data_ptr(), first.storage_offset(), first.stride()
    if n > 1 and stride[0] >= first[0].numel() and all(
        t.untyped_storage().data_ptr() == ptr and t.shape == first.shape and t.stride() == stride and t.storage_offset() == at + i * stride[0]
        for i, t in enumerate(tensors)
    ):
        return first.as_strided((n, *first.shape[1:]), stride)
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


KV_ROOM = 64  # positions a KV batch is allocated beyond its longest row, so that steps write in place
SLOT_ROOM = 8  # spare rows (slots) of a KV batch, so that a sequence that joins is copied in without a new batch


class KVSlots:
    """One attention layer's keys and values of the running rows, [slots, h, room, d] each; a row keeps its slot.

    Each row's cache holds views of its slot ([1, h, length, d]); a step writes every row's new token in place,
    a row that joins is copied into a free slot, and a row that leaves frees its slot without a copy.
    """

    def __init__(self, new: dict[str, Tensor], slots: int, room: int) -> None:
        self.kv = {name: t.new_zeros(slots, t.shape[1], room, t.shape[3]) for name, t in new.items()}
        self.slot_views = {name: t.split(1) for name, t in self.kv.items()}  # [1, h, room, d] per slot
        self.room = room
        self.owners: list[weakref.ref[Cache] | None] = [None] * slots
        self.views: list[Tensor | None] = [None] * slots

    def holds(self, slot: int, cache: Cache | None) -> bool:
        """Whether `cache` is the live owner of `slot` (its keys are still the view this batch gave it); None, the
        referent of an owner already collected, holds nothing (it `is` that dead owner's referent too)."""
        owner = self.owners[slot]
        return cache is not None and owner is not None and owner() is cache and cache.get("k") is self.views[slot]

    def free(self, taken: set[int]) -> list[int]:
        """Slots outside `taken` whose owner is gone or no longer uses them (a row absent from this step keeps its slot)."""
        return [s for s, owner in enumerate(self.owners) if s not in taken and (owner is None or not self.holds(s, owner()))]

    def put(self, slot: int, cache: Cache, length: int) -> None:
        """Make `slot` `cache`'s: its tensors become views of the first `length` positions of the slot."""
        for name, views in self.slot_views.items():
            cache[name] = views[slot].narrow(2, 0, length)
        self.owners[slot], self.views[slot] = weakref.ref(cache), cache["k"]
        cache.kv_slot = (self, slot)


def _slot_of(cache: Cache) -> tuple[KVSlots, int] | None:
    held = getattr(cache, "kv_slot", None)
    return held if held is not None and held[0].holds(held[1], cache) else None


def _gather(batch: KVSlots, src: list[int], dst: list[int], fresh: KVSlots, length: int) -> None:
    """Slots `src` of `batch` into slots `dst` of `fresh` (their first `length` positions), one copy per tensor."""
    device = next(iter(fresh.kv.values())).device
    src_t, dst_t = to_device(src, torch.long, device), to_device(dst, torch.long, device)
    for name, t in fresh.kv.items():
        t[:, :, :length].index_copy_(0, dst_t, batch.kv[name][:, :, :length].index_select(0, src_t))


def _copy_in(batch: KVSlots, slot: int, cache: Cache, length: int) -> None:
    """A row that joins: its own keys and values (the first `length` positions) into `slot`."""
    if length:
        for name, t in batch.kv.items():
            t[slot, :, :length] = cache[name][0, :, :length]


def _place(caches: Sequence[Cache], new: dict[str, Tensor], offsets: list[int], lengths: list[int]) -> tuple[KVSlots, list[int]]:
    """The KV batch of `caches` and each row's slot, with room for `lengths` positions: the rows' batch of the last step
    when it has room for them (a row that joined copied into a free slot), else a new batch of the rows in order."""
    held = [_slot_of(c) for c in caches]
    batch = next((h[0] for h in held if h is not None), None)
    slots = [h[1] if h is not None and h[0] is batch else None for h in held]
    joining = [i for i, s in enumerate(slots) if s is None]
    if batch is not None and max(lengths) <= batch.room:
        free = batch.free({s for s in slots if s is not None}) if joining else []
        # Free slots below the last taken one are still attended (masked): compact once they are half the batch.
        if len(free) >= len(joining) and max([s for s in slots if s is not None] + free[: len(joining)]) < 2 * len(caches):
            for i, s in zip(joining, free):
                slots[i] = s
                _copy_in(batch, s, caches[i], offsets[i])
            return batch, slots
    fresh = KVSlots(new, len(caches) + SLOT_ROOM, -(-max(lengths) // KV_ROOM) * KV_ROOM + KV_ROOM)
    moved = [i for i, s in enumerate(slots) if s is not None]
    if moved:  # the rows of the old batch in one gather, not a copy per row
        _gather(batch, [slots[i] for i in moved], moved, fresh, max(offsets[i] for i in moved))
    for i in joining:
        _copy_in(fresh, i, caches[i], offsets[i])
    return fresh, list(range(len(caches)))


def _memo(rows: RowCaches, key: tuple, make: Callable[[], Any]) -> Any:
    """`make()`, once per step for all the layers that ask with the same `key` (their rows are at the same positions)."""
    if key not in rows.memo:
        rows.memo[key] = make()
    return rows.memo[key]


def _positions(offsets: list[int], T: int, device: torch.device) -> Tensor:
    """[N, T]: each new token's position in its row. A pinned, non-blocking copy: the host does not wait for the
    queued kernels."""
    return to_device(offsets, torch.long, device)[:, None] + torch.arange(T, device=device)


def _slot_mask(slots: list[int], offsets: list[int], T: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(slots [N] on the device, [S, 1, T, L] keys each slot's new tokens see): its own, causally; L (the longest
    row, rounded up to 16 for aligned kernels) never passes the batch's room, a multiple of KV_ROOM. A slot of
    no row sees its first key only (a finite output, never read)."""
    at = [0] * (max(slots) + 1)
    for s, o in zip(slots, offsets):
        at[s] = o
    pos = _positions(at, T, device)
    key_pos = torch.arange(-(-(max(offsets) + T) // 16) * 16, device=device)
    return to_device(slots, torch.long, device), (key_pos[None, None, :] <= pos[:, :, None])[:, None]


def _attend_rows(mixer: Attention, x: Tensor, rows: RowCaches) -> Tensor:
    """`attn` over x [N, T, D] where row i continues `rows.rows[i]` at its own offset; writes each row's keys/values
    into its slot of the layer's KV batch."""
    caches, (N, T, _) = rows.rows, x.shape
    offsets = [c.offset for c in caches]
    lengths = [o + T for o in offsets]
    pos = _memo(rows, ("pos", *offsets, T), lambda: _positions(offsets, T, x.device))
    # Projections, q/k norms and RoPE act per token: the N rows' tokens as one sequence [1, N*T, D] with
    # each token at its own position give every row exactly its own q, k and v.
    q, kv = mixer.project(x.reshape(1, N * T, -1), pos.reshape(-1))
    q = q.unflatten(2, (N, T)).transpose(0, 2).squeeze(2)  # [1, H, N*T, d] -> [N, H, T, d]
    new = {name: t.unflatten(2, (N, T)).transpose(0, 2).squeeze(2) for name, t in kv.items()}
    batch, slots = _place(caches, new, offsets, lengths)
    index, mask = _memo(rows, ("slots", *slots, *offsets, T), lambda: _slot_mask(slots, offsets, T, x.device))
    for name, t in batch.kv.items():
        t[index[:, None], :, pos] = new[name].transpose(1, 2)  # [N, T, h, d] at (slot, position)
    for slot, cache, length in zip(slots, caches, lengths):
        batch.put(slot, cache, length)
        cache.offset = length
    k, v = (batch.kv[name][: mask.shape[0], :, : mask.shape[-1]] for name in ("k", "v"))
    if mixer.kv_heads != mixer.heads:
        k, v = (t.repeat_interleave(mixer.heads // mixer.kv_heads, dim=1) for t in (k, v))
    in_order = slots == list(range(N))
    if not in_order:  # rows sit in other slots: queries to their slots, outputs back to the rows
        q = q.new_zeros(mask.shape[0], *q.shape[1:]).index_copy_(0, index, q)
    o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
    return mixer.merge(o if in_order else o.index_select(0, index), x)


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
            return _attend_rows(self.inner, x, cache)
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
    memo: dict = {}
    batch = [RowCaches([c[i] for c in caches], memo) for i in range(layers)]
    with row_mixers(model.backbone):
        hidden = model.hidden(model.embed(tokens), cache=batch)
    return model.head(hidden[:, -1])
