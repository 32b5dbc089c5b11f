"""Which train samples each rank and loader worker takes in an epoch, in which batches; which of them a checkpoint
taken mid-epoch had consumed; and the rest of that epoch dealt again over another number of ranks, workers or batch
size.

An epoch's samples are the split's shards in an order drawn from (seed, epoch), cut to the epoch's sample count, and
dealt in contiguous runs: rank 0 takes the first run, and in a rank's run worker 0 the first part, so that a worker
reads a few consecutive shards (its first and last perhaps in part). Each worker shuffles its samples in webdataset's
buffer. Which samples come out of the buffer depends on their positions only, never on their bytes: the samples a
checkpoint had consumed are found by replaying the buffers on positions, without reading a shard.

Neither webdataset nor Lightning keeps a position that another number of ranks can continue from (Lightning stores a
loader's own state, for the same loaders); this module adds one on top of webdataset's tar reading and shuffle.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import zlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import webdataset as wds

logger = logging.getLogger("mmeff.data")

Indices = range | np.ndarray  # ascending positions of samples in their shard
Piece = tuple[int, Indices]  # (shard number in the split's list, positions)


@dataclass(frozen=True)
class Deal:
    """Who takes the samples: ranks, loader workers per rank (1 when loading in the main process), batch size."""

    world_size: int
    workers: int
    batch_size: int

    def done(self, batches: int, worker: int) -> int:
        """How many of a rank's first `batches` batches came from `worker` (the DataLoader takes batch i from worker
        i % workers)."""
        return batches // self.workers + (worker < batches % self.workers)


class Shuffle:
    """The workers' sample order in one epoch: webdataset's shuffle buffer, seeded per rank, worker, pass and segment
    (a segment after the first adds its number: the first keeps the seeds an epoch always had)."""

    def __init__(self, buffer: int, seed: int, epoch: int) -> None:
        self.buffer, self.seed, self.epoch = buffer, seed, epoch

    def seed_of(self, segment: int, rank: int, worker: int, n: int) -> int:
        """The seed of pass `n` (n > 0: a worker reading its samples again to replace skipped ones)."""
        return wds.utils.make_seed(self.seed, self.epoch, rank, worker, n, *([segment] if segment else []))

    def __call__(self, items: Iterator[Any], segment: int, rank: int, worker: int, n: int = 0) -> Iterator[Any]:
        """`items` shuffled."""
        return wds.shuffle(self.buffer, seed=self.seed_of(segment, rank, worker, n))(items)


@dataclass
class Segment:
    """The part of an epoch trained on one deal: its samples in order (None when resampled: counted only), each
    rank's batch sizes, and its number in the epoch (0 unless a resume dealt the epoch again; it seeds shuffles)."""

    deal: Deal
    samples: list[Piece] | None
    batches: list[list[int]]
    index: int = 0

    def share(self, rank: int, worker: int) -> tuple[list[tuple[int, int, Indices]], list[int]]:
        """The samples of `worker` of `rank` as (piece number, shard, positions), and its batch sizes."""
        k = self.deal.workers
        mine = self.batches[rank][worker::k]
        if self.samples is None:
            return [], mine
        before = sum(map(sum, self.batches[:rank])) + sum(sum(self.batches[rank][w::k]) for w in range(worker))
        return _cut(self.samples, before, sum(mine)), mine

    def consumed(self, batches: int) -> int:
        """Samples in every rank's first `batches` batches."""
        return sum(sum(sizes[:batches]) for sizes in self.batches)

    def rest(self, batches: int, shuffle: Shuffle) -> list[Piece]:
        """The samples in no rank's first `batches` batches, in order (each worker's shuffle replayed on positions)."""
        assert self.samples is not None
        taken: dict[int, list[int]] = defaultdict(list)  # positions taken from pieces not wholly taken (yet)
        whole: set[int] = set()
        for rank, worker in itertools.product(range(self.deal.world_size), range(self.deal.workers)):
            pieces, sizes = self.share(rank, worker)
            positions = ((n, i) for n, _, indices in pieces for i in indices)
            order = shuffle(positions, self.index, rank, worker)
            for n, i in itertools.islice(order, sum(sizes[: self.deal.done(batches, worker)])):
                taken[n].append(i)
                if len(taken[n]) == len(self.samples[n][1]):  # memory stays bounded by the buffer, not the epoch
                    whole.add(n)
                    del taken[n]
        rest = []
        for n, (shard, indices) in enumerate(self.samples):
            left = np.setdiff1d(np.asarray(indices), taken[n], assume_unique=True) if n in taken else indices
            if n not in whole and len(left):
                rest.append((shard, left))
        return rest


