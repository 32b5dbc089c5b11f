"""Shard sources: modules that write one data set as WebDataset shards (`mmeff shards --source NAME OUT`).

Convention for a source module `mmeff/data/sources/<name>.py` (NAME on the command line may use `-`
for `_`, e.g. `spoken-digits` -> `spoken_digits.py`):

- a one-line module docstring saying what it writes; `available()` lists it without importing it;
- `def build(out_dir: Path, **options) -> dict[str, int]`: options are keyword arguments with
  defaults (one without a default is required, like `folder`'s `src`); it writes the splits
  (`train`, `val`, `test`) with `mmeff.data.write_shards(samples, out_dir, split, maxcount,
  meta={"classes": [...]})`, returns the number of samples per split and prints nothing;
- samples are dicts with a `__key__` (no dots) and fields named by extension, as the task
  transforms expect them: raw file bytes or an array under `png` / `wav` / ..., the integer
  label under `cls`, text under `txt`;
- splits are deterministic: a fixed `seed` option (default 0) and `split_indices` when the data
  set has no official split;
- heavy or optional imports go inside `build`, so listing and importing sources stays cheap.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import logging
import pkgutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("mmeff.data")


def available() -> dict[str, str]:
    """Bundled source names (with `-` for `_`) -> the first line of their module docstring."""
    names = {}
    for module in pkgutil.iter_modules(__path__):
        origin = importlib.util.find_spec(f"{__name__}.{module.name}").origin
        doc = ast.get_docstring(ast.parse(Path(origin).read_text())) or ""
        names[module.name.replace("_", "-")] = doc.strip().splitlines()[0] if doc.strip() else ""
    return names


def build(name: str, out_dir: Path, **options: Any) -> dict[str, int]:
    """Run source `name`'s `build(out_dir, **options)`, with clear errors for unknown names and options."""
    names = available()
    if name.replace("_", "-") not in names:
        raise ValueError(f"unknown shard source {name!r}; available: {', '.join(sorted(names))}")
    fn = importlib.import_module(f"{__name__}.{name.replace('-', '_')}").build
    params = dict(list(inspect.signature(fn).parameters.items())[1:])
    unknown = sorted(set(options) - set(params))
    missing = sorted(k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in options)
    if unknown or missing:
        problem = f"unknown option(s) {', '.join(unknown)}" if unknown else f"missing option(s) {', '.join(missing)}"
        raise ValueError(f"shard source {name!r}: {problem}; its options: {', '.join(params) or 'none'}")
    return fn(out_dir, **options)


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
