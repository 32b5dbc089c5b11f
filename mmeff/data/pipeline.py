"""Loading shards: per-rank and per-worker shard splits (or resampled shards), equal batch counts on every rank,
mid-epoch resume, skip counting, and a Lightning DataModule."""

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
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate

from mmeff.config import ConfigError, DataConfig
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
    """One rank's batches of a shard list: endless and shuffled for train (fixed length, the same on every rank), one
    pass for eval (`equal`: padded with repeated batches to the longest rank's count, for sharded models).

    `resampled`: train shards are drawn with replacement by each rank and worker instead of split among them.
    `skip`: batches this rank already took in the first epoch iterated (a mid-epoch resume); they are not repeated.
    """

    def __init__(
        self,
        shards: list[str],
        sizes: list[int],
        transform: Transform,
        batch_size: int,
        train: bool,
        world_size: int,
        rank: int,
        workers: int,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        epoch: int = 0,
        strict: bool = False,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        equal: bool = False,
        skip: int = 0,
    ) -> None:
        super().__init__()
        self.shards, self.sizes = shards, dict(zip(shards, sizes))
        self.transform, self.batch_size, self.train = transform, batch_size, train
        self.world_size, self.rank, self.workers = world_size, rank, max(1, workers)
        self.seed, self.shuffle_buffer, self.epoch = seed, shuffle_buffer, epoch
        self.resampled, self.skip = resampled, skip
        self.counter = SkipCounter(strict)
        self.padding = 0  # eval batches repeated at the end to match the other ranks (`equal`)
        if train:
            self.length = max(1, (samples_per_epoch or sum(sizes)) // (world_size * batch_size))
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
        mine = self.shards[rank :: self.world_size]
        workers = min(self.workers, len(mine)) or 1
        return sum(math.ceil(sum(self.sizes[s] for s in mine[w::workers]) / self.batch_size) for w in range(workers))

    def __len__(self) -> int:
        """Batches per epoch on this rank (all workers together)."""
        return self.length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """One epoch of batches (in a DataLoader worker: that worker's share)."""
        # Counted here, eagerly: with persistent workers each worker's copy counts the same epochs.
        epoch, self.epoch = self.epoch, self.epoch + 1
        skip, self.skip = self.skip, 0
        return self._epoch(epoch, skip)

    def _epoch(self, epoch: int, skip: int) -> Iterator[dict[str, Any]]:
        _, _, worker, workers = wds.utils.pytorch_worker_info()
        # Same order on every rank (seeded by epoch); the rank is explicit because wds.split_by_node
        # reads it from the environment / torch.distributed, which make_loader's callers need not set up.
        order = wds.SimpleShardList(self.shards, seed=self.seed + epoch if self.train else None)
        urls = [s["url"] for s in wds.split_by_worker(itertools.islice(order, self.rank, None, self.world_size))]
        if not self.train:
            yield from self._eval_batches(urls, worker)
            return
        # The DataLoader takes batch i from worker i % workers: the first `skip` batches were these workers' first.
        quota = self.length // workers + (worker < self.length % workers)
        skipped = skip // workers + (worker < skip % workers)
        quota -= skipped
        samples = self._samples(urls, epoch, worker, skipped * self.batch_size)
        batches = wds.batched(self.batch_size, collation_fn=self._collate)(samples)
        done = 0
        for batch in itertools.islice(batches, quota):
            done += 1
            yield batch
        if done < quota:
            raise DataError(
                f"training data: rank {self.rank} worker {worker} got no usable sample from its shards "
                f"{urls} after {done} of {quota} batches (every shard or sample was skipped)"
            )

    def _eval_batches(self, urls: list[str], worker: int) -> Iterator[dict[str, Any]]:
        """One pass of `urls` in batches; worker 0 then repeats its first batch `padding` times (flagged `_pad`)."""
        first = None
        for batch in wds.batched(self.batch_size, collation_fn=self._collate)(self._samples(urls, 0, worker)):
            first = batch if first is None else first
            yield batch
        if worker == 0 and self.padding:
            if first is None:  # this rank has no shard of its own: pad with the split's first samples
                first = next(iter(wds.batched(self.batch_size, collation_fn=self._collate)(
                    self._samples(self.shards[:1], 0, worker))))
            for _ in range(self.padding):
                yield {**first, "_skipped": 0, "_pad": True}

    def _samples(self, urls: list[str], epoch: int, worker: int, skip: int = 0) -> Iterator[dict[str, Any]]:
        """Transformed samples of `urls`: one pass for eval, shuffled passes without end for train (`resampled`:
        shards drawn with replacement from all of them); the first `skip` samples are read but not transformed."""
        if not urls and not (self.train and self.resampled):
            return
        for n in itertools.count() if self.train else range(1):
            seed = wds.utils.make_seed(self.seed, epoch, self.rank, worker, n)
            if self.train and self.resampled:
                urls = random.Random(seed).choices(self.shards, k=max(1, len(self.shards) // self.world_size))
            stages: list[Any] = [wds.SimpleShardList(urls), self._read]
            if self.train:
                stages.append(wds.shuffle(self.shuffle_buffer, seed=seed))
            produced = passed = 0
            for raw in wds.DataPipeline(*stages):
                if skip:
                    skip, passed = skip - 1, passed + 1
                    continue
                for sample in self._apply([raw]):
                    produced += 1
                    yield sample
            if not produced and not passed:  # everything was skipped: stop rather than loop forever
                return

    def _read(self, shards: Iterable[dict[str, str]]) -> Iterator[dict[str, Any]]:
        """Raw samples of each shard; the rest of a corrupt or truncated shard is skipped and counted."""
        for shard in shards:
            url, n = shard["url"], 0
            try:
                for sample in wds.tarfile_samples([shard]):
                    n += 1
                    yield sample
            except _SHARD_ERRORS as e:
                self.counter.skip(f"corrupt shard {url} after {n} sample(s): {_reason(e)}")
                continue
            if n < self.sizes[url]:
                self.counter.skip(f"truncated shard {url}: it ended after {n} of {self.sizes[url]} samples")

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
    skip: int = 0,
    equal: bool = False,
) -> DataLoader:
    """A DataLoader of `split`'s batches for one rank (`epoch`: the first epoch's number, for the shard order; `skip`:
    batches of it already trained on; `equal`: eval padded to the same batch count on every rank)."""
    shards = find_shards(cfg, split)
    workers = cfg.num_workers
    if train and not cfg.resampled and len(shards) < world_size * max(1, workers):
        raise ConfigError(
            f"data.num_workers: {split} split: {len(shards)} shard(s) cannot feed {world_size} rank(s) x "
            f"{max(1, workers)} "
            f"loader worker(s); write at least {world_size * max(1, workers)} shards (smaller maxcount) "
            "or use fewer workers (or data.resampled: true)"
        )
    if not train and len(shards[rank::world_size]) < workers:
        mine = len(shards[rank::world_size])
        logger.info(
            "%s split: rank %d has %d shard(s), so it uses as many loader workers, not %d", split, rank, mine, workers
        )
        workers = mine
    dataset = ShardStream(
        shards,
        _shard_sizes(shards, cfg.strict),
        transform,
        cfg.batch_size if train else cfg.eval_batch_size or cfg.batch_size,
        train,
        world_size,
        rank,
        cfg.num_workers,
        seed=cfg.seed,
        shuffle_buffer=cfg.shuffle_buffer,
        epoch=epoch,
        strict=cfg.strict,
        resampled=cfg.resampled,
        samples_per_epoch=cfg.samples_per_epoch,
        equal=equal,
        skip=skip,
    )
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


class ShardDataModule(L.LightningDataModule):
    """Train / val / test loaders over `cfg`'s shards, split for the attached trainer's ranks."""

    def __init__(self, cfg: DataConfig, train_transform: Transform, eval_transform: Transform) -> None:
        super().__init__()
        self.cfg = cfg
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.resume: dict[str, int] = {}  # where the checkpoint being resumed stopped in its epoch

    def state_dict(self) -> dict[str, int]:
        """Where training is in its epoch (saved in each checkpoint): the epoch, its batches done, the data layout."""
        trainer = self.trainer
        if trainer is None:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if done >= trainer.num_training_batches:  # saved at the epoch's end: the next run starts the next epoch
            return {"epoch": trainer.current_epoch + 1, "batches": 0, **self._layout()}
        return {"epoch": trainer.current_epoch, "batches": done, **self._layout()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Keep the resumed checkpoint's position; the next train loader starts after its batches."""
        self.resume = dict(state)

    def _layout(self) -> dict[str, int]:
        assert self.trainer is not None
        return {"world_size": self.trainer.world_size, "num_workers": self.cfg.num_workers,
                "batch_size": self.cfg.batch_size}

    def _start(self, epoch: int) -> tuple[int, int]:
        """The data epoch the train loader starts at and the batches of it to skip: `epoch`, or where the resumed
        checkpoint stopped. Lightning builds the loader before it moves past an epoch that the checkpoint ended."""
        state, self.resume = self.resume, {}
        if state.get("epoch") == epoch + 1 and not state.get("batches"):
            return epoch + 1, 0
        return epoch, self._skip(epoch, state)

    def _skip(self, epoch: int, state: dict[str, int]) -> int:
        """Batches of `epoch` that the resumed checkpoint (`state`) had trained on."""
        if not state or state.get("epoch") != epoch or not state.get("batches"):
            return 0
        if {k: state.get(k) for k in self._layout()} != self._layout():
            logger.warning(
                "resume: the checkpoint stopped after %d batches of epoch %d with %s; this run has %s, so the data "
                "of epoch %d starts over", state["batches"], epoch, {k: state.get(k) for k in self._layout()},
                self._layout(), epoch,
            )
            return 0
        logger.info("resume: skipping the %d batches of epoch %d that were trained on", state["batches"], epoch)
        return state["batches"]

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
        if trainer is None:
            return make_loader(self.cfg, split, self.train_transform if train else self.eval_transform, train)
        epoch, skip = self._start(trainer.current_epoch) if train else (trainer.current_epoch, 0)
        return make_loader(
            self.cfg, split, self.train_transform if train else self.eval_transform, train, trainer.world_size,
            trainer.global_rank, epoch=epoch, skip=skip,
            # A sharded model (mmeff.strategies.FSDP) gathers weights in every step: every rank must take as many.
            equal=hasattr(trainer.strategy, "shard"),
        )

    def train_dataloader(self) -> DataLoader:
        """Endless shuffled train batches, a fixed number per epoch on every rank."""
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader | list:
        """Each val sample once across ranks (no loader when `cfg.val` is unset)."""
        return self._loader("val", False) if self.cfg.val else []

    def test_dataloader(self) -> DataLoader | list:
        """Each test sample once across ranks (no loader when `cfg.test` is unset)."""
        return self._loader("test", False) if self.cfg.test else []
