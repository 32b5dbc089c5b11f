"""Writing WebDataset shards (`{split}-{i:06d}.tar` + `index.json`) and reading their index."""

from __future__ import annotations

import fcntl
import functools
import json
import os
import re
import tarfile
from collections.abc import Iterable, Sized
from pathlib import Path
from typing import Any

from mmeff.config import ConfigError
from mmeff.data import sources

INDEX = "index.json"
_SPLIT_NAME = re.compile(r"\w+")


def write_shards(
    samples: Iterable[dict[str, Any]],
    out_dir: str | Path,
    split: str,
    maxcount: int = 100,
    meta: dict[str, Any] | None = None,
    total: int | None = None,
) -> list[Path]:
    """Write `samples` as `{out_dir}/{split}-{i:06d}.tar` shards and record them in `index.json`.

    A progress bar (on a terminal) counts the samples, out of `total` (or `len(samples)`) when known.
    """
    import webdataset as wds  # imports torch: not needed to list the sources
    from tqdm import tqdm

    out_dir = Path(out_dir)
    if not _SPLIT_NAME.fullmatch(split) or split == "meta":
        raise ValueError(f"split name {split!r}: use letters, digits and _ only (and not 'meta')")
    out_dir.mkdir(parents=True, exist_ok=True)
    temps: list[str] = []
    counts: list[int] = []

    def finished(fname: str) -> None:
        temps.append(fname)
        counts.append(writer.count)

    # Shards go to `.tmp` names, renamed once the whole split is written: readers never see a
    # half-written shard and a failed write leaves the old split as it was. mtime=0: same bytes each run.
    writer = wds.ShardWriter(
        str(out_dir / f"{split}-%06d.tar.tmp"), maxcount=maxcount, post=finished, verbose=0, mtime=0
    )
    total = total if total is not None else len(samples) if isinstance(samples, Sized) else None
    try:
        for sample in tqdm(samples, total=total, desc=f"{out_dir.name}/{split}", unit=" samples", disable=None):
            writer.write(sample)
        if writer.total == 0:
            raise ValueError(f"no samples to write for split {split!r}")
        writer.close()
    except BaseException:
        if getattr(writer, "tarstream", None) is not None:
            writer.tarstream.close()
        for tmp in {*temps, writer.fname}:
            Path(tmp).unlink(missing_ok=True)
        raise
    shards = [Path(tmp.removesuffix(".tmp")) for tmp in temps]
    for tmp, shard in zip(temps, shards):
        os.replace(tmp, shard)
    stale = re.compile(rf"{split}-\d{{6}}\.tar")
    for old in out_dir.glob(f"{split}-*.tar"):
        if stale.fullmatch(old.name) and old not in shards:
            old.unlink()
    _update_index(out_dir, split, {"shards": [s.name for s in shards], "samples": sum(counts), "counts": counts}, meta)
    return shards


def _update_index(out_dir: Path, split: str, entry: dict[str, Any], meta: dict[str, Any] | None) -> None:
    """Read-modify-write `index.json` under a lock, replacing it atomically."""
    with open(out_dir / f".{INDEX}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = out_dir / INDEX
        index = json.loads(path.read_text()) if path.is_file() else {}
        index[split] = entry
        if meta:
            index.setdefault("meta", {}).update(meta)
        tmp = path.with_name(f"{INDEX}.tmp")
        tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)


def read_index(root: str | Path) -> dict[str, Any]:
    """The shard index of `root`: its `index.json`, or one derived by listing the `*.tar` files there."""
    root = Path(root)
    if (root / INDEX).is_file():
        return json.loads((root / INDEX).read_text())
    index: dict[str, Any] = {}
    for shard in sorted(root.glob("*.tar")):
        split = re.sub(r"[-_.]?\d+$", "", shard.stem) or shard.stem
        entry = index.setdefault(split, {"shards": [], "samples": 0, "counts": []})
        n = count_samples(shard)
        entry["shards"].append(shard.name)
        entry["counts"].append(n)
        entry["samples"] += n
    return index


def count_samples(shard: Path) -> int:
    """Distinct sample keys in a tar file, from its member list (cached while the file is unchanged)."""
    stat = shard.stat()
    return _count_keys(str(shard), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=None)
def _count_keys(path: str, mtime_ns: int, size: int) -> int:
    from webdataset.tariterators import base_plus_ext
    with tarfile.open(path) as tar:
        return len({base_plus_ext(m.name)[0] for m in tar if m.isreg()} - {None})


def build_shards(src: str | None, out: str | Path, /, source: str | None = None, **options: Any) -> dict[str, int]:
    """Write shards into `out` from a bundled `source` (its options as keywords; `src` may give its `src` option)
    or from a folder / CSV / JSONL manifest `src`."""
    if src is None and source is None and "src" not in options:
        raise ConfigError("give either SRC (a folder or a .csv/.jsonl manifest) or a bundled source (mmeff shards --help lists them)")
    source = source or "folder"
    if src is not None:
        if "src" in options:
            raise ConfigError(f"SRC {src} and the option src={options['src']} both given; give one")
        if "src" not in sources.options(source):
            raise ConfigError(f"shard source {source!r} reads no SRC; its options (-o KEY=VALUE): {sources.describe_options(source) or 'none'}")
        options["src"] = src
    return sources.build(source, Path(out), **options)
