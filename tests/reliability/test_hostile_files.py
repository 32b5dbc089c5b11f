"""Hostile and mismatched checkpoint files: each is refused in one line naming the file, and none runs code
(a sentinel file that a pickle or a `!!python/object` tag would create never appears)."""

import pickle

import pytest
import torch
import yaml
from safetensors.torch import save_file

import mmeff
import mmeff.trainer
from mmeff import checkpoint, config
from mmeff.errors import CheckpointError, MmeffError
from mmeff.tasks import build_model


class Plant:
    """Unpickling this creates the sentinel file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.fixture
def export(tmp_path, tiny_config):
    cfg = config.load(tiny_config())
    return checkpoint.export(build_model(cfg), cfg, tmp_path / "export")


def test_pickle_named_model_safetensors(tmp_path, export):
    sentinel = tmp_path / "SENTINEL"
    (export / checkpoint.WEIGHTS).write_bytes(pickle.dumps(Plant(sentinel)))
    with pytest.raises(CheckpointError, match=f"{export / checkpoint.WEIGHTS}: not a readable safetensors file"):
        mmeff.load(export)
    assert not sentinel.exists()


def test_truncated_weights(export):
    weights = export / checkpoint.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"{weights}: not a readable safetensors file"):
        mmeff.load(export)


def test_python_object_config(tmp_path, export):
    sentinel = tmp_path / "SENTINEL"
    (export / checkpoint.CONFIG).write_text(f"!!python/object/apply:os.system ['touch {sentinel}']\n")
    with pytest.raises(CheckpointError, match=f"{export / checkpoint.CONFIG}: not a plain YAML config"):
        mmeff.load(export)
    assert not sentinel.exists()


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"dim": 48}, r"shapes differ: \S+ \([\d, ]*48[\d, ]*\) in the file, \([\d, ]*32[\d, ]*\) for the config"),
        ({"depth": 2}, r"unexpected \['backbone.layers.1"),
        ({"classes": 7}, r"shapes differ: .*head.1.weight \(7, 32\) in the file, \(10, 32\)"),
    ],
)
def test_weights_of_another_model(tmp_path, tiny_config, export, change, fragment):
    other = {"dim": "backbone.dim", "depth": "backbone.depth", "classes": "task.num_classes"}
    cfg = config.load(tiny_config(**{other[k]: v for k, v in change.items()}))
    save_file(build_model(cfg).state_dict(), str(export / checkpoint.WEIGHTS))
    with pytest.raises(CheckpointError, match=f"{export / checkpoint.WEIGHTS}: the weights do not match .*; {fragment}"):
        mmeff.load(export)


def test_pickled_resume_checkpoint_is_refused(tmp_path, tiny_config):
    cfg = config.load(tiny_config())
    sentinel = tmp_path / "SENTINEL"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": Plant(sentinel)}, ckpt)
    with pytest.raises(MmeffError, match=f"--resume {ckpt}: {ckpt} cannot be loaded"):
        mmeff.trainer.fit(cfg, resume=str(ckpt))
    assert not sentinel.exists()


def test_config_yaml_with_a_wrong_value(export):
    data = yaml.safe_load((export / checkpoint.CONFIG).read_text())
    data["backbone"]["dim"] = 0
    (export / checkpoint.CONFIG).write_text(yaml.safe_dump(data))
    with pytest.raises(CheckpointError, match=f"{export / checkpoint.CONFIG}: backbone.dim: got 0"):
        mmeff.load(export)