@dataclass
class Start:
    """Where a train loader starts: its first epoch and segment, the segments of that epoch before it ([ranks,
    workers, batch size, batches per rank trained] each) and the samples they consumed, the batches per rank of the
    segment already trained on (`skip`), Lightning's batch count where the segment begins (`offset`), and the count
    Lightning must take up in place of the checkpoint's (`count`; None: the checkpoint's)."""

    epoch: int
    segment: Segment
    history: list[list[int]] = dataclasses.field(default_factory=list)
    consumed: int = 0
    skip: int = 0
    offset: int = 0
    count: int | None = None

    def state(self, processed: int) -> dict[str, Any]:
        """The position after Lightning's `processed` batches of this epoch (for a checkpoint)."""
        done = processed - self.offset
        d = self.segment.deal
        return {"epoch": self.epoch, "consumed": self.consumed + self.segment.consumed(done), "offset": self.offset,
                "segments": [*self.history, [d.world_size, d.workers, d.batch_size, done]]}


@dataclass(frozen=True)
class Plan:
    """Every epoch's train samples for one deal: the split (shard names and sizes), the seed, the samples of an epoch
    (all ranks), whether shards are drawn with replacement, and the shuffle buffer."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    deal: Deal
    seed: int
    count: int
    resampled: bool
    buffer: int

    @property
    def length(self) -> int:
        """Batches per rank in an epoch."""
        return max(1, self.count // (self.deal.world_size * self.deal.batch_size))

    def identity(self) -> dict[str, Any]:
        """What fixes the epochs' samples and order whatever the deal (saved with a position, checked on resume)."""
        split = zlib.crc32("\n".join(f"{n}:{s}" for n, s in zip(self.names, self.sizes)).encode())
        return {"seed": self.seed, "shards": split, "samples": self.count, "resampled": self.resampled,
                "shuffle_buffer": self.buffer}

    def shuffle(self, epoch: int) -> Shuffle:
        """The workers' sample order in `epoch`."""
        return Shuffle(self.buffer, self.seed, epoch)

    def segment(self, epoch: int) -> Segment:
        """Epoch `epoch` from its start: `length` full batches on every rank."""
        d = self.deal
        samples = None if self.resampled else self._order(epoch, self.length * d.world_size * d.batch_size)
        return Segment(d, samples, [[d.batch_size] * self.length for _ in range(d.world_size)])

    def _order(self, epoch: int, count: int) -> list[Piece]:
        """The first `count` samples of `epoch`: whole shards in an order drawn from (seed, epoch), over as many
        passes of the split as `count` needs."""
        pieces: list[Piece] = []
        if not any(self.sizes):  # no shard could be listed: the workers' reads report why
            return pieces
        draw = random.Random(self.seed + epoch)
        while True:
            order = list(range(len(self.sizes)))
            draw.shuffle(order)
            for shard in order:
                take = min(self.sizes[shard], count)
                if take:
                    pieces.append((shard, range(take)))
                    count -= take
                if not count:
                    return pieces

    def start(self, epoch: int, state: dict[str, Any]) -> Start:
        """Where the train loader starts: epoch `epoch` from its beginning, or the position `state` (a
        ShardDataModule.state_dict from a checkpoint), whose own epoch counts (Lightning may build the loader before
        it restores its epoch): on the same deal, the rest of its last segment; on another, what its segments left,
        dealt over this deal."""
        epoch = state.get("epoch", epoch)
        if not state.get("segments"):  # no position, or one saved at an epoch's end (`epoch` is the next)
            return Start(epoch, self.segment(epoch))
        saved = {k: state.get(k) for k in self.identity()}
        if saved != self.identity():
            logger.warning("resume: the checkpoint stopped inside epoch %d of other data (%s; this run has %s), so "
                           "the data of epoch %d starts over", epoch, saved, self.identity(), epoch)
            return Start(epoch, self.segment(epoch))
        history, shuffle, consumed = [list(s) for s in state["segments"]], self.shuffle(epoch), 0
        deals = [Deal(*entry[:3]) for entry in history] + [self.deal]
        segment = dataclasses.replace(self, deal=deals[0]).segment(epoch)
        for j, entry in enumerate(history):
            done = entry[3]
            if deals[j:] == [self.deal, self.deal]:  # the last segment, on this run's deal: continue it
                logger.info("resume: skipping the %d batches per rank of epoch %d that were trained on", done, epoch)
                return Start(epoch, segment, history[:-1], consumed, done, state.get("offset", 0))
            consumed += segment.consumed(done)
            segment, left = self._deal(segment, done, deals[j + 1], shuffle)
        d, dealt = self.deal, segment.consumed(len(segment.batches[0]))
        logger.warning(
            "resume: the checkpoint stopped after %d samples of epoch %d on %s rank(s) x %s worker(s), batches of %s; "
            "the %d samples left of the epoch are dealt over this run's %d rank(s) x %d worker(s), batches of %d "
            "(%d batches per rank)%s", consumed, epoch, *history[-1][:3], left, d.world_size, d.workers,
            d.batch_size, len(segment.batches[0]),
            f"; {left - dealt} of them are left out so that every rank takes as many batches" if left > dealt else "",
        )
        if self.resampled:
            logger.warning("resume: data.resampled draws shards with replacement, so the rest of epoch %d is drawn "
                           "afresh on the new deal: samples seen before the checkpoint may come again", epoch)
        if not dealt:  # too few samples left for every rank to take one: Lightning ends the epoch, the next begins
            return Start(epoch + 1, self.segment(epoch + 1), count=self.length)
        offset = self.length - len(segment.batches[0])
        return Start(epoch, segment, history, consumed, 0, offset, offset)

    def _deal(self, segment: Segment, done: int, deal: Deal, shuffle: Shuffle) -> tuple[Segment, int]:
        """What `segment` left after `done` batches per rank, dealt over `deal` (in at most the batches per rank of an
        epoch on `deal`), and the number of samples it left."""
        limit = dataclasses.replace(self, deal=deal).length
        if segment.samples is None:
            left = segment.consumed(len(segment.batches[0])) - segment.consumed(done)
            return Segment(deal, None, rank_batches(left, deal, limit), segment.index + 1), left
        rest = segment.rest(done, shuffle)
        left = sum(len(i) for _, i in rest)
        batches = rank_batches(left, deal, limit)
        return Segment(deal, _pieces(_cut(rest, 0, sum(map(sum, batches)))), batches, segment.index + 1), left


