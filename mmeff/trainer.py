"""Fit and evaluate a run config with Lightning's Trainer; export the best weights as a checkpoint folder."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
import shutil
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning_utilities.core.apply_func import apply_to_collection
from safetensors.torch import load_file
from torch import nn

from mmeff import checkpoint, config as config_mod, lora, strategies
from mmeff.blocks.moe import upcycle_state
from mmeff.config import ConfigError, RunConfig
from mmeff.data import ShardDataModule, saved_position
from mmeff.data.text import check_shard_tokenizer
from mmeff.errors import CheckpointError, TrainingError
from mmeff.strategies import PARTIAL, full_state_dict, is_sharded, is_sharded_checkpoint, local
from mmeff.tasks import build_model, build_task, transforms

log = logging.getLogger("mmeff")
# Lightning warns on a mid-epoch resume when the DataLoader itself keeps no state; here the ShardDataModule's state
# (in every checkpoint) makes the resumed stream take the samples of the epoch not trained on yet.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


def compile_options(setting: bool | str) -> dict[str, str]:
    """nn.Module.compile's keyword arguments for `trainer.compile` (true: torch.compile's defaults, else a mode)."""
    return {} if setting is True or setting == "default" else {"mode": str(setting)}


def nonfinite_tensors(module: nn.Module) -> list[str]:
    """Names of the parameters and buffers of `module` holding a NaN or an infinity (this rank's shards only)."""
    return [
        n for n, t in module.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(local(t)).all())
    ]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint beside its target, in the run folder's own filesystem, then renames it into place.

    Lightning's own writer stages the file in $TMPDIR and moves it across filesystems, which copies over the
    old file: a full disk or a kill then leaves a truncated `last.ckpt`. Here the old file stays whole until
    the rename, and a failed write keeps no checkpoint name.

    With `background` (trainer.async_checkpoint) and one process, training goes on while a checkpoint is written: its
    tensors are copied to host memory on the device's stream (pinned, without waiting), and one writer thread waits for
    that copy, then writes and renames; removals and links queue behind the writes, in order. Lightning's
    AsyncCheckpointIO clones the tensors on the GPU instead (a second copy of weights and optimizer state in device
    memory). A failed write surfaces at the next save or when training ends (`teardown` waits for the queue).
    """

    def __init__(self, background: bool = False) -> None:
        super().__init__()
        self.background = background
        self._writer: ThreadPoolExecutor | None = None
        self._error: BaseException | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if not self._queued():
            _write_atomic(checkpoint, Path(path))
            return
        copies: dict[int, torch.Tensor] = {}  # by id: a tensor under two names (tied weights) is copied once

        def copy(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in copies:
                copies[id(t)] = _host_copy(t)
            return copies[id(t)]

        host = apply_to_collection(checkpoint, torch.Tensor, copy)
        copied = None
        if torch.cuda.is_initialized():  # the copies from the device are done once the stream reaches this event
            copied = torch.cuda.Event()
            copied.record()
        self._submit(_write_atomic, host, Path(path), copied)

    def remove_checkpoint(self, path: Any) -> None:
        if self._queued():
            self._submit(super().remove_checkpoint, path)
        else:
            super().remove_checkpoint(path)

    def link(self, source: str, target: str) -> bool:
        """Put `source` at `target` (a hard link, else a copy, renamed into place) after the writes queued before;
        False (said why) when it cannot, leaving `target` as it was. Queued, a failure surfaces later, as a write's."""
        if self._queued():
            self._submit(_link_or_copy, source, target, True)
            return True
        return _link_or_copy(source, target, False)

    def teardown(self) -> None:
        """Wait for the queued writes; raise the first failure."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        self._raise_failure()

    def _queued(self) -> bool:
        return self.background and not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)

    def _submit(self, job: Any, *args: Any) -> None:
        self._raise_failure()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmeff-checkpoint")

        def run() -> None:
            try:
                job(*args)
            except BaseException as e:  # noqa: BLE001 - kept for the training thread to raise
                self._error = self._error or e

        self._writer.submit(run)

    def _raise_failure(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` in host memory that later device work cannot change: pinned and not waited for from a GPU."""
    if not t.is_cuda:
        return t.detach().clone()
    host = torch.empty_like(t, device="cpu", pin_memory=True)
    return host.copy_(t.detach(), non_blocking=True)


