"""Loading shards: train samples dealt to ranks and workers by `mmeff.data.plan` (or resampled shards), eval shards
split by rank and worker, equal batch counts on every rank, mid-epoch resume on any number of ranks, skip counting,
and a Lightning DataModule."""

from __future__ import annotations

import glob
import itertools
import logging
import math
import os
import random
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate

from mmeff.config import DataConfig
from mmeff.data.plan import Deal, Indices, Piece, Plan, Start
from mmeff.data.shards import INDEX, build_shards, count_samples, read_index
from mmeff.errors import DataError, MmeffError

logger = logging.getLogger("mmeff.data")

Transform = Callable[[dict[str, Any]], dict[str, Any]]
SPLITS = ("train", "val", "test")
# What reading a broken (truncated, garbage, badly compressed) tar file raises.
_SHARD_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, zlib.error)


class SkipCounter:
    """Counts the samples and shards skipped in this process (or stops at the first when `strict`)."""

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.total = 0
        self._pending = 0

    def skip(self, problem: str) -> None:
        """Raise a DataError saying `problem` if strict; else log it as a warning and count one skip."""
        if self.strict:
            raise DataError(
                f"{problem} (data.strict: true stops at the first bad shard or sample; false skips and counts them)"
            )
        logger.warning("skipping %s", problem)
        self.total += 1
        self._pending += 1

    def take(self) -> int:
        """The number of skips since the previous call."""
        pending, self._pending = self._pending, 0
        return pending


