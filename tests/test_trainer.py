"""Trainer options a user expects (issue 20): validate prints metrics, any Trainer argument passes through
`trainer.kwargs` (and wins), a finished export is kept without --overwrite, loggers by name or class path,
init_from counts tied weights and reports once."""

import pytest

import mmeff.trainer
from mmeff import checkpoint, config
from mmeff.cli import main
from mmeff.errors import TrainingError
from mmeff.tasks import build_model

ONE_STEP = {"trainer.max_steps": 1, "trainer.max_epochs": 1, "trainer.kwargs": {"limit_val_batches": 1}}


def test_validate_prints_metrics_and_skips(tiny_config, capsys):
    path = tiny_config(**ONE_STEP)
    assert main(["fit", str(path)]) == 0
    capsys.readouterr()
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "val/loss: " in out and "val/acc: " in out


def test_any_trainer_argument_passes_through_and_kwargs_win(tiny_config):
    cfg = config.load(tiny_config(**{"trainer.kwargs": {"limit_val_batches": 3, "logger": False, "max_epochs": 7}}))
    trainer = mmeff.trainer.build_trainer(cfg)
    assert trainer.limit_val_batches == 3 and trainer.logger is None and trainer.max_epochs == 7


def test_a_finished_export_is_kept_without_overwrite(tiny_config, capsys):
    path = tiny_config(**ONE_STEP)
    assert main(["fit", str(path)]) == 0
    weights = config.load(path).out_dir / "export" / checkpoint.WEIGHTS
    before = weights.read_bytes()
    assert main(["fit", str(path), "--optim.lr=0.5"]) == 2
    assert "holds the export of a finished run; pass --overwrite" in capsys.readouterr().err
    assert weights.read_bytes() == before
    assert main(["fit", str(path), "--optim.lr=0.5", "--overwrite"]) == 0
    assert weights.read_bytes() != before
    with pytest.raises(TrainingError, match="--overwrite"):
        mmeff.trainer.fit(config.load(path))


@pytest.mark.parametrize("logger, folder", [("csv", "logs"), ("lightning.pytorch.loggers.CSVLogger", "lightning_logs")])
def test_logger_by_name_or_class_path(tiny_config, logger, folder):
    cfg = config.load(tiny_config(**{"trainer.logger": logger}))
    (made,) = mmeff.trainer.build_trainer(cfg).loggers
    assert type(made).__name__ == "CSVLogger" and made.log_dir.startswith(str(cfg.out_dir / folder))


def test_logger_class_path_errors_name_the_key(tiny_config):
    for path in ("lightning.pytorch.loggers.Nope", "collections.OrderedDict"):
        with pytest.raises(config.ConfigError, match=f"trainer.logger: .*{path}"):
            mmeff.trainer.build_trainer(config.load(tiny_config(**{"trainer.logger": path})))