def _write_atomic(checkpoint: dict[str, Any], path: Path, copied: torch.cuda.Event | None = None) -> None:
    """Write `checkpoint` as `path` through a temporary file and a rename (after the event `copied`, if given)."""
    if copied is not None:
        copied.synchronize()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{PARTIAL}")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = _os_error(e)
        if cause is not None:
            raise CheckpointError(
                f"cannot write checkpoint {path}: {cause.strerror or cause}; the checkpoints written before are kept"
            ) from e
        raise


def _os_error(error: BaseException) -> OSError | None:
    """The OSError `error` is or arose from, else None: a full disk inside torch.save can surface as the RuntimeError
    its zip writer raises while closing the file, with the OSError as its context."""
    seen: set[int] = set()
    found: BaseException | None = error
    while found is not None and id(found) not in seen and not isinstance(found, OSError):
        seen.add(id(found))
        found = found.__cause__ or found.__context__
    return found if isinstance(found, OSError) else None


def _link_or_copy(source: str, target: str, strict: bool) -> bool:
    """Put `source` at `target`: a hard link, else a copy, renamed into place. On failure `target` stays as it was;
    `strict` raises a CheckpointError, else False is returned (and the reason logged)."""
    tmp = Path(target).with_name(f".{Path(target).name}{PARTIAL}")
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:  # a filesystem without hard links
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
        return True
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if strict:
            raise CheckpointError(f"could not put checkpoint {source} at {target} ({e})") from e
        log.warning("could not link %s as %s (%s); writing it instead", source, target, e)
        return False


class RunCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint that never saves (nor ranks as best) weights holding a NaN or an infinity; `written` is the
    (global step, path) of the last file it wrote."""

    written: tuple[int, str] | None = None

    def _finite(self, trainer: L.Trainer) -> bool:
        bad = nonfinite_tensors(trainer.lightning_module)
        if bad:
            log.warning("not checkpointing step %d: %d tensor(s) are not finite, e.g. %s",
                        trainer.global_step, len(bad), bad[0])
        return trainer.strategy.reduce_boolean_decision(not bad, all=True)  # sharded: every rank checks its part

    def check_monitor_top_k(self, trainer: L.Trainer, current: torch.Tensor | None = None) -> bool:
        return super().check_monitor_top_k(trainer, current) and self._finite(trainer)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if self._finite(trainer):
            super()._save_checkpoint(trainer, filepath)
            self.written = (trainer.global_step, filepath)


class LastCheckpoint(RunCheckpoint):
    """Rewrites `last.ckpt` after every epoch, or every `every_n_train_steps` steps (the resume points).

    A class of its own for its Lightning state key (class name, monitor, mode, intervals): with the arguments of a
    run's best-checkpoint callback without validation, a resume would hand either one the other's saved paths.
    """

    def __init__(self, dirpath: Path, every_n_train_steps: int | None = None) -> None:
        super().__init__(dirpath=dirpath, filename="last", enable_version_counter=False,
                         every_n_train_steps=every_n_train_steps)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        """As RunCheckpoint's, except that a checkpoint another callback wrote at this step (the new best one, just
        saved after the same validation) is hard-linked as `filepath` instead of written again: the same bytes, and
        on the H200 each write of the 152M LM's checkpoint (weights and AdamW state) paused training 2.4 s
        (benchmarks/results/lm_fit_speed_h200.md). Lightning's `save_last="link"` does this for its own last.ckpt
        only, with a symlink that dies with the best file when a better one replaces it. Every writer here
        replaces files by renaming, so the two names part at the next write of either."""
        twin = next((c.written[1] for c in trainer.checkpoint_callbacks
                     if isinstance(c, RunCheckpoint) and c is not self and c.written and c.written[0] == trainer.global_step),
                    None)  # fmt: skip
        if twin is None or is_sharded(trainer.lightning_module.model) or not _linked(trainer, twin, filepath):
            super()._save_checkpoint(trainer, filepath)
            return
        self.written = (trainer.global_step, filepath)
        self._last_global_step_saved, self._last_checkpoint_saved = trainer.global_step, filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


def _linked(trainer: L.Trainer, source: str, target: str) -> bool:
    """Whether rank zero put `source` at `target` (a hard link, else a copy, renamed into place; every rank learns
    the outcome): False leaves `target` as it was."""
    done = False
    if trainer.is_global_zero:
        io = trainer.strategy.checkpoint_io
        done = io.link(source, target) if isinstance(io, AtomicCheckpointIO) else _link_or_copy(source, target, False)
    return bool(trainer.strategy.broadcast(done))


@dataclass
class _Verdict:
    """Whether an optimizer step's loss and gradient were finite, on its way to the host."""

    step: int
    epoch: int
    lr: float
    loss: torch.Tensor | None
    bad: torch.Tensor  # [loss not finite, gradient not finite] on the host (pinned when copied from a GPU)
    copied: torch.cuda.Event | None  # recorded after the copy; None where the copy was synchronous

    def ready(self) -> bool:
        """Whether the host may read `bad` without waiting."""
        return self.copied is None or self.copied.query()


