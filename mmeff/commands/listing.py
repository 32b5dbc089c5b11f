"""`mmeff blocks | models`: the block registry and the named model presets."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from pathlib import Path

from mmeff.commands import command

BLOCK_SOURCES = Path(__file__).resolve().parents[1] / "blocks"


def _cache_file() -> Path:
    """Where the block listing of these block sources is kept: named by a hash of their text."""
    digest = hashlib.sha256()
    for path in sorted(BLOCK_SOURCES.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "mmeff" / f"blocks-{digest.hexdigest()[:16]}.json"


def block_rows() -> list[dict[str, str]]:
    """Name, kind, summary and options of every registered block.

    Listing the registry imports the blocks and so torch (seconds); the listing is kept in the user's cache
    under a hash of the block sources, so later calls read it (and any change to a block makes a new one).
    """
    cache = _cache_file()
    if cache.is_file():
        return json.loads(cache.read_text())
    from mmeff import blocks
    from mmeff.blocks.registry import options

    rows = []
    for kind in ("mixer", "ffn", "norm"):
        for name in blocks.names(kind):
            entry = blocks.entry(name)
            params = options(entry.cls) or {}
            shown = ", ".join(f"{k}={p.default!r}" if p.default is not p.empty else k for k, p in params.items())
            rows.append({"name": name, "kind": kind, "summary": entry.summary, "options": shown})
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=cache.parent, delete=False, suffix=".tmp") as f:
            json.dump(rows, f)
        os.replace(f.name, cache)
    except OSError:
        pass  # a read-only home: list without keeping it
    return rows


def _blocks_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="show this block's options")


@command(
    "blocks", "list the registered blocks (token mixers, channel mixers, norms) or one block's options", _blocks_arguments,
    examples=["mmeff blocks", "mmeff blocks gla"],
)
def blocks(args: argparse.Namespace) -> int:
    rows = block_rows()
    if args.name:
        from mmeff.config import ConfigError

        row = next((r for r in rows if r["name"] == args.name), None)
        if row is None:
            raise ConfigError(f"unknown block {args.name!r}; registered: {', '.join(sorted(r['name'] for r in rows))}")
        print(f"{row['name']} ({row['kind']}): {row['summary']}\noptions: {row['options'] or 'none'}")
        return 0
    for row in rows:
        print(f"{row['name']:16s} {row['kind']:6s} {row['summary']}")
    return 0


def _models_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="print this preset's sections as YAML")


@command(
    "models", "list the named model presets (encoder + backbone) that a config names with `preset: NAME`", _models_arguments,
    examples=["mmeff models", "mmeff models vit-s-gla", "mmeff fit my_run.yaml   # with `preset: vit-s-gla` in it"],
)
def models(args: argparse.Namespace) -> int:
    from mmeff.presets import PRESETS

    if args.name:
        import yaml

        print(yaml.safe_dump(PRESETS.get(args.name).sections, sort_keys=False), end="")
        return 0
    for entry in PRESETS.entries():
        print(f"{entry.name:16s} {entry.summary}")
    return 0
