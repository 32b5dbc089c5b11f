"""The data layer: write WebDataset shards, and load them as batches for Lightning."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mmeff.data.shards import build_shards, read_index, write_shards

if TYPE_CHECKING:
    from mmeff.data.pipeline import ShardDataModule, SkipCounter, make_loader, saved_position

__all__ = ["ShardDataModule", "SkipCounter", "build_shards", "make_loader", "read_index", "saved_position",
           "write_shards"]


def __getattr__(name: str) -> Any:
    # The loading side imports Lightning (seconds); `mmeff shards` only needs the writing side.
    if name in ("ShardDataModule", "SkipCounter", "make_loader", "saved_position"):
        from mmeff.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