class NonFiniteLoss(Callback):
    """A NaN or infinite loss (or gradient) stops the run (`trainer.on_nonfinite: stop`) or skips its optimizer
    step (`skip`). Either way the step's update is not applied. Gradients are checked only without a loss scaler
    (16-mixed), which skips inf steps itself.

    With one process and fused AdamW (`optim.fused: true`), nothing waits for the device: the step's verdict goes to
    the optimizer as `found_inf`, on which its fused kernel applies nothing (as under a GradScaler), and the host reads
    the verdict from pinned memory a step or more later, once the device has got there; every verdict is read before
    a validation, a checkpoint and the end of training, so that none is written after a bad step. Otherwise the host
    reads the verdict at once, waiting for the device every step, and drops the gradients of a bad step.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.skipped = 0
        self._loss: torch.Tensor | None = None
        self._pending: deque[_Verdict] = deque()

    def on_before_backward(self, trainer: L.Trainer, task: L.LightningModule, loss: torch.Tensor) -> None:
        loss = loss.detach()  # keep the first bad micro-batch's loss, without asking the device which it is
        self._loss = loss if self._loss is None else torch.where(torch.isfinite(self._loss), loss, self._loss)

    def on_before_optimizer_step(self, trainer: L.Trainer, task: L.LightningModule, optimizer: Any) -> None:
        self._read(trainer, task, wait=False)
        loss, self._loss = self._loss, None
        bad = self._flags(trainer, task, loss)
        if trainer.world_size == 1 and all(g.get("fused") for g in optimizer.param_groups) and bad is not None:
            optimizer.found_inf = bad.any().float()
            host = bad.to("cpu", non_blocking=True)
            copied = None
            if bad.is_cuda:
                copied = torch.cuda.Event()
                copied.record()
            self._pending.append(_Verdict(trainer.global_step, trainer.current_epoch, optimizer.param_groups[0]["lr"],
                                          loss, host, copied))  # fmt: skip
            return
        optimizer.__dict__.pop("found_inf", None)
        verdict = _Verdict(trainer.global_step, trainer.current_epoch, optimizer.param_groups[0]["lr"], loss,
                           bad.cpu() if bad is not None else torch.zeros(2, dtype=torch.bool), None)  # fmt: skip
        if not trainer.strategy.reduce_boolean_decision(bool(verdict.bad.any()), all=False):  # any rank
            return
        for p in task.parameters():
            p.grad = None  # the optimizer skips parameters without a gradient: nothing of this step applies
        self._report(verdict, task)

    def on_validation_start(self, trainer: L.Trainer, task: L.LightningModule) -> None:
        self._read(trainer, None, wait=True)

    def on_save_checkpoint(self, trainer: L.Trainer, task: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._read(trainer, None, wait=True)

    def on_train_end(self, trainer: L.Trainer, task: L.LightningModule) -> None:
        self._read(trainer, None, wait=True)

    @staticmethod
    def _flags(trainer: L.Trainer, task: L.LightningModule, loss: torch.Tensor | None) -> torch.Tensor | None:
        """[loss not finite, gradient not finite] on the device, or None with neither a loss nor a gradient. The
        gradients' norm it takes is left on an mmeff task (`step_grad_norm`) for its gradient clipping."""
        loss_bad = ~torch.isfinite(loss) if loss is not None else None
        grad_bad = None
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            grads = [p.grad for p in task.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else None
            if norm is not None and hasattr(norm, "full_tensor"):  # sharded: a collective, so every rank takes it
                norm = norm.full_tensor()
            elif norm is not None and hasattr(task, "step_grad_norm"):  # for the task's gradient clipping
                task.step_grad_norm = (norm, frozenset(map(id, grads)))
            grad_bad = ~torch.isfinite(norm) if norm is not None else None
        some = loss_bad if loss_bad is not None else grad_bad
        if some is None:
            return None
        return torch.stack([flag if flag is not None else torch.zeros_like(some) for flag in (loss_bad, grad_bad)])

    def _read(self, trainer: L.Trainer, task: L.LightningModule | None, wait: bool) -> None:
        """Act on the pending verdicts the host can read (all of them with `wait`), oldest first."""
        while self._pending and (wait or self._pending[0].ready()):
            verdict = self._pending.popleft()
            if verdict.copied is not None:
                verdict.copied.synchronize()
            if bool(verdict.bad.any()):
                self._report(verdict, task)

    def _report(self, verdict: _Verdict, task: L.LightningModule | None) -> None:
        """Stop the run on a bad step (`stop`), else count and log its skip (in the Lightning log when `task`)."""
        where = f"step {verdict.step} (epoch {verdict.epoch})"
        value = f"the loss is {float(verdict.loss) if verdict.loss is not None else math.nan}"
        value += ", its gradient is not finite" if bool(verdict.bad[1]) and not bool(verdict.bad[0]) else ""
        if self.mode == "stop":
            self._pending.clear()
            raise TrainingError(
                f"training stopped at {where}: {value}; this step was not applied and no later "
                f"checkpoint or export is written. Lower optim.lr (now {verdict.lr:.3g} in this "
                "step), or set trainer.on_nonfinite: skip to skip such steps"
            )
        self.skipped += 1
        log.warning("skipping the optimizer step at %s: %s (%d skipped so far)", where, value, self.skipped)
        if task is not None:
            task.log("train/nonfinite_skipped", torch.tensor(float(self.skipped)), on_step=True, on_epoch=False)


class ProgressBar(TQDMProgressBar):
    """Lightning's bar, also showing the task's `bar_values` (training values it keeps on the device), read when the
    bar redraws: every `trainer.log_every_n_steps` steps."""

    def get_metrics(self, trainer: L.Trainer, task: L.LightningModule) -> dict[str, int | str | float | dict[str, float]]:
        values = getattr(task, "bar_values", {})
        return {**super().get_metrics(trainer, task), **{k: float(v) for k, v in values.items()}}


class ExportBest(Callback):
    """At the end of fitting, write the best (else last) weights as `<run>/export` on rank zero."""

    def __init__(self, cfg: RunConfig, overwrite: bool = False) -> None:
        self.cfg = cfg
        self.overwrite = overwrite

    def on_fit_end(self, trainer: L.Trainer, task: L.LightningModule) -> None:
        callback = trainer.checkpoint_callback
        # Without a monitor, "best" is only the newest file that callback wrote, possibly before a resume and older
        # than the weights trained since: the current weights are the ones to export.
        best = callback.best_model_path if callback is not None and callback.monitor is not None else ""
        model = self._gathered(trainer, task, best) if is_sharded(task.model) else task.model
        if not trainer.is_global_zero:
            return
        written = getattr(callback, "written", None)
        current = written is not None and written == (trainer.global_step, best)  # best: the weights in memory
        if best and not current and not is_sharded(task.model):
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            task.load_state_dict(state)
        bad = nonfinite_tensors(model)
        if bad:
            raise TrainingError(
                f"not exporting: {len(bad)} tensor(s) of the {'best' if best else 'last'} weights are not finite "
                f"(e.g. {bad[0]}); lower optim.lr or check the data"
            )
        model, cfg = lora.merged(model, self.cfg)  # LoRA adapters folded into plain weights
        out = cfg.out_dir / "export"
        _check_export_free(out, self.overwrite)
        path = checkpoint.export(model, cfg, out, extra=getattr(task, "export_files", None))
        print(f"exported {'best' if best else 'last'} weights to {path}")

    def _gathered(self, trainer: L.Trainer, task: L.LightningModule, best: str) -> nn.Module:
        """A plain copy of the sharded model (its best checkpoint's weights where there is one), built on rank 0 from
        the full weights that every rank helps gather; other ranks get the sharded model back."""
        if best:
            trainer.strategy.load_checkpoint(best)  # every rank reads its shards of the best weights
        state = full_state_dict(task.model)
        if not trainer.is_global_zero:
            return task.model
        model = build_model(self.cfg)
        if self.cfg.lora:
            lora.apply(model, self.cfg.lora)
        model.load_state_dict(state)
        return model


class EvalSkips(Callback):
    """Says how many samples or shards an evaluation skipped, so its metrics are known to cover the rest."""

    def __init__(self) -> None:
        self.skipped = 0

    def _count(self, batch: Any) -> None:
        if isinstance(batch, dict):
            self.skipped += int(torch.as_tensor(batch.get("_skipped", 0)).sum())

    def on_validation_batch_start(self, trainer: L.Trainer, task: L.LightningModule, batch: Any, *args: Any) -> None:
        self._count(batch)

    def on_test_batch_start(self, trainer: L.Trainer, task: L.LightningModule, batch: Any, *args: Any) -> None:
        self._count(batch)

    def report(self, split: str) -> None:
        """Print the count (nothing when no sample was skipped)."""
        if self.skipped:
            print(f"{split}: {self.skipped} sample(s) or shard(s) were skipped (the warnings above name them); "
                  "the metrics cover the samples that were read")


def _loggers(cfg: RunConfig) -> list[Logger] | bool:
    """The loggers `trainer.logger` names: auto | csv | tensorboard | wandb (offline) | none | a Logger class path."""
    kind = cfg.trainer.logger
    if kind == "none":
        return False
    if kind == "wandb":
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("trainer.logger: 'wandb' needs the wandb package (pip install 'mmeff[wandb]')")
        from lightning.pytorch.loggers import WandbLogger

        return [WandbLogger(name=cfg.name, save_dir=str(cfg.out_dir), offline=True)]
    if "." in kind:
        return [_logger_by_path(kind, cfg.out_dir)]
    loggers: list[Logger] = []
    if kind in ("auto", "csv"):
        loggers.append(CSVLogger(cfg.out_dir, name="logs"))
    if kind == "tensorboard" or (kind == "auto" and importlib.util.find_spec("tensorboard")):
        loggers.append(TensorBoardLogger(cfg.out_dir, name="tb"))
    return loggers


def _logger_by_path(path: str, out_dir: Path) -> Logger:
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"trainer.logger: cannot import {path!r} ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, Logger)):
        raise ConfigError(f"trainer.logger: {path!r} is not a Lightning Logger class")
    try:
        return cls(save_dir=str(out_dir))
    except TypeError:  # a logger without a save_dir argument
        return cls()


def build_trainer(cfg: RunConfig, fitting: bool = True, overwrite: bool = False) -> L.Trainer:
    """A Lightning Trainer from `cfg.trainer`: with checkpointing, export, lr monitor and loggers when `fitting`.

    `trainer.kwargs` are passed last and win over every option set here.
    """
    t = cfg.trainer
    loggers = t.kwargs.get("logger", _loggers(cfg))
    strategy: Any = strategies.FSDP(t.fsdp) if t.strategy == "fsdp" else t.strategy
    options: dict[str, Any] = dict(
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        precision=t.precision,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        gradient_clip_val=t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches,
        log_every_n_steps=t.log_every_n_steps,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        num_sanity_val_steps=t.num_sanity_val_steps,
        enable_progress_bar=t.enable_progress_bar,
        logger=loggers,
        callbacks=_fit_callbacks(cfg, overwrite, bool(loggers)) if fitting else [EvalSkips()],
        plugins=[AtomicCheckpointIO(background=t.async_checkpoint)],
        default_root_dir=cfg.out_dir,
        use_distributed_sampler=False,
    )
    if fitting and cfg.data.val is None:
        options["limit_val_batches"] = 0
    options.update(t.kwargs)
    try:
        return L.Trainer(**options)
    except (TypeError, ValueError, RuntimeError, ImportError, MisconfigurationException) as e:
        given = ("accelerator", "devices", "num_nodes", "strategy", "precision", *t.kwargs)
        chosen = ", ".join(f"{k}={options[k]!r}" for k in given)
        raise ConfigError(f"trainer: Lightning rejected the options ({chosen}): {e}") from None


def _fit_callbacks(cfg: RunConfig, overwrite: bool, logging_on: bool) -> list[Callback]:
    t = cfg.trainer
    has_val = cfg.data.val is not None
    folder = cfg.out_dir / "checkpoints"
    best = RunCheckpoint(
        dirpath=folder,
        monitor=t.monitor if has_val else None,
        mode="max" if t.monitor.endswith(("acc", "bleu", "exact")) else "min",
        save_top_k=t.save_top_k if has_val else 1,
        save_last=not has_val,
        filename="{epoch}-{step}",
    )
    callbacks: list[Callback] = [best, NonFiniteLoss(t.on_nonfinite), ExportBest(cfg, overwrite)]
    if t.checkpoint_every_n_steps:  # mid-epoch resume points; the data stream resumes where they were written
        callbacks.insert(1, LastCheckpoint(folder, every_n_train_steps=t.checkpoint_every_n_steps))
    if has_val:
        # Lightning's save_last copies a checkpoint only when `best` writes one (a new best), so --resume
        # would lose the epochs since; this one rewrites last.ckpt after every epoch.
        callbacks.insert(1, LastCheckpoint(folder))
    if logging_on:
        callbacks.append(LearningRateMonitor("step"))
    if t.enable_progress_bar:  # a redraw reads the loss from the device, a wait
        callbacks.append(ProgressBar(refresh_rate=t.log_every_n_steps))
    return callbacks


def _unreadable(path: Path) -> str | None:
    """Why checkpoint `path` (a file, or a sharded checkpoint's folder) cannot be loaded, or None when it loads."""
    if path.is_dir() and not is_sharded_checkpoint(path):
        return "a folder without the .metadata and meta.pt files of a sharded checkpoint"
    try:
        torch.load(path / "meta.pt" if path.is_dir() else path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure to read means "not a resume point"
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def _resume_path(cfg: RunConfig, resume: str | None) -> str | None:
    """The checkpoint to resume from: `resume`'s last.ckpt, else the newest intact checkpoint (said which)."""
    if resume is None:
        return None
    path = cfg.out_dir if resume == "last" else Path(resume)
    if path.is_file() or is_sharded_checkpoint(path):
        why = _unreadable(path)
        if why:
            raise CheckpointError(f"--resume {resume}: {path} cannot be loaded ({why})")
        return str(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {resume}: {path} does not exist")
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    others = sorted(
        (p for p in folder.glob("*.ckpt") if p.name != "last.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    last = folder / "last.ckpt"  # a file, or the folder of a sharded checkpoint (trainer.fsdp.sharded_checkpoint)
    candidates = ([last] if last.exists() else []) + others
    if not candidates:
        raise FileNotFoundError(f"--resume {resume}: no checkpoint under {folder} (expected {folder}/last.ckpt)")
    broken = []
    for candidate in candidates:
        why = _unreadable(candidate)
        if why is None:
            if broken:
                print(f"resume: {'; '.join(broken)}; resuming from the newest intact checkpoint {candidate}")
            return str(candidate)
        broken.append(f"{candidate} is unreadable ({why})")
    raise CheckpointError(f"--resume {resume}: no intact checkpoint under {folder}: {'; '.join(broken)}")


def _check_export_free(export: Path, overwrite: bool) -> None:
    if not overwrite and checkpoint.recover(export) is not None:
        raise TrainingError(
            f"{export} holds the export of a finished run; pass --overwrite to replace it, or give this run "
            "another name (--name=NEW)"
        )


def _remove_partial_checkpoints(folder: Path) -> None:
    """Delete the half-written checkpoints (files or sharded folders) a killed run left (never a complete one), and
    put back a sharded checkpoint that a kill left moved aside (`strategies.replace_folder`)."""
    for stale in folder.glob(f".*.ckpt{PARTIAL}"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    for old in folder.glob(".*.ckpt.old"):
        target = old.with_name(old.name[1:].removesuffix(".old"))
        try:
            if not target.exists() and is_sharded_checkpoint(old):
                os.replace(old, target)
                print(f"restored the checkpoint {target}, which an interrupted save had moved aside")
            else:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:  # another rank of this run did it first
            continue


def fit(cfg: RunConfig, resume: str | None = None, overwrite: bool = False) -> L.Trainer:
    """Train `cfg`; resume from a run folder, a .ckpt file or 'last' (this run's own last checkpoint).

    An earlier run's export in the run folder is replaced only with `overwrite`.
    """
    if cfg.upcycle and not cfg.init_from:
        raise ConfigError("upcycle: true needs init_from: the dense checkpoint folder to upcycle")
    _check_export_free(cfg.out_dir / "export", overwrite)
    check_shard_tokenizer(cfg)
    _remove_partial_checkpoints(cfg.out_dir / "checkpoints")
    ckpt_path = _resume_path(cfg, resume)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = build_model(cfg)
    if cfg.init_from:
        print(checkpoint.init_from(model, cfg.init_from))
        if cfg.upcycle:
            upcycled = upcycle_state(load_file(str(Path(cfg.init_from) / checkpoint.WEIGHTS)), model)
            model.load_state_dict(upcycled, strict=False)
            print(f"upcycle: {len(upcycled)} MoE tensors initialised from the dense ffn weights")
    if cfg.lora:
        print(lora.apply(model, cfg.lora))
    if cfg.trainer.compile:
        # nn.Module.compile, not torch.compile(model): state_dict names stay those of the plain model
        model.compile(**compile_options(cfg.trainer.compile))
    task = build_task(lora.task_config(cfg), model)
    trainer = build_trainer(cfg, overwrite=overwrite)
    # Written only once the config has built a model and a trainer: a rejected config leaves no run folder.
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    config_mod.save(cfg, cfg.out_dir / "config.yaml")
    # The data position goes in up front: fsdp restores a checkpoint after its setup, where a schedule may have
    # already asked for the train loader.
    data = ShardDataModule(cfg.data, *transforms(cfg), resume=saved_position(ckpt_path) if ckpt_path else None)
    trainer.fit(task, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def evaluate(cfg: RunConfig, ckpt: str | Path, split: str = "test") -> dict[str, float]:
    """Evaluate the exported checkpoint `ckpt` on `split` of `cfg.data`; return the logged metrics."""
    model = checkpoint.load(ckpt)
    model_cfg = checkpoint.load_config(ckpt)
    model_cfg.data, model_cfg.trainer, model_cfg.run_dir, model_cfg.name = cfg.data, cfg.trainer, cfg.run_dir, cfg.name
    model_cfg.freeze, model_cfg.train = [], []
    check_shard_tokenizer(model_cfg)
    task = build_task(model_cfg, model)
    trainer = build_trainer(model_cfg, fitting=False)
    dm = ShardDataModule(cfg.data, *transforms(model_cfg))
    run: Any = trainer.test if split == "test" else trainer.validate
    results = run(task, datamodule=dm, verbose=False)
    for callback in trainer.callbacks:
        if isinstance(callback, EvalSkips):
            callback.report(split)
    return {k: float(v) for k, v in results[0].items()} if results else {}
