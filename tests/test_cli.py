"""End to end through the command line: fit, export/reload, test, resume after a kill, two-process DDP."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import mmeff
import mmeff.trainer
from mmeff import checkpoint, config
from mmeff.cli import main
from mmeff.data import ShardDataModule
from mmeff.tasks import transforms

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _run_dir(cfg_path: Path) -> Path:
    return config.load(cfg_path).out_dir


def test_fit_export_reload_and_test(tiny_config, capsys):
    cfg_path = tiny_config(**{"trainer.max_epochs": 2})
    assert main(["fit", str(cfg_path)]) == 0
    run = _run_dir(cfg_path)
    export = run / "export"
    assert (export / "config.yaml").is_file() and (export / "model.safetensors").is_file()
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "logs").rglob("metrics.csv"))

    model = mmeff.load(export)
    again = mmeff.load(export)
    cfg = config.load(cfg_path)
    dm = ShardDataModule(cfg.data, *transforms(cfg))
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        torch.testing.assert_close(model(batch["input"]), again(batch["input"]), rtol=0, atol=0)

    capsys.readouterr()
    assert main(["test", str(cfg_path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("test/acc: ") and 0.0 <= float(last.split()[-1]) <= 1.0


def test_config_error_exits_cleanly(tiny_config, capsys):
    assert main(["fit", str(tiny_config()), "--backbone.dimm=3"]) == 2
    assert "unknown key backbone.dimm" in capsys.readouterr().err


def test_export_is_atomic_and_loading_needs_no_pickle(tmp_path, tiny_config):
    cfg = config.load(tiny_config())
    from mmeff.tasks import build_model

    model = build_model(cfg)
    out = checkpoint.export(model, cfg, tmp_path / "exp")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        (out / "model.safetensors").unlink()
        mmeff.load(out)


def test_init_from_reports_loaded_new_and_skipped(tmp_path, tiny_config):
    from mmeff.tasks import build_model

    src = checkpoint.export(build_model(config.load(tiny_config())), config.load(tiny_config()), tmp_path / "src")
    wider = build_model(config.load(tiny_config(**{"task.num_classes": 7})))
    report = checkpoint.init_from(wider, src)
    assert "head.1.weight" in report.skipped and "(10, 32)" in report.skipped["head.1.weight"]
    assert "head.1.weight" in report.new and "backbone.layers.0.mixer.q.weight" in report.loaded


def _steps_logged(run: Path) -> list[int]:
    steps = []
    for path in sorted((run / "logs").rglob("metrics.csv")):
        with path.open() as f:
            steps += [int(r["step"]) for r in csv.DictReader(f) if r.get("step")]
    return steps


def test_resume_after_kill_continues_from_saved_step(tiny_config):
    cfg_path = tiny_config(**{"trainer.max_epochs": 6, "data.batch_size": 16, "trainer.log_every_n_steps": 1})
    run = _run_dir(cfg_path)
    last = run / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-m", "mmeff", "fit", str(cfg_path)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not last.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(1.0)  # let the rename of last.ckpt complete
        assert proc.poll() is None, "fit ended before it could be interrupted"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    saved = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert saved > 0
    before = set(_steps_logged(run))
    trainer = mmeff.trainer.fit(config.load(cfg_path), resume="last")
    assert trainer.global_step > saved
    new_steps = set(_steps_logged(run)) - before
    assert new_steps and min(new_steps) >= saved


def test_last_checkpoint_follows_training_not_the_best(tiny_config):
    # lr 0: val/acc never improves after epoch 0, so only the first epoch is a best; last.ckpt (what
    # --resume reads) must still hold the end of training.
    cfg_path = tiny_config(**{"trainer.max_epochs": 3, "optim.lr": 0.0})
    trainer = mmeff.trainer.fit(config.load(cfg_path))
    checkpoints = _run_dir(cfg_path) / "checkpoints"
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == trainer.global_step and last["epoch"] == 2
    assert [p.name for p in checkpoints.glob("epoch=*.ckpt")] == [f"epoch=0-step={trainer.global_step // 3}.ckpt"]


def test_two_process_ddp(tiny_config):
    cfg_path = tiny_config(**{"trainer.devices": 2, "trainer.strategy": "ddp", "trainer.max_steps": 6, "trainer.max_epochs": None})
    # Two ranks on two cores: one thread each, or their OpenMP threads spin against each other.
    proc = subprocess.run(
        [sys.executable, "-m", "mmeff", "fit", str(cfg_path)],
        env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world_size=2" in proc.stdout + proc.stderr or "GLOBAL_RANK: 1" in proc.stdout + proc.stderr
    run = _run_dir(cfg_path)
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 6
    assert (run / "export" / "model.safetensors").is_file()