class ShardStream(IterableDataset):
    """One rank's batches of a shard list. Train: in each epoch, `plan`'s samples for this rank (as many batches on
    every rank), shuffled; `start`: where the first epoch iterated begins (a mid-epoch resume). Eval: one pass
    (`equal`: padded with repeated batches to the longest rank's count, for sharded models).
    """

    def __init__(
        self,
        shards: list[str],
        sizes: list[int],
        transform: Transform,
        batch_size: int,
        world_size: int,
        rank: int,
        workers: int,
        strict: bool = False,
        equal: bool = False,
        plan: Plan | None = None,
        start: Start | None = None,
    ) -> None:
        super().__init__()
        self.shards, self.sizes = shards, sizes
        self.transform, self.batch_size = transform, batch_size
        self.world_size, self.rank, self.workers = world_size, rank, max(1, workers)
        self.plan, self.start = plan, start
        self.epoch = start.epoch if start else 0
        self.counter = SkipCounter(strict)
        self.padding = 0  # eval batches repeated at the end to match the other ranks (`equal`)
        if plan is not None:
            self.length = plan.length
        else:
            lengths = [self._eval_length(r) for r in range(world_size)]
            self.length = max(lengths) if equal else lengths[rank]
            self.padding = self.length - lengths[rank]
            if self.padding:
                logger.warning(
                    "eval: rank %d repeats %d batch(es) to match the other ranks' %d (a sharded model needs every "
                    "rank in each step); shards of equal size, a multiple of the ranks in number, avoid it",
                    rank, self.padding, self.length,
                )

    def _eval_length(self, rank: int) -> int:
        """Eval batches of `rank`: each worker batches its own shards, so each ends with its own partial batch."""
        mine = self.sizes[rank :: self.world_size]
        workers = min(self.workers, len(mine)) or 1
        return sum(math.ceil(sum(mine[w::workers]) / self.batch_size) for w in range(workers))

    def __len__(self) -> int:
        """Batches per epoch on this rank (all workers together)."""
        return self.length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """One epoch of batches (in a DataLoader worker: that worker's share)."""
        # Counted here, eagerly: with persistent workers each worker's copy counts the same epochs.
        epoch, self.epoch = self.epoch, self.epoch + 1
        _, _, worker, workers = wds.utils.pytorch_worker_info()
        if self.plan is None:
            mine = list(range(len(self.shards)))[self.rank :: self.world_size]
            return self._eval_batches(mine[worker::workers], worker)
        start, self.start = self.start or Start(epoch, self.plan.segment(epoch)), None
        return self._train_batches(start, worker)

    def _train_batches(self, start: Start, worker: int) -> Iterator[dict[str, Any]]:
        """This worker's batches of `start`'s segment after the `start.skip` batches per rank already trained on."""
        segment = start.segment
        pieces, sizes = segment.share(self.rank, worker)
        done = segment.deal.done(start.skip, worker)
        samples = self._train_samples([(s, i) for _, s, i in pieces], start.epoch, segment.index, worker,
                                      sum(sizes[:done]))
        for n, size in enumerate(sizes[done:], done):
            batch = list(itertools.islice(samples, size))
            if len(batch) < size:
                read = sorted({self.shards[s] for _, s, _ in pieces}) or "(shards drawn at random)"
                raise DataError(
                    f"training data: rank {self.rank} worker {worker} got no usable sample from its shards {read} "
                    f"after {n} of {len(sizes)} batches (every shard or sample was skipped)"
                )
            yield self._collate(batch)

    def _train_samples(self, pieces: list[Piece], epoch: int, segment: int, worker: int,
                       skip: int) -> Iterator[dict[str, Any]]:
        """Transformed samples of `pieces`, shuffled, then again (reshuffled) only to replace skipped ones; resampled:
        whole shards drawn with replacement, without end. The first `skip` are read but not transformed."""
        assert self.plan is not None
        shuffle = self.plan.shuffle(epoch)
        for n in itertools.count():
            if self.plan.resampled:
                draw = random.Random(shuffle.seed_of(segment, self.rank, worker, n))
                count = max(1, len(self.shards) // self.world_size)
                pieces = [(s, None) for s in draw.choices(range(len(self.shards)), k=count)]
            produced = passed = 0
            for raw in shuffle(self._read(pieces), segment, self.rank, worker, n):
                if skip:
                    skip, passed = skip - 1, passed + 1
                    continue
                for sample in self._apply([raw]):
                    produced += 1
                    yield sample
            if not produced and not passed:  # everything was skipped: stop rather than loop forever
                return

    def _eval_batches(self, shards: list[int], worker: int) -> Iterator[dict[str, Any]]:
        """One pass of `shards` in batches; worker 0 then repeats its first batch `padding` times (flagged `_pad`)."""
        first = None
        for batch in self._batched(self._read([(s, None) for s in shards])):
            first = batch if first is None else first
            yield batch
        if worker == 0 and self.padding:
            if first is None:  # this rank has no shard of its own: pad with the split's first samples
                first = next(iter(self._batched(self._read([(0, None)]))))
            for _ in range(self.padding):
                yield {**first, "_skipped": 0, "_pad": True}

    def _batched(self, raws: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        return wds.batched(self.batch_size, collation_fn=self._collate)(self._apply(raws))

    def _read(self, pieces: Iterable[tuple[int, Indices | None]]) -> Iterator[dict[str, Any]]:
        """Raw samples at the given positions of each shard (None: all); the rest of a corrupt or truncated shard is
        skipped and counted."""
        for shard, wanted in pieces:
            url, n = self.shards[shard], 0
            positions = iter(itertools.count() if wanted is None else wanted)
            position = next(positions, None)
            try:
                for sample in wds.tarfile_samples([{"url": url}]):
                    if n == position:
                        yield sample
                        position = next(positions, None)
                    n += 1
                    if position is None:
                        break
            except _SHARD_ERRORS as e:
                self.counter.skip(f"corrupt shard {url} after {n} sample(s): {_reason(e)}")
                continue
            if position is not None and n < self.sizes[shard]:
                self.counter.skip(f"truncated shard {url}: it ended after {n} of {self.sizes[shard]} samples")

    def _apply(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The transform of each sample; one it cannot use (a missing field, bytes that do not decode, a label out of
        range) is skipped and counted."""
        for raw in samples:
            try:
                sample = self.transform(raw)
            except MmeffError:
                raise
            except Exception as e:  # noqa: BLE001 - what a sample's bytes make a decoder raise is that sample's fault
                missing = isinstance(e, KeyError) and e.args
                why = f"missing field {e.args[0]!r}" if missing else f"{type(e).__name__}: {e}"
                self.counter.skip(f"sample {_describe(raw)} in shard {raw.get('__url__')}: {why}")
                continue
            yield sample

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {**default_collate(samples), "_skipped": self.counter.take()}


def _describe(raw: dict[str, Any]) -> str:
    """A sample's key, with the file it was made from where the shard records it (`src` field)."""
    src = raw.get("src")
    if isinstance(src, bytes):
        src = src.decode("utf-8", "replace")
    return f"{raw.get('__key__')!r}" + (f" (from {src})" if src else "")


def _reason(e: BaseException) -> str:
    """A short description of a shard read error (webdataset appends the stream and url to its args)."""
    text = getattr(e, "strerror", None) or (e.args[0] if e.args and isinstance(e.args[0], str) else "")
    return f"{type(e).__name__}: {text.split(' @ ')[0].splitlines()[0].rstrip(': ')}" if text else type(e).__name__


def make_loader(
    cfg: DataConfig,
    split: str,
    transform: Transform,
    train: bool,
    world_size: int = 1,
    rank: int = 0,
    epoch: int = 0,
    resume: dict[str, Any] | None = None,
    equal: bool = False,
) -> DataLoader:
    """A DataLoader of `split`'s batches for one rank (`epoch`: the first epoch's number; `resume`: a checkpoint's
    train position, a ShardDataModule.state_dict, to continue that epoch from; `equal`: eval padded to the same batch
    count on every rank)."""
    shards = find_shards(cfg, split)
    sizes = _shard_sizes(shards, cfg.strict)
    workers = cfg.num_workers
    plan = start = None
    if train:
        deal = Deal(world_size, max(1, workers), cfg.batch_size)
        plan = Plan(tuple(os.path.basename(s) for s in shards), tuple(sizes), deal, cfg.seed,
                    cfg.samples_per_epoch or sum(sizes), cfg.resampled, cfg.shuffle_buffer)
        start = plan.start(epoch, resume or {})
    elif len(shards[rank::world_size]) < workers:
        mine = len(shards[rank::world_size])
        logger.info(
            "%s split: rank %d has %d shard(s), so it uses as many loader workers, not %d", split, rank, mine, workers
        )
        workers = mine
    batch_size = cfg.batch_size if train else cfg.eval_batch_size or cfg.batch_size
    dataset = ShardStream(shards, sizes, transform, batch_size, world_size, rank, cfg.num_workers, cfg.strict, equal,
                          plan, start)
    # Persistent workers keep their dataset copy, whose epoch counter sets each epoch's shard order.
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def find_shards(cfg: DataConfig, split: str) -> list[str]:
    """Absolute paths of the shards matching `cfg.<split>` (glob or {a..b} braces) under `cfg.root`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    pattern = getattr(cfg, split)
    if pattern is None:
        raise ValueError(f"data.{split} is not set, so there are no {split} shards")
    root = Path(cfg.root)
    found, unmatched = [], []
    for part in wds.shardlists.expand_urls(pattern):
        matches = sorted(glob.glob(str(root / part)))
        if matches:
            found.extend(matches)
        else:
            unmatched.append(part)
    if unmatched:
        what = "matches nothing" if not found else f"has no match for {', '.join(unmatched[:3])}"
        hint = f"; write them with `mmeff shards --source {cfg.source} {cfg.root}`" if cfg.source else ""
        raise FileNotFoundError(f"no {split} shards: pattern {pattern!r} {what} in {root.absolute()}{hint}")
    return [os.path.abspath(p) for p in dict.fromkeys(found)]


def _shard_sizes(shards: list[str], strict: bool) -> list[int]:
    """Samples per shard: from the `index.json` beside it where it is listed, else by listing the tar."""
    known: dict[str, int] = {}
    for folder in {os.path.dirname(s) for s in shards}:
        if os.path.isfile(os.path.join(folder, INDEX)):
            for split, entry in read_index(folder).items():
                if split != "meta" and "counts" in entry:
                    known.update({os.path.join(folder, n): c for n, c in zip(entry["shards"], entry["counts"])})
    return [known[s] if s in known else _listed_size(s, strict) for s in shards]


def _listed_size(shard: str, strict: bool) -> int:
    try:
        return count_samples(Path(shard))
    except _SHARD_ERRORS as e:
        message = f"cannot list shard {shard} ({_reason(e)}); counting it as 0 samples"
        if strict:
            raise DataError(message.replace("; counting it as 0 samples", "")) from e
        logger.warning(message)
        return 0


def saved_position(checkpoint: str | Path) -> dict[str, Any]:
    """The train data position in a Lightning checkpoint (a file, or a sharded checkpoint's folder), read without
    restoring anything, for ShardDataModule(resume=...)."""
    path = Path(checkpoint)
    saved = torch.load(path / "meta.pt" if path.is_dir() else path, map_location="cpu", weights_only=True, mmap=True)
    return saved.get(ShardDataModule.__qualname__, {})


class ShardDataModule(L.LightningDataModule):
    """Train / val / test loaders over `cfg`'s shards, split for the attached trainer's ranks.

    Its state (saved in each checkpoint) is the train position: the data epoch, the samples of it consumed and how
    its batches were dealt; `resume` (or Lightning's load_state_dict) continues from one, on any number of ranks.
    """

    def __init__(self, cfg: DataConfig, train_transform: Transform, eval_transform: Transform,
                 resume: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.resume = dict(resume or {})  # the train position of the checkpoint being resumed
        self._used: dict[str, Any] | None = None  # the position the train loader was built from
        self._start: Start | None = None
        self._plan: Plan | None = None

    def state_dict(self) -> dict[str, Any]:
        """Where training is in its data epoch: the epoch, the samples of it consumed (all ranks), the segments it
        ran on ([ranks, workers, batch size, batches per rank] each) and what fixes its order."""
        trainer = self.trainer
        if trainer is None or self._plan is None or self._start is None:
            return {}
        done, epoch = trainer.fit_loop.epoch_loop.batch_progress.current.processed, trainer.current_epoch
        if done >= trainer.num_training_batches:  # saved at the epoch's end: the next run starts the next epoch
            state = {"epoch": epoch + 1, "consumed": 0, "offset": 0, "segments": []}
        else:
            start = self._start if self._start.epoch == epoch else Start(epoch, self._plan.segment(epoch))
            state = start.state(done)
        return {**state, **self._plan.identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep the resumed checkpoint's position; the next train loader continues its epoch."""
        if self._used is None:
            self.resume = dict(state)
        elif state != self._used:
            logger.warning(
                "resume: the checkpoint's data position came after the train loader was built (a strategy that "
                "restores after its setup, with a schedule that asked for the loader's length), so its epoch starts "
                "over; pass the position as ShardDataModule(..., resume=...) (`mmeff fit --resume` does)"
            )

    def prepare_data(self) -> None:
        """Write `cfg.source`'s shards into `cfg.root` when it has no train shards yet (once per node)."""
        if self.cfg.source is None:
            return
        try:
            find_shards(self.cfg, "train")
        except FileNotFoundError:
            logger.info("writing the %s shards into %s", self.cfg.source, self.cfg.root)
            build_shards(None, self.cfg.root, source=self.cfg.source)

    def _loader(self, split: str, train: bool) -> DataLoader:
        trainer = self.trainer
        transform = self.train_transform if train else self.eval_transform
        if trainer is None:
            return make_loader(self.cfg, split, transform, train)
        state: dict[str, Any] = {}
        if train:
            state, self.resume = self.resume, {}
        loader = make_loader(
            self.cfg, split, transform, train, trainer.world_size, trainer.global_rank, trainer.current_epoch, state,
            # A sharded model (mmeff.strategies.FSDP) gathers weights in every step: every rank must take as many.
            equal=hasattr(trainer.strategy, "shard"),
        )
        if train:
            dataset = loader.dataset
            assert isinstance(dataset, ShardStream) and dataset.start is not None
            self._used, self._start, self._plan = state, dataset.start, dataset.plan
            if dataset.start.count is not None:
                trainer.callbacks.append(_EpochCount(dataset.start.count))
        return loader

    def train_dataloader(self) -> DataLoader:
        """Endless shuffled train batches, a fixed number per epoch on every rank."""
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader | list:
        """Each val sample once across ranks (no loader when `cfg.val` is unset)."""
        return self._loader("val", False) if self.cfg.val else []

    def test_dataloader(self) -> DataLoader | list:
        """Each test sample once across ranks (no loader when `cfg.test` is unset)."""
        return self._loader("test", False) if self.cfg.test else []


class _EpochCount(Callback):
    """Sets Lightning's batch count in a resumed epoch to `count`, where the batches of the epoch dealt again begin,
    once Lightning has restored its loops (the checkpoint counted batches of another deal). Lightning ends an epoch
    when its count reaches the loader's length, so the epoch then ends with the loader's last batch."""

    def __init__(self, count: int) -> None:
        self.count: int | None = count

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.count is None:
            return
        current = trainer.fit_loop.epoch_loop.batch_progress.current
        shift, self.count = self.count - current.processed, None
        for name in ("ready", "started", "processed", "completed"):
            setattr(current, name, getattr(current, name) + shift)
