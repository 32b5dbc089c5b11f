"""trainer.on_nonfinite: a step with a NaN loss applies nothing (weights, AdamW moments and step count stay those of
the step before), `skip` counts it and trains on, `stop` names it, and no checkpoint is written after it. With fused
AdamW the verdict stays on the device (the optimizer's `found_inf`) and the host reads it a step later or before a
checkpoint; with torch's foreach AdamW the host reads it at once. Both are checked."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from mmeff.errors import TrainingError
from mmeff.trainer import NonFiniteLoss

BAD = 2  # the batch (and optimizer step) whose input holds a NaN


class Regression(L.LightningModule):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        self.lin = nn.Linear(4, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return ((self.lin(x) - y) ** 2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.1, fused=self.fused or None, foreach=None if self.fused else False)


class Snapshots(Callback):
    """The weights and AdamW state after every training batch."""

    def __init__(self) -> None:
        self.after: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, task, outputs, batch, batch_idx) -> None:
        opt = trainer.optimizers[0]
        state = {f"avg.{n}": opt.state[p]["exp_avg"].clone() for n, p in task.named_parameters() if p in opt.state}
        steps = {f"step.{n}": opt.state[p]["step"].clone() for n, p in task.named_parameters() if p in opt.state}
        self.after.append({**{k: v.detach().clone() for k, v in task.state_dict().items()}, **state, **steps})


def _batches(n: int, bad: int = BAD) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 4, generator=gen), torch.randn(8, 1, generator=gen)) for _ in range(n)]
    batches[bad][0][3, 1] = float("nan")
    return batches


def _fit(fused: bool, mode: str, batches: list, tmp_path, made: dict | None = None,
         **trainer_options) -> tuple[Regression, Snapshots, NonFiniteLoss]:
    """A fit of the regression on `batches` (`made` gets the task and the callbacks, also when the fit raises)."""
    torch.manual_seed(0)
    task, snapshots, check = Regression(fused), Snapshots(), NonFiniteLoss(mode)
    if made is not None:
        made.update(task=task, snapshots=snapshots, check=check)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=1.0, default_root_dir=tmp_path,
                        callbacks=[check, snapshots, *trainer_options.pop("callbacks", [])],
                        enable_checkpointing=trainer_options.pop("enable_checkpointing", False), **trainer_options)  # fmt: skip
    trainer.fit(task, DataLoader(batches, batch_size=None))
    return task, snapshots, check


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fused", [True, False], ids=["fused_on_device", "foreach_on_host"])
def test_a_skipped_step_applies_nothing(tmp_path, caplog, fused):
    with caplog.at_level(logging.WARNING, logger="mmeff"):
        task, snapshots, check = _fit(fused, "skip", _batches(5), tmp_path)
    after = snapshots.after
    assert len(after) == 5 and check.skipped == 1
    assert _same(after[BAD], after[BAD - 1])  # weights, AdamW moments and step counts untouched
    assert not _same(after[BAD + 1], after[BAD]) and all(torch.isfinite(v).all() for v in after[-1].values())
    assert after[-1]["step.lin.weight"].item() == 4  # five batches, one skipped
    assert f"skipping the optimizer step at step {BAD} (epoch 0): the loss is nan" in caplog.text


@pytest.mark.parametrize("fused", [True, False], ids=["fused_on_device", "foreach_on_host"])
def test_stop_names_the_step_and_keeps_the_weights_before_it(tmp_path, fused):
    made: dict = {}
    with pytest.raises(TrainingError, match=f"training stopped at step {BAD} \\(epoch 0\\): the loss is nan"):
        _fit(fused, "stop", _batches(5), tmp_path, made=made)
    before = made["snapshots"].after[BAD - 1]
    assert _same(made["task"].state_dict(), {k: v for k, v in before.items() if not k.startswith(("avg.", "step."))})


@pytest.mark.parametrize("fused", [True, False], ids=["fused_on_device", "foreach_on_host"])
@pytest.mark.parametrize("bad", [BAD, 4], ids=["before_a_checkpoint", "last_step"])
def test_no_checkpoint_after_a_bad_step(tmp_path, fused, bad):
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=BAD + 1, save_top_k=-1, filename="{step}")
    with pytest.raises(TrainingError, match=f"training stopped at step {bad} "):
        _fit(fused, "stop", _batches(5, bad=bad), tmp_path, callbacks=[every], enable_checkpointing=True)
    written = sorted(p.name for p in (tmp_path / "ckpt").glob("*.ckpt")) if (tmp_path / "ckpt").exists() else []
    assert written == ([] if bad == BAD else ["step=3.ckpt"])
