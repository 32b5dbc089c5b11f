"""The digit-canvas source: same bytes from the same seed, labels that match its layout, no held-out scan in train."""

import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mmeff.data import build_shards, read_index

OPTIONS = {"size": 64, "train": 12, "val": 4, "test": 8, "maxcount": 8}


def samples(root, split):
    shards = [str(root / name) for name in read_index(root)[split]["shards"]]
    return list(wds.tarfile_samples([{"url": s} for s in shards]))


@pytest.fixture(scope="module")
def canvas_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("canvas")
    build_shards(None, root, source="digit-canvas", **OPTIONS)
    return root


def test_same_seed_writes_the_same_bytes(canvas_root, tmp_path):
    build_shards(None, tmp_path, source="digit-canvas", **OPTIONS)
    names = sorted(p.name for p in canvas_root.glob("*.tar"))
    assert names == sorted(p.name for p in tmp_path.glob("*.tar"))
    assert len(names) == 4  # train: 2 shards, val and test: 1
    for name in names + ["index.json"]:
        assert (canvas_root / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_labels_match_a_recount_from_the_layout(canvas_root):
    from sklearn.datasets import load_digits

    targets = load_digits().target
    for split in ("train", "val", "test"):
        for sample in samples(canvas_root, split):
            layout = json.loads(sample["json"])
            hot = np.load(io.BytesIO(sample["labels.npy"]))
            assert hot.dtype == np.uint8 and set(np.flatnonzero(hot)) == set(layout["digits"])
            assert [int(targets[j]) for j in layout["sources"]] == layout["digits"]
            assert 1 <= len(layout["digits"]) <= 6
            image = np.asarray(Image.open(io.BytesIO(sample["png"])))
            assert image.shape == (64, 64)
            covered = np.zeros_like(image, dtype=bool)
            for x, y, side in layout["boxes"]:
                assert 6 <= side <= 16 and x + side <= 64 and y + side <= 64
                assert not covered[y : y + side, x : x + side].any(), "digits overlap"
                assert image[y : y + side, x : x + side].max() > 0, "an empty digit box"
                covered[y : y + side, x : x + side] = True
            assert not image[~covered].any(), "ink outside the digit boxes"


def test_no_test_or_val_scan_appears_in_train(canvas_root):
    used = {
        split: {j for s in samples(canvas_root, split) for j in json.loads(s["json"])["sources"]}
        for split in ("train", "val", "test")
    }
    assert used["train"] and used["test"]
    assert not used["train"] & used["test"] and not used["train"] & used["val"] and not used["val"] & used["test"]


def test_options_that_cannot_fit_are_named(tmp_path):
    with pytest.raises(ValueError, match="lower max_digits or max_scale"):
        build_shards(None, tmp_path, source="digit-canvas", max_digits=6, max_scale=0.4, train=1)
    with pytest.raises(ValueError, match="min_digits <= max_digits"):
        build_shards(None, tmp_path, source="digit-canvas", min_digits=3, max_digits=2, train=1)
