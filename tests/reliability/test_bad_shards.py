"""Corrupt, truncated, empty and mislabeled shards of real digits, read through the classify transform: skipped and
counted (naming shard and sample) with `strict: false`, one DataError naming them with `strict: true`."""

import logging

import pytest
import webdataset as wds

from mmeff import config
from mmeff.data import make_loader, write_shards
from mmeff.errors import DataError
from mmeff.tasks import transforms


def _digits(digits_root, n):
    return list(wds.WebDataset(str(digits_root / "val-000000.tar"), shardshuffle=False))[:n]


def _clean(sample):
    return {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}


@pytest.fixture
def bad_set(tmp_path, digits_root):
    """val-000000: 8 good; -000001: labels 99, -1 and 'cat' among 8; -000002: truncated; -000003: garbage;
    -000004: empty file."""
    samples = [_clean(s) for s in _digits(digits_root, 24)]
    for i, label in {9: b"99", 11: b"-1", 13: b"cat"}.items():
        samples[i]["cls"] = label
    shards = write_shards(iter(samples), tmp_path, "val", maxcount=8)
    data = shards[2].read_bytes()
    shards[2].write_bytes(data[: len(data) // 2])
    (tmp_path / "val-000003.tar").write_bytes(b"this is not a tar file " * 64)
    (tmp_path / "val-000004.tar").write_bytes(b"")
    return tmp_path


def _loader(tiny_config, root, strict):
    cfg = config.load(tiny_config(**{"data.root": str(root), "data.strict": strict}))
    return make_loader(cfg.data, "val", transforms(cfg)[1], train=False)


def test_bad_shards_are_skipped_and_counted(tiny_config, bad_set, caplog):
    with caplog.at_level(logging.WARNING, logger="mmeff.data"):
        batches = list(_loader(tiny_config, bad_set, strict=False))
    labels = [int(y) for b in batches for y in b["label"]]
    assert all(0 <= y < 10 for y in labels) and 8 + 5 <= len(labels) < 24
    assert sum(b["_skipped"] for b in batches) >= 5
    text = caplog.text
    assert "outside the 10 classes" in text and "invalid literal for int()" in text
    assert f"truncated shard {bad_set / 'val-000002.tar'}" in text or f"corrupt shard {bad_set / 'val-000002.tar'}" in text
    assert f"{bad_set / 'val-000003.tar'}" in text and f"{bad_set / 'val-000004.tar'}" in text


@pytest.mark.parametrize(
    "shard, fragment",
    [
        ("val-000001.tar", r"sample '\w+' in shard .*val-000001.tar: ValueError: label 'cls' is 99, outside the 10 classes"),
        ("val-000002.tar", r"(truncated|corrupt) shard .*val-000002.tar"),
        ("val-000003.tar", r"cannot list shard .*val-000003.tar"),
        ("val-000004.tar", r"cannot list shard .*val-000004.tar"),
    ],
)
def test_strict_stops_at_the_bad_shard_naming_it(tiny_config, bad_set, shard, fragment):
    for other in bad_set.glob("val-*.tar"):
        if other.name not in (shard, "val-000000.tar"):
            other.unlink()
    with pytest.raises(DataError, match=fragment) as e:
        list(_loader(tiny_config, bad_set, strict=True))
    assert "skipping" not in str(e.value)


def test_evaluation_says_how_many_samples_it_skipped(tiny_config, digits_root, tmp_path, capsys):
    import mmeff.trainer
    from mmeff import checkpoint
    from mmeff.tasks import build_model

    samples = [_clean(s) for s in _digits(digits_root, 8)]
    samples[5]["cls"] = b"99"
    write_shards(iter(samples), tmp_path / "data", "test", maxcount=8)
    cfg = config.load(tiny_config(**{"data.root": str(tmp_path / "data")}))
    export = checkpoint.export(build_model(cfg), cfg, tmp_path / "export")
    metrics = mmeff.trainer.evaluate(cfg, export, "test")
    assert "test/acc" in metrics
    assert "test: 1 sample(s) or shard(s) were skipped" in capsys.readouterr().out
