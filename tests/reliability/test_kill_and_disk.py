"""SIGKILL mid-epoch and mid-checkpoint, then resume: the loss continues as in an uninterrupted run. A run folder
on a small tmpfs that a competing writer fills: the previous last.ckpt survives and the run resumes."""

import os
import subprocess
import sys
import tempfile

import pytest
import torch

import mmeff.trainer
from mmeff import config
from mmeff.errors import CheckpointError

# Runs `mmeff.trainer.fit(config)` in a child that SIGKILLs itself: after training step STEP (mid-epoch), or
# half-way through writing its second checkpoint file (mid-checkpoint: at the end of epoch 1, the new best one or,
# without a new best, last.ckpt; the end of epoch 0 wrote the best and linked it as last.ckpt).
DRIVER = """
import io, os, signal, sys
import torch
import mmeff.trainer as T
from lightning.pytorch.callbacks import Callback
from mmeff import config

mode, step = sys.argv[2], int(sys.argv[3])

class KillAt(Callback):
    def on_train_batch_end(self, trainer, *args):
        if mode == "epoch" and trainer.global_step == step:
            trainer.strategy.checkpoint_io.teardown()  # epoch 0's checkpoints on disk: the background writer is not raced
            os.kill(os.getpid(), signal.SIGKILL)

real_save, writes = torch.save, []

def save(obj, f):
    if mode == "checkpoint" and ".ckpt" in getattr(f, "name", ""):
        writes.append(1)
        if len(writes) == 2:
            buf = io.BytesIO()
            real_save(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, f)

torch.save = save
callbacks = T._fit_callbacks
T._fit_callbacks = lambda *a: callbacks(*a) + [KillAt()]
T.fit(config.load(sys.argv[1]))
"""

RUN = {"trainer.max_epochs": 3, "trainer.logger": "csv"}


def _final_val_loss(logged, run):
    return logged(run, "val/loss")[-1][1]


@pytest.mark.parametrize("mode, step", [("epoch", 6), ("checkpoint", 0)])
def test_sigkill_then_resume_continues_the_loss(short_config, logged, mode, step):
    straight = config.load(short_config(**RUN, name="straight"))
    mmeff.trainer.fit(straight)
    killed = config.load(path := short_config(**RUN, name="killed"))
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(path), mode, str(step)], capture_output=True, text=True, timeout=500)
    assert proc.returncode == -9, proc.stderr[-2000:]
    folder = killed.out_dir / "checkpoints"
    saved = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert saved == 4  # the end of epoch 0: epoch 1 was killed in its steps or while its checkpoint was written
    partial = [p.name for p in folder.glob(".*")]
    assert len(partial) == (mode == "checkpoint") and all(p.endswith(".ckpt.partial") for p in partial)
    trainer = mmeff.trainer.fit(killed, resume="last")
    assert trainer.global_step == 12 and not list(folder.glob(".*"))
    assert _final_val_loss(logged, killed.out_dir) == pytest.approx(_final_val_loss(logged, straight.out_dir), abs=0.02)


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


class FillDisk(mmeff.trainer.Callback):
    """A competing writer: once epoch 1 starts and epoch 0's checkpoints are on disk (trainer.async_checkpoint writes
    them in the background: without the wait the filler sometimes won the race), another process fills the run
    folder's filesystem."""

    def __init__(self, path):
        self.path = path

    def on_train_epoch_start(self, trainer, task):
        if trainer.current_epoch == 1:
            trainer.strategy.checkpoint_io.teardown()  # waits for the queued writes; the next save starts a writer
            subprocess.run(["dd", "if=/dev/zero", f"of={self.path}", "bs=4k"], capture_output=True, check=False)


def test_full_disk_keeps_the_previous_last_checkpoint(short_config, small_tmpfs, tmp_path, monkeypatch):
    cfg = config.load(short_config(**{"run_dir": str(small_tmpfs / "${name}"), "trainer.logger": "none"}))
    filler = small_tmpfs / "filler"
    staging = tmp_path / "tmpdir"  # $TMPDIR: nothing may be staged (or left) there
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    callbacks = mmeff.trainer._fit_callbacks
    monkeypatch.setattr(mmeff.trainer, "_fit_callbacks", lambda *a: callbacks(*a) + [FillDisk(filler)])
    with pytest.raises(CheckpointError, match="No space left on device; the checkpoints written before are kept"):
        mmeff.trainer.fit(cfg)
    folder = cfg.out_dir / "checkpoints"
    assert torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 4
    assert not list(folder.glob(".*")) and not list(staging.iterdir())
    filler.unlink()
    monkeypatch.setattr(mmeff.trainer, "_fit_callbacks", callbacks)
    assert mmeff.trainer.fit(cfg, resume="last").global_step == 8
    assert (cfg.out_dir / "export" / "model.safetensors").is_file()
