"""The resume point written after a validation that also wrote a new best checkpoint is a hard link to that file, not
a second write; the export then takes the weights in memory instead of reading the best file back."""

import os

import torch
from safetensors.torch import load_file

import mmeff.trainer
from mmeff import checkpoint, config
from mmeff.cli import main

ONE_STEP = {"data.val": "val-*.tar", "trainer.max_steps": 1, "trainer.max_epochs": 1,
            "trainer.kwargs": {"limit_val_batches": 1, "val_check_interval": 1}}


def _files(cfg: config.RunConfig) -> tuple[os.stat_result, os.stat_result, dict]:
    folder = cfg.out_dir / "checkpoints"
    (best,) = folder.glob("epoch=*.ckpt")
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    return os.stat(best), os.stat(folder / "last.ckpt"), state


def test_last_checkpoint_is_a_link_to_the_best_of_the_same_step_and_the_export_reads_neither(tiny_config, monkeypatch):
    path = tiny_config(**ONE_STEP)
    read = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: read.append(str(f)) or real_load(f, *a, **k))
    assert main(["fit", str(path)]) == 0
    assert not any(f.endswith(".ckpt") for f in read)  # the best weights were the ones in memory
    monkeypatch.setattr(torch, "load", real_load)
    cfg = config.load(path)
    best, last, state = _files(cfg)
    assert (best.st_ino, best.st_dev) == (last.st_ino, last.st_dev) and best.st_nlink == 2
    exported = load_file(cfg.out_dir / "export" / checkpoint.WEIGHTS)
    assert exported and all(torch.equal(t, state[f"model.{name}"]) for name, t in exported.items())
    assert not list((cfg.out_dir / "checkpoints").glob(".*"))  # no partial file left


def test_without_hard_links_the_best_file_is_copied(tiny_config, monkeypatch):
    def no_links(*args):
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(mmeff.trainer.os, "link", no_links)
    path = tiny_config(**ONE_STEP)
    assert main(["fit", str(path)]) == 0
    cfg = config.load(path)
    best, last, _ = _files(cfg)
    folder = cfg.out_dir / "checkpoints"
    assert best.st_ino != last.st_ino and best.st_nlink == 1
    assert (folder / "last.ckpt").read_bytes() == next(folder.glob("epoch=*.ckpt")).read_bytes()