def test_wandb_logger_runs_offline(tiny_config, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = config.load(tiny_config(**{"trainer.logger": "wandb"}))
    (made,) = mmeff.trainer.build_trainer(cfg).loggers
    assert type(made).__name__ == "WandbLogger"


def test_init_from_counts_the_tied_head_as_loaded(tmp_path):
    lm = {
        "encoder": {"name": "text", "seq_len": 16},
        "backbone": {"dim": 32, "pattern": ["attn"], "mixers": {"attn": {"heads": 2}}},
        "task": {"name": "lm"},
    }
    cfg = config.parse(lm)
    src = checkpoint.export(build_model(cfg), cfg, tmp_path / "lm")
    report = checkpoint.init_from(build_model(cfg), src)
    assert "head.weight" in report.loaded and not report.new and not report.skipped


def test_init_from_report_prints_once(tmp_path, tiny_config, capsys):
    src_cfg = config.load(tiny_config())
    src = checkpoint.export(build_model(src_cfg), src_cfg, tmp_path / "src")
    assert main(["fit", str(tiny_config(**ONE_STEP, name="ft")), f"--init_from={src}"]) == 0  # main logs to stderr
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("init_from: ") == 1


def test_the_bar_shows_the_training_loss_that_lightning_no_longer_reads_each_step(tiny_config, monkeypatch):
    cfg = config.load(tiny_config(**{"trainer.enable_progress_bar": True, "trainer.log_every_n_steps": 3,
                                     "trainer.kwargs": {"limit_train_batches": 7, "limit_val_batches": 1}}))  # fmt: skip
    shown: list[dict] = []
    get_metrics = mmeff.trainer.ProgressBar.get_metrics
    monkeypatch.setattr(mmeff.trainer.ProgressBar, "get_metrics", lambda self, *a: shown.append(get_metrics(self, *a)) or shown[-1])
    trainer = mmeff.trainer.fit(cfg)
    bar = next(c for c in trainer.callbacks if isinstance(c, mmeff.trainer.ProgressBar))
    assert bar.refresh_rate == 3
    # Lightning turns each progress-bar value into a Python number after every step (a wait for the device there).
    assert not [k for k in trainer.progress_bar_metrics if k.startswith("train/")]
    assert shown and all(isinstance(m["train/loss"], float) and isinstance(m["train/acc"], float) for m in shown)


@pytest.mark.parametrize("setting, options", [(True, {}), ("default", {}), ("reduce-overhead", {"mode": "reduce-overhead"}),
                                              ("max-autotune-no-cudagraphs", {"mode": "max-autotune-no-cudagraphs"})])  # fmt: skip
def test_trainer_compile_takes_torch_compiles_mode_by_name(tiny_config, monkeypatch, setting, options):
    from torch import nn

    seen = []
    plain_compile = nn.Module.compile

    def compile_traced(self, **kwargs):
        seen.append(kwargs)
        plain_compile(self, backend="aot_eager")  # AOT-autograd tracing without Inductor's C++ build: fast

    monkeypatch.setattr(nn.Module, "compile", compile_traced)
    assert main(["fit", str(tiny_config(**ONE_STEP)), f"--trainer.compile={str(setting).lower()}"]) == 0
    assert seen == [options]


def test_trainer_compile_names_the_modes_it_takes(tiny_config):
    with pytest.raises(config.ConfigError, match="trainer.compile: got 'fast'.*reduce-overhead"):
        config.load(tiny_config(**{"trainer.compile": "fast"}))
    with pytest.raises(config.ConfigError, match="trainer.compile: reduce-overhead"):
        config.load(tiny_config(**{"trainer.compile": "reduce-overhead", "trainer.cuda_graphs": True}))


def test_clipping_scales_by_the_norm_the_nonfinite_check_took(tiny_config, monkeypatch):
    # NonFiniteLoss takes the gradients' total norm each step; the task's clipping scales by it instead of taking it
    # again (torch's clip_grad_norm_ only where the check took none, or over other gradients). Same result as
    # clip_grad_norm_ within 1e-6 (the two sum the squares in another order).
    from types import SimpleNamespace

    import torch

    from mmeff.tasks import build_task
    from mmeff.trainer import NonFiniteLoss

    task = build_task(config.load(tiny_config()))
    opt = torch.optim.AdamW(task.parameters())
    task._trainer = SimpleNamespace(precision_plugin=SimpleNamespace())  # bf16 / fp32: no loss scaler
    gen = torch.Generator().manual_seed(0)
    for p in task.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 10
    grads = [p.grad.clone() for p in task.parameters()]
    coef = (1.0 / (torch.nn.utils.get_total_norm(grads) + 1e-6)).clamp(max=1.0)  # as torch's clip_grad_norm_
    want = [g * coef for g in grads]
    assert coef < 0.01  # the test clips
    taken = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: taken.append(max_norm))
    NonFiniteLoss._flags(task._trainer, task, torch.tensor(1.0))
    task.configure_gradient_clipping(opt, 1.0, "norm")
    assert taken == [] and task.step_grad_norm is None
    for p, w in zip(task.parameters(), want):
        assert torch.allclose(p.grad, w, rtol=1e-6, atol=0)
    task.configure_gradient_clipping(opt, 1.0, "norm")  # no norm taken since: clip_grad_norm_ takes it
    next(task.parameters()).grad = None
    NonFiniteLoss._flags(task._trainer, task, torch.tensor(1.0))
    next(task.parameters()).grad = torch.ones_like(next(task.parameters()))  # not among the gradients it covered
    task.configure_gradient_clipping(opt, 1.0, "norm")
    assert taken == [1.0, 1.0]
