"""`mmeff fit` of an LM on the GPU (bf16-mixed, fused AdamW, gradient clipping, the non-finite check, CSV logger,
progress bar) never makes the host wait for the device between its log steps: with
torch.cuda.set_sync_debug_mode("warn") over those steps, from one step's start to the next's (the loader, the copy to
the device, the step, every callback), nothing warns. Each wait empties the device's queue, which an eager step of
short kernels lives on (benchmarks/results/lm_fit_speed_h200.md). Packed documents (their bounds found on the host
before the copy) and joined rows are both checked."""

from __future__ import annotations

import warnings
from unittest import mock

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

import mmeff.trainer
from mmeff import config
from mmeff.data import build_shards

LOG_EVERY = 10
WATCHED = range(2, 9)  # steps between log steps (Lightning logs around step 9 and 19: (step + 1) % 10 == 0)


class SyncWatch(Callback):
    """Records the synchronising CUDA calls made from the start of step WATCHED[0] to the end of step WATCHED[-1]
    (file:line of each warning): the loader's batches and their copies to the device in between."""

    def __init__(self) -> None:
        self.found: list[str] = []
        self._watch: warnings.catch_warnings | None = None
        self._seen: list[warnings.WarningMessage] = []

    def on_train_batch_start(self, trainer: L.Trainer, task: L.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx == WATCHED[0]:
            self._watch = warnings.catch_warnings(record=True)
            self._seen = self._watch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer: L.Trainer, task: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if batch_idx == WATCHED[-1]:
            self.stop()

    def stop(self) -> None:
        if self._watch is None:
            return
        torch.cuda.set_sync_debug_mode(0)
        self._watch.__exit__(None, None, None)
        self._watch = None
        self.found += [f"{w.filename}:{w.lineno}: {w.message}" for w in self._seen if "called a synchronizing" in str(w.message)]


@pytest.fixture(scope="module")
def docs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    build_shards(None, root, source="python-docs", seq_len=256, max_docs=200, val=0.1, test=0.1, maxcount=64)
    return root


@pytest.mark.xdist_group("fit_sync")
@pytest.mark.parametrize("documents", ["separate", "joined"])
def test_fit_steps_between_log_steps_do_not_wait_for_the_device(tmp_path, docs_root, documents):
    cfg = config.parse({
        "name": "sync", "run_dir": str(tmp_path / "runs" / "${name}"),
        "data": {"root": str(docs_root), "batch_size": 4, "num_workers": 2},
        "encoder": {"name": "text", "tokenizer": "byte", "seq_len": 256},
        "backbone": {"dim": 128, "depth": 2, "pattern": ["gla", "attn"], "causal": True,
                     "mixers": {"gla": {"heads": 2}, "attn": {"heads": 2}}},
        "task": {"name": "lm", "documents": documents},
        "trainer": {"accelerator": "gpu", "devices": 1, "precision": "bf16-mixed", "max_steps": 2 * LOG_EVERY,
                    "max_epochs": None, "gradient_clip_val": 1.0, "log_every_n_steps": LOG_EVERY, "logger": "csv",
                    "enable_progress_bar": True, "check_val_every_n_epoch": None,
                    "kwargs": {"val_check_interval": 2 * LOG_EVERY}},
        "optim": {"lr": 1e-3, "fused": True, "warmup_steps": 2},
    })  # fmt: skip
    watch = SyncWatch()
    fit_callbacks = mmeff.trainer._fit_callbacks
    with mock.patch.object(mmeff.trainer, "_fit_callbacks", lambda *a, **k: [*fit_callbacks(*a, **k), watch]):
        try:
            trainer = mmeff.trainer.fit(cfg)
        finally:
            watch.stop()
    assert trainer.global_step == 2 * LOG_EVERY
    assert not watch.found, "\n".join(watch.found)