def rank_batches(count: int, deal: Deal, limit: int) -> list[list[int]]:
    """Each rank's batch sizes for `count` samples: as many batches on every rank (at most `limit`), full ones first,
    every sample taken except where that is impossible (fewer samples than ranks, batch size 1, or more samples than
    `limit` batches hold)."""
    ranks, size = deal.world_size, deal.batch_size
    each, extra = divmod(count, ranks)
    counts = [min(each + (r < extra), limit * size) for r in range(ranks)]
    batches = min(limit, -(-counts[0] // size))
    if counts[-1] < batches:  # the short ranks cannot fill as many batches: every rank takes as few samples
        counts = [counts[-1]] * ranks
        batches = -(-counts[-1] // size)
    return [_split(c, batches, size) for c in counts]


def _split(count: int, batches: int, size: int) -> list[int]:
    """`count` samples in `batches` batches of at most `size`: full ones first, at least one sample in each."""
    out = []
    for i in range(batches):
        out.append(min(size, count - (batches - 1 - i)))
        count -= out[-1]
    return out


def _cut(pieces: list[Piece], start: int, count: int) -> list[tuple[int, int, Indices]]:
    """Samples `start` to `start + count` of `pieces` as (piece number, shard, positions)."""
    out = []
    for n, (shard, indices) in enumerate(pieces):
        if count <= 0:
            break
        if start >= len(indices):
            start -= len(indices)
            continue
        part = indices[start : start + count]
        out.append((n, shard, part))
        start, count = 0, count - len(part)
    return out


def _pieces(numbered: list[tuple[int, int, Indices]]) -> list[Piece]:
    return [(shard, indices) for _, shard, indices in numbered]
