"""`--resume last` with sharded checkpoints, and the checkpoint callbacks' state on a resume (issue 23): a sharded
last.ckpt folder is the resume point even when older single-file checkpoints sit beside it; no two checkpoint
callbacks of different roles share a Lightning state key (one would restore the other's paths); without a monitor
the export holds the current weights, not a "best" path a resume restored."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.callbacks import ModelCheckpoint

import mmeff
from mmeff import config, trainer
from mmeff.tasks import build_model

pytestmark = [pytest.mark.usefixtures("one_thread"),  # torch.distributed.checkpoint's warnings, in one process
              pytest.mark.filterwarnings("ignore:TypedStorage is deprecated", "ignore:torch.distributed is disabled")]


def _config(tmp_path: Path, **trainer_options) -> config.RunConfig:
    return config.parse({
        "name": "run", "run_dir": str(tmp_path / "${name}"), "data": {"root": str(tmp_path / "shards")},
        "encoder": {"name": "image", "image_size": 8, "patch_size": 4},
        "backbone": {"dim": 16, "pattern": ["attn"], "depth": 1, "causal": False, "mixers": {"attn": {"heads": 2}}},
        "task": {"name": "classify", "num_classes": 10}, "trainer": trainer_options,
    })


def _sharded(path: Path) -> None:
    """A sharded checkpoint folder as Lightning's ModelParallelStrategy writes it (DCP files + meta.pt)."""
    dcp.save({"state_dict": {"w": torch.ones(2)}}, checkpoint_id=str(path), no_dist=True)
    torch.save({"global_step": 4}, path / "meta.pt")


def test_resume_last_takes_the_sharded_last_folder_over_an_older_file(tmp_path, capsys):
    cfg = _config(tmp_path)
    folder = cfg.out_dir / "checkpoints"
    folder.mkdir(parents=True)
    older = folder / "epoch=0-step=2.ckpt"
    torch.save({"global_step": 2}, older)
    os.utime(older, (1, 1))
    last = folder / "last.ckpt"
    last.mkdir()  # without .metadata: not a complete sharded checkpoint, so the older file is taken (said why)
    assert trainer._resume_path(cfg, "last") == str(older)
    assert f"{last} is unreadable (a folder without the .metadata" in capsys.readouterr().out
    last.rmdir()
    _sharded(last)
    assert trainer._resume_path(cfg, "last") == str(last)
    assert trainer._resume_path(cfg, str(last)) == str(last)


def _roles(cfg: config.RunConfig) -> dict[str, str]:
    """Each checkpoint callback's state key -> its role (the file it writes: last, or the best checkpoints)."""
    callbacks = [c for c in trainer._fit_callbacks(cfg, False, False) if isinstance(c, ModelCheckpoint)]
    roles = {c.state_key: "last" if c.filename == "last" else "best" for c in callbacks}
    assert len(roles) == len(callbacks), "two callbacks of one run share a state key"
    return roles


def test_checkpoint_callbacks_of_different_roles_never_share_a_state_key(tmp_path):
    # A run resumed with other settings (validation off, as the one-rank resume of test_distributed) restores each
    # callback's state by its key: a key of the other role would bring back that role's best_model_path.
    seen: dict[str, str] = {}
    for val in ("val-*.tar", None):
        for steps in (None, 2):
            cfg = _config(tmp_path, checkpoint_every_n_steps=steps)
            cfg.data.val = val
            for key, role in _roles(cfg).items():
                assert seen.setdefault(key, role) == role, f"{key} is the state key of a '{seen[key]}' and a '{role}'"
    assert set(seen.values()) == {"best", "last"}


def test_export_without_a_monitor_holds_the_current_weights(tmp_path):
    cfg = _config(tmp_path)
    model = build_model(cfg)
    stale = tmp_path / "stale.ckpt"  # a "best" path restored by a resume, older than the weights trained since
    torch.save({"state_dict": {f"model.{k}": torch.zeros_like(v) for k, v in model.state_dict().items()}}, stale)
    callback = SimpleNamespace(monitor=None, best_model_path=str(stale))
    fake = SimpleNamespace(checkpoint_callback=callback, is_global_zero=True)
    trainer.ExportBest(cfg).on_fit_end(fake, SimpleNamespace(model=model))
    exported = mmeff.load(cfg.out_dir / "export").state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(exported[name], tensor, msg=name)
