"""Fuzzing (hypothesis, bounded): the config loader and the shard reader fail only with mmeff's own errors."""

import io
import tarfile

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from mmeff import config
from mmeff.config import ConfigError
from mmeff.data import make_loader
from mmeff.errors import DataError
from mmeff.tasks import transforms

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)

KEYS = ["name", "encoder", "task", "backbone", "data", "trainer", "optim", "dim", "depth", "pattern", "mixers",
        "lr", "betas", "batch_size", "num_classes", "image_size", "patch_size", "logger", "kwargs", "attn", "heads", 1, None]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True), st.text(max_size=8),
                    st.sampled_from(["image", "classify", "lm", "attn", "gla*2", "csv", "1e-3", "cpu"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)), max_leaves=12)
BASE = {"name": "t", "encoder": {"name": "image", "image_size": 16, "patch_size": 4}, "task": {"name": "classify"},
        "backbone": {"dim": 32, "pattern": ["attn"]}}


@FUZZ
@given(patch=st.dictionaries(st.sampled_from(KEYS), values, max_size=4), overrides=st.lists(
    st.tuples(st.lists(st.sampled_from([k for k in KEYS if isinstance(k, str)]), min_size=1, max_size=3),
              st.text(max_size=12)), max_size=3))
def test_config_loader_raises_only_config_errors(tmp_path_factory, patch, overrides):
    path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    path.write_text(yaml.safe_dump({**BASE, **patch}, allow_unicode=True))
    try:
        config.load(path, [f"--{'.'.join(keys)}={raw}" for keys, raw in overrides])
    except ConfigError:
        pass


@FUZZ
@given(text=st.text(max_size=200))
def test_any_config_text_raises_only_config_errors(tmp_path_factory, text):
    path = tmp_path_factory.getbasetemp() / "fuzz_text.yaml"
    path.write_text(text)
    try:
        config.load(path)
    except ConfigError:
        pass


@pytest.fixture(scope="module")
def shard_bytes(digits_root):
    return (digits_root / "val-000000.tar").read_bytes()[: 24 * 1024]


def _tar(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


members = st.lists(st.tuples(st.sampled_from(["s1.png", "s1.cls", "s2.png", "s2.cls", "s3.txt", "x", ".cls", "s4.png.cls"]),
                             st.binary(max_size=64)), max_size=6)


@FUZZ
@given(kind=st.sampled_from(["flip", "cut", "tar"]), at=st.integers(0, 24 * 1024 - 1), byte=st.integers(0, 255),
       tar_members=members, strict=st.booleans())
def test_shard_reader_raises_only_data_errors(tmp_path_factory, tiny_config, shard_bytes, kind, at, byte, tar_members, strict):
    root = tmp_path_factory.mktemp("shard")
    data = bytearray(shard_bytes)
    if kind == "flip":
        data[at] = byte
    elif kind == "cut":
        data = data[:at]
    else:
        data = bytearray(_tar(tar_members))
    (root / "val-000000.tar").write_bytes(bytes(data))
    cfg = config.load(tiny_config(**{"data.root": str(root), "data.strict": strict}))
    try:
        for batch in make_loader(cfg.data, "val", transforms(cfg)[1], train=False):
            assert all(0 <= int(y) < 10 for y in batch["label"])
    except DataError:
        assert strict
