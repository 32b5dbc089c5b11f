"""The four ways a run lost or falsified its result (issue 25), each reproduced: a NaN run exported as best, a
full disk truncating last.ckpt, a leftover `.export.old` blocking exports, a truncated last.ckpt on resume."""

import errno
import os
import tempfile

import pytest
import torch
from safetensors.torch import load_file

import mmeff
import mmeff.trainer
from mmeff import checkpoint, config
from mmeff.errors import CheckpointError, TrainingError
from mmeff.trainer import AtomicCheckpointIO

NAN_RUN = {"optim.lr": 1.0e6, "optim.warmup_steps": 1}


def test_nonfinite_loss_stops_the_run_and_nothing_is_exported(short_config):
    cfg = config.load(short_config(**NAN_RUN))
    with pytest.raises(TrainingError, match=r"training stopped at step \d+ \(epoch 0\): the loss is .*(nan|inf|not finite).*on_nonfinite: skip"):
        mmeff.trainer.fit(cfg)
    assert not (cfg.out_dir / "export").exists()
    for ckpt in (cfg.out_dir / "checkpoints").glob("*.ckpt"):  # whatever was saved before the stop is finite
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values())


def test_nonfinite_steps_skipped_keep_the_weights_finite(short_config, caplog):
    cfg = config.load(short_config(**NAN_RUN, **{"trainer.on_nonfinite": "skip"}))
    mmeff.trainer.fit(cfg)
    assert "skipping the optimizer step at step" in caplog.text
    weights = load_file(str(cfg.out_dir / "export" / checkpoint.WEIGHTS))
    assert weights and all(torch.isfinite(t).all() for t in weights.values())


def test_nonfinite_weights_are_never_exported(short_config, monkeypatch):
    cfg = config.load(short_config(**{"trainer.max_steps": 1}))
    # Weights turned NaN by a step whose loss was finite (the case the loss check cannot see).
    monkeypatch.setattr(mmeff.trainer.NonFiniteLoss, "on_before_optimizer_step", lambda self, trainer, task, opt: [
        p.data.fill_(float("nan")) for p in task.parameters()])
    with pytest.raises(TrainingError, match="not exporting: .* not finite"):
        mmeff.trainer.fit(cfg)
    assert not (cfg.out_dir / "export").exists() and not list((cfg.out_dir / "checkpoints").glob("*.ckpt"))


def test_failed_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
    before = target.read_bytes()
    tempfile.tempdir = str(tmp_path / "tmpdir")  # where fsspec would have staged the file
    os.makedirs(tempfile.tempdir)

    def full_disk(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mmeff.trainer.torch, "save", full_disk)
    try:
        with pytest.raises(CheckpointError, match=f"cannot write checkpoint {target}: No space left on device"):
            AtomicCheckpointIO().save_checkpoint({"step": 2}, target)
    finally:
        tempfile.tempdir = None
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "tmpdir"]
    assert not os.listdir(tmp_path / "tmpdir")


def _export(tmp_path, tiny_config, out):
    from mmeff.tasks import build_model

    cfg = config.load(tiny_config())
    return checkpoint.export(build_model(cfg), cfg, out)


def test_leftover_export_old_is_cleaned_and_the_new_export_lands(tmp_path, tiny_config):
    out = _export(tmp_path, tiny_config, tmp_path / "export")
    stale = tmp_path / ".export.old"
    stale.mkdir()
    (stale / "junk").write_text("from an earlier crash")
    (tmp_path / ".export.abc123").mkdir()  # a temp folder of a killed export
    first = (out / checkpoint.WEIGHTS).stat().st_mtime_ns
    _export(tmp_path, tiny_config, out)
    assert (out / checkpoint.WEIGHTS).stat().st_mtime_ns != first  # the new export replaced the old one
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_kill_between_the_two_renames_restores_the_previous_export(tmp_path, tiny_config):
    out = _export(tmp_path, tiny_config, tmp_path / "export")
    os.replace(out, tmp_path / ".export.old")  # export() was killed after moving the old export aside
    with pytest.raises(FileNotFoundError, match=r"interrupted export left .*\.export\.old"):
        mmeff.load(out)
    assert checkpoint.recover(out) == out
    mmeff.load(out)


def test_truncated_last_checkpoint_falls_back_to_the_newest_intact_one(short_config, capsys):
    cfg = config.load(short_config())
    mmeff.trainer.fit(cfg)
    folder = cfg.out_dir / "checkpoints"
    last = folder / "last.ckpt"
    # A new, half-written file in its place: truncating it in place would truncate the best checkpoint too, which
    # last.ckpt is a hard link of when both were written after one validation.
    data = last.read_bytes()
    last.unlink()
    last.write_bytes(data[: len(data) // 2])
    (cfg.out_dir / "export").rename(cfg.out_dir / "export.first")
    more = config.load(short_config(**{"trainer.max_epochs": 3}))
    trainer = mmeff.trainer.fit(more, resume="last")
    out = capsys.readouterr().out
    best = next(p for p in folder.glob("epoch=*.ckpt"))
    assert f"{last} is unreadable" in out and "resuming from the newest intact checkpoint" in out
    assert trainer.global_step > 0 and (cfg.out_dir / "export").is_dir()
    with pytest.raises(CheckpointError, match=f"--resume {last}: {last} cannot be loaded"):
        last.unlink()
        last.write_bytes(b"")
        mmeff.trainer.fit(more, resume=str(last), overwrite=True)
    assert best.is_file()
