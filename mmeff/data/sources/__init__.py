"""Shard sources: modules that write one data set as WebDataset shards (`mmeff shards --source NAME OUT`).

Convention for a source module `mmeff/data/sources/<name>.py`, listed in `SOURCES`' table below:

- a one-line module docstring saying what it writes (the summary `mmeff shards --help` shows);
- `@SOURCES.register(NAME, summary=__doc__)` on `def build(out_dir: Path, **options) -> dict[str, int]`:
  options are keyword arguments with defaults (one without a default is required, like `folder`'s `src`);
  it writes the splits (`train`, `val`, `test`) with `mmeff.data.write_shards(samples, out_dir, split,
  maxcount, meta={"classes": [...]}, total=...)`, returns the number of samples per split and prints nothing;
- samples are dicts with a `__key__` (no dots) and fields named by extension, as the task
  transforms expect them: raw file bytes or an array under `png` / `wav` / ..., the integer
  label under `cls`, text under `txt`;
- splits are deterministic: a fixed `seed` option (default 0) and `split_indices` when the data
  set has no official split;
- heavy or optional imports (torch, webdataset, espeak) go inside `build`, so listing the sources stays cheap.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmeff.config import ConfigError
from mmeff.registry import Registry

logger = logging.getLogger("mmeff.data")

SOURCES: Registry[Callable[..., dict[str, int]]] = Registry(
    "shard source",
    {
        name: f"{__name__}.{name.replace('-', '_')}"
        for name in ("digits", "digit-scenes", "digit-canvas", "folder", "python-docs", "spoken-digits", "spoken-sentences", "text")
    },
)


def get(name: str) -> Callable[..., dict[str, int]]:
    """The build function of source `name` (`_` or `-` between words), or a ConfigError listing the sources."""
    name = name.replace("_", "-")
    if name not in SOURCES:
        raise ConfigError(f"unknown shard source {name!r}; bundled sources: {', '.join(SOURCES.names())} (see mmeff shards --help)")
    return SOURCES.get(name)


def options(name: str) -> dict[str, inspect.Parameter]:
    """The options of source `name`: its build function's keyword parameters after `out_dir`."""
    return dict(list(inspect.signature(get(name)).parameters.items())[1:])


def describe_options(name: str) -> str:
    """`-o` options of source `name` as 'key=default' (required ones as 'key=...')."""
    return " ".join(
        f"{k}=..." if p.default is inspect.Parameter.empty else f"{k}={_plain(p.default)}" for k, p in options(name).items()
    )


def _plain(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) if len(value) <= 4 else f"[{len(value)} values]"
    return str(value).replace(" ", "")


def build(name: str, out_dir: Path, **kwargs: Any) -> dict[str, int]:
    """Run source `name`'s `build(out_dir, **options)`, with clear errors for unknown names and options."""
    params = options(name)
    unknown = sorted(set(kwargs) - set(params))
    missing = sorted(k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in kwargs)
    if unknown or missing:
        problem = f"unknown option(s) {', '.join(unknown)}" if unknown else f"missing option(s) {', '.join(missing)}"
        raise ConfigError(f"shard source {name!r}: {problem}; its options (-o KEY=VALUE): {describe_options(name) or 'none'}")
    return get(name)(out_dir, **kwargs)


def split_indices(labels: Sequence[int], seed: int = 0, test: float = 0.2, val: float = 0.1) -> dict[str, np.ndarray]:
    """Deterministic stratified split: `test` of all samples held out, then `val` of the rest."""
    labels = np.asarray(labels)
    rest, test_idx = _split(np.arange(len(labels)), labels, test, seed)
    train_idx, val_idx = _split(rest, labels[rest], val, seed)
    return {"train": train_idx, "val": val_idx, "test": test_idx}


def _split(indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    try:
        return tuple(train_test_split(indices, test_size=fraction, stratify=labels, random_state=seed))
    except ValueError as e:  # some class has too few samples to be in both parts
        logger.warning("%s; splitting without stratification", e)
        return tuple(train_test_split(indices, test_size=fraction, random_state=seed))
