"""Two ranks on 127.0.0.1 (gloo, CPU) against one process (issue 23), on the real digits shards (uneven: 21 train
shards of 64 or 13 samples, val shards of 64, 64 and 16, so the ranks' val splits differ):

- DDP and FSDP2 (`trainer.strategy: fsdp`, float32 policy, activation checkpointing) follow the loss trajectory of a
  single process trained on both ranks' batches to 1e-4 (only the summation order of the gradient reduce differs);
- FSDP validates on uneven val shards without hanging (the test's timeout);
- a sharded checkpoint written mid-epoch resumes on 2 ranks without repeating a batch (the trajectory goes on
  matching the single process), and on 1 rank (weights and AdamW state resharded, the epoch's unseen samples dealt
  to it: the next step matches);
- the gathered export equals the single process's weights and loads with mmeff.load.

Every run is one launch of two processes (tests/trainer/two_ranks.py) doing several fits, to keep the cost of
starting Python, torch and Lightning twice per world to once.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml

import mmeff
from mmeff import config, trainer
from mmeff.data import make_loader, saved_position
from mmeff.tasks import build_model, transforms
from mmeff.tasks.base import param_groups

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")]  # inside torch.distributed.checkpoint

WORKER = Path(__file__).with_name("two_ranks.py")  # runs several fits per launch: one start-up of Python and torch
STEPS, SAVED = 4, 2  # steps of the two-rank runs; the FSDP run stops at SAVED and resumes to STEPS
TOLERANCE = 1e-4  # losses and weights: fp32 everywhere, only the reduction order differs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(tmp_path: Path, digits_root: Path, name: str, strategy: str, val: bool) -> Path:
    cfg = {
        "name": name,
        "run_dir": str(tmp_path / "runs" / "${name}"),
        "data": {"root": str(digits_root), "batch_size": 16, "eval_batch_size": 32, "num_workers": 0,
                 "shuffle_buffer": 64, "test": None, **({} if val else {"val": None})},
        "encoder": {"name": "image", "image_size": 16, "patch_size": 4, "augment": False},
        "backbone": {"dim": 32, "pattern": ["attn"], "depth": 2, "causal": False, "mixers": {"attn": {"heads": 2}},
                     "checkpoint": strategy == "fsdp"},
        "task": {"name": "classify", "num_classes": 10},
        "trainer": {"max_steps": STEPS, "max_epochs": None, "accelerator": "cpu", "devices": 2, "strategy": strategy,
                    "logger": "csv", "log_every_n_steps": 1, "enable_progress_bar": False, "checkpoint_every_n_steps": 2 if val else None,
                    "fsdp": {"param_dtype": "float32"},
                    "kwargs": {"val_check_interval": 2, "check_val_every_n_epoch": None, "enable_model_summary": False}},
        "optim": {"lr": 3e-3, "schedule": "constant", "warmup_steps": 0},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _two_ranks(jobs: list[dict], tmp_path: Path, timeout: float = 240) -> None:
    """Run `jobs` in a two-process world started by torchrun, as the README's multi-node recipe does (one node, two
    processes on 127.0.0.1); a hang (e.g. ranks taking different batch counts) fails at `timeout`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--node_rank=0",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), json.dumps(jobs)]
    log = tmp_path / "ranks.log"
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would stall a rank
        proc = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
            pytest.fail(f"the two ranks hung (> {timeout} s); log:\n{log.read_text()[-3000:]}")
    assert proc.returncode == 0, log.read_text()[-4000:]


def _logged_losses(run: Path) -> list[float]:
    """Rank 0's train/loss of each step, over every log version of the run (a resume starts a new one)."""
    rows = {}
    for version in sorted((run / "logs").glob("version_*")):
        for row in csv.DictReader(open(version / "metrics.csv")):
            if row.get("train/loss_step"):
                rows[int(row["step"])] = float(row["train/loss_step"])
    return [rows[s] for s in sorted(rows)]


def _best_step(run: Path) -> int:
    """The step whose checkpoint has the lowest val/loss (what the export holds)."""
    rows = [row for version in sorted((run / "logs").glob("version_*"))
            for row in csv.DictReader(open(version / "metrics.csv")) if row.get("val/loss")]
    return min((float(row["val/loss"]), int(row["step"]) + 1) for row in rows)[1]


def _reference(cfg: config.RunConfig, batches: list[list[dict]]) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """One process training on each step's batches of all ranks together (the mean of their losses, so the same
    gradient as the ranks' average): rank 0's batch loss before each step, and the weights after each step."""
    L.seed_everything(cfg.seed, verbose=False)
    model = build_model(cfg)
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    losses, weights = [], []
    for step in batches:
        per_rank = [F.cross_entropy(model(b["input"]), b["label"]) for b in step]
        losses.append(per_rank[0].item())
        opt.zero_grad()
        torch.stack(per_rank).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip_val)
        opt.step()
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return losses, weights


def _rank_batches(cfg: config.RunConfig, world: int, steps: int, resume: dict | None = None) -> list[list[dict]]:
    train, _ = transforms(cfg)
    loaders = [iter(make_loader(cfg.data, "train", train, True, world, rank, resume=resume)) for rank in range(world)]
    return [[next(loader) for loader in loaders] for _ in range(steps)]


def _close(export: Path, weights: dict[str, torch.Tensor]) -> None:
    model = mmeff.load(export)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, weights[name], atol=TOLERANCE, rtol=0, msg=lambda m: f"{name}: {m}")


def test_ddp_and_fsdp_match_one_process_and_resume_sharded(tmp_path, digits_root, monkeypatch):
    ddp = _write(tmp_path, digits_root, "ddp", "ddp", val=False)
    fsdp = _write(tmp_path, digits_root, "fsdp", "fsdp", val=True)
    _two_ranks([
        {"config": str(ddp)},
        {"config": str(fsdp), "overrides": [f"--trainer.max_steps={SAVED}"]},
        {"config": str(fsdp), "resume": "last"},  # the sharded last.ckpt of step SAVED, mid-epoch
    ], tmp_path)

    cfg = config.load(fsdp)
    batches = _rank_batches(cfg, 2, STEPS)
    losses, weights = _reference(cfg, batches)
    for name in ("ddp", "fsdp"):
        run = tmp_path / "runs" / name
        got = _logged_losses(run)
        assert len(got) == STEPS and max(abs(a - b) for a, b in zip(got, losses)) < TOLERANCE, (name, got, losses)
        _close(run / "export", weights[(_best_step(run) if name == "fsdp" else STEPS) - 1])  # fsdp: the best val/loss
    last = tmp_path / "runs" / "fsdp" / "checkpoints" / "last.ckpt"
    assert (last / ".metadata").is_file() and len(list(last.glob("*.distcp"))) == 2  # one shard file per rank

    # The two-rank sharded checkpoint of step STEPS resumes on one rank for one more step (without validation: the
    # export is then that step's weights), on the first batch of the samples of the epoch that the two had not seen.
    position = saved_position(last)
    assert position["epoch"] == 0 and position["segments"] == [[2, 1, 16, STEPS]]
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    one = config.load(fsdp, ["--trainer.devices=1", f"--trainer.max_steps={STEPS + 1}", "--data.val=null"])
    try:
        trainer.fit(one, resume="last", overwrite=True)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    _, weights = _reference(cfg, batches + _rank_batches(cfg, 1, 1, resume=position))
    _close(one.out_dir / "export", weights[STEPS])
