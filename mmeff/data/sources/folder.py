"""Files laid out class/xxx.ext in a folder, or listed in a CSV/JSONL manifest (path, label[, split])."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import NamedTuple

from mmeff.data.shards import write_shards
from mmeff.data.sources import SOURCES, split_indices
from mmeff.errors import DataError

AUDIO = (".wav", ".flac", ".ogg", ".mp3")


class Row(NamedTuple):
    """One file to store: its path, class name and split (None: assign one)."""

    path: Path
    label: str
    split: str | None


@SOURCES.register("folder", summary=__doc__)
def build(out_dir: Path, src: str | Path, maxcount: int = 100, seed: int = 0) -> dict[str, int]:
    """Write each file's raw bytes under its extension key (`png`, `wav`, ...), its class index under `cls` and
    its path (relative to `src`'s folder) under `src`, which skip messages name. Audio files must decode."""
    src = Path(src)
    rows = _read_manifest(src) if src.is_file() else _scan_folder(src)
    missing = [str(r.path) for r in rows if not r.path.is_file()]
    if missing:
        raise FileNotFoundError(f"{src}: {len(missing)} listed file(s) do not exist, e.g. {missing[0]}")
    nameless = [str(r.path) for r in rows if not r.path.suffix]
    if nameless:
        raise ValueError(f"{src}: files need an extension to name their field, e.g. {nameless[0]}")
    _check_audio([r.path for r in rows if r.path.suffix.lower() in AUDIO])
    base = src if src.is_dir() else src.parent
    classes = sorted({r.label for r in rows}, key=_natural)
    index = {name: i for i, name in enumerate(classes)}
    labels = [index[r.label] for r in rows]
    if rows[0].split is None:
        splits = split_indices(labels, seed=seed)
    else:
        splits = {s: [i for i, r in enumerate(rows) if r.split == s] for s in sorted({r.split for r in rows})}
    counts = {}
    for split, indices in splits.items():
        samples = (
            {"__key__": f"file{i:07d}", rows[i].path.suffix[1:].lower(): rows[i].path.read_bytes(), "cls": labels[i],
             "src": _relative(rows[i].path, base)}
            for i in indices
        )
        write_shards(samples, out_dir, split, maxcount=maxcount, meta={"classes": classes}, total=len(indices))
        counts[split] = len(indices)
    return counts


def _check_audio(paths: list[Path]) -> None:
    """Raise a DataError naming the audio files that soundfile cannot open or that hold no samples."""
    import soundfile as sf

    bad = []
    for path in paths:
        try:
            if sf.info(str(path)).frames <= 0:
                bad.append(f"{path} (no samples)")
        except RuntimeError as e:  # soundfile's LibsndfileError: not a readable audio file
            bad.append(f"{path} ({str(e).split(': ')[-1]})")
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise DataError(f"{len(bad)} audio file(s) cannot be decoded: {'; '.join(bad[:5])}{more}; fix or remove them")


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:  # a manifest row pointing outside the manifest's folder
        return str(path)


def _scan_folder(root: Path) -> list[Row]:
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder or manifest")
    rows = [
        Row(path, class_dir.name, None)
        for class_dir in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        for path in sorted(class_dir.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    ]
    if not rows:
        raise ValueError(f"{root}: expected class folders with files in them (class/xxx.png)")
    return rows


def _read_manifest(manifest: Path) -> list[Row]:
    if manifest.suffix == ".csv":
        with open(manifest, newline="") as f:
            records = list(csv.DictReader(f))
    elif manifest.suffix == ".jsonl":
        records = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    else:
        raise ValueError(f"{manifest}: expected a folder or a .csv / .jsonl manifest")
    if not records:
        raise ValueError(f"{manifest}: no rows")
    has_split = any("split" in record for record in records)
    rows = []
    for n, record in enumerate(records, start=1):
        if "path" not in record or "label" not in record or has_split and not record.get("split"):
            needed = "path, label, split" if has_split else "path, label"
            raise ValueError(f"{manifest}: row {n} lacks one of {needed}: {record}")
        split = str(record["split"]) if has_split else None
        rows.append(Row(manifest.parent / record["path"], str(record["label"]), split))
    return rows


def _natural(name: str) -> tuple[int, int, str]:
    """Sort key putting numeric class names in numeric order ("2" before "10")."""
    return (0, int(name), "") if name.isdigit() else (1, 0, name)
