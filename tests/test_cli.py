"""End to end through the command line: fit, export/reload, test, resume after a kill, two-process DDP."""

import csv
import io
import json
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
from mmeff.data.text import check_shard_tokenizer
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
    assert main(["plot", str(run)]) == 0
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"

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


# --- the command line a new user meets (issue 20) ---

README = Path(__file__).resolve().parents[1] / "README.md"
TINY_LM = {
    "name": "tiny_lm",
    "encoder": {"name": "text", "seq_len": 16},
    "backbone": {"dim": 16, "pattern": ["gla"], "mixers": {"gla": {"heads": 2}}},
    "task": {"name": "lm"},
    "trainer": {"max_steps": 2, "accelerator": "cpu", "enable_progress_bar": False, "logger": "none"},
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The README's paragraphs as a JSONL corpus (real text, enough documents for every split)."""
    folder = tmp_path_factory.mktemp("corpus")
    paragraphs = [p for p in README.read_text().split("\n\n") if len(p) > 40]
    (folder / "readme.jsonl").write_text("\n".join(json.dumps({"id": f"p{i}", "text": p}) for i, p in enumerate(paragraphs)))
    return folder


def test_shards_text_source_takes_src_as_option_or_positional(corpus, tmp_path, capsys):
    opts = ["-o", "seq_len=32", "-o", "val=0.2", "-o", "test=0.2"]
    assert main(["shards", "--source", "text", "-o", f"src={corpus}", *opts, str(tmp_path / "a")]) == 0  # README's form
    assert main(["shards", "--source", "text", str(corpus), str(tmp_path / "b"), *opts]) == 0
    assert (tmp_path / "a" / "index.json").read_text() == (tmp_path / "b" / "index.json").read_text()
    capsys.readouterr()
    assert main(["shards", "--source", "digits", str(corpus), str(tmp_path / "c")]) == 2
    assert "'digits' reads no SRC; its options (-o KEY=VALUE): size=32 maxcount=64 seed=0" in capsys.readouterr().err


def test_unknown_source_lists_the_sources_and_help_their_options(tmp_path, capsys):
    assert main(["shards", "--source", "nope", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown shard source 'nope'" in err and "spoken-digits" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["shards", "--help"])
    out = capsys.readouterr().out
    for name in ("digits", "digit-scenes", "spoken-digits", "spoken-sentences", "python-docs", "text", "folder"):
        assert f"\n  {name} " in out
    assert "-o src=... seq_len=256 tokenizer=None" in out and "examples:" in out


def _lm_config(tmp_path: Path, root: Path, **encoder) -> Path:
    cfg = {**TINY_LM, "run_dir": str(tmp_path / "runs" / "${name}"), "data": {"root": str(root), "num_workers": 0}}
    cfg["encoder"] = {**cfg["encoder"], **encoder}
    path = tmp_path / f"lm_{len(list(tmp_path.glob('lm_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fit_refuses_shards_of_another_tokenizer(corpus, tmp_path, capsys):
    from mmeff.data.text import read_documents
    from mmeff.encoders.text import train_bpe

    opts = ["-o", "seq_len=32", "-o", "val=0.2", "-o", "test=0.2"]
    assert main(["shards", "--source", "text", "-o", f"src={corpus}", *opts, str(tmp_path / "shards")]) == 0
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["meta"]["tokenizer"]["name"] == "byte" and len(index["meta"]["tokenizer"]["sha256"]) == 64
    del index["meta"]["tokenizer"]  # as shards written before the index recorded it: their tokenizer.json tells
    (tmp_path / "shards" / "index.json").write_text(json.dumps(index))
    train_bpe((text for _, text in read_documents(corpus)), 300).save(tmp_path / "bpe")
    bpe = _lm_config(tmp_path, tmp_path / "shards", tokenizer="bpe", tokenizer_path=str(tmp_path / "bpe"))
    capsys.readouterr()
    assert main(["fit", str(bpe)]) == 2
    err = capsys.readouterr().err
    assert "written with the byte tokenizer" in err and "encoder.tokenizer is bpe" in err
    assert f"rewrite the shards with the encoder's tokenizer: mmeff shards --source text -o src=YOUR_TEXT -o tokenizer={tmp_path / 'bpe'}" in err
    assert not (tmp_path / "runs").exists()
    assert main(["shards", "--source", "text", "-o", f"src={corpus}", "-o", f"tokenizer={tmp_path / 'bpe'}", *opts, str(tmp_path / "shards")]) == 0
    check_shard_tokenizer(config.load(bpe))  # rewritten: accepted
    with pytest.raises(mmeff.ConfigError, match="written with the bpe tokenizer"):
        check_shard_tokenizer(config.load(_lm_config(tmp_path, tmp_path / "shards")))


@pytest.fixture
def lm_export(tmp_path) -> Path:
    from mmeff.tasks import build_model

    cfg = config.parse({**TINY_LM, "run_dir": str(tmp_path), "encoder": {"name": "text", "seq_len": 256}})
    return checkpoint.export(build_model(cfg), cfg, tmp_path / "lm_export")


def test_chat_refuses_a_checkpoint_that_is_no_lm(tmp_path, tiny_config, capsys):
    from mmeff.tasks import build_model

    cfg = config.load(tiny_config())
    export = checkpoint.export(build_model(cfg), cfg, tmp_path / "classifier")
    assert main(["chat", str(export)]) == 2
    err = capsys.readouterr().err
    assert "task 'classify' with encoder 'image' is not a language model" in err and "Traceback" not in err


class _Keys(io.StringIO):
    """Standard input whose reads after the given lines raise KeyboardInterrupt (Ctrl-C at the prompt)."""

    def readline(self, *args: object) -> str:
        line = super().readline(*args)
        if not line:
            raise KeyboardInterrupt
        return line


def test_chat_commands_and_ctrl_c(lm_export, monkeypatch, capsys):
    prompts = []

    def fake_generate(model, prompts_, sampling, tokenizer, on_text=None):
        prompts.append(tokenizer.decode(prompts_[0]))
        if "stop me" in prompts[-1]:
            raise KeyboardInterrupt  # Ctrl-C while the reply is written
        on_text(0, "fine")
        return mmeff.generate.Generation([[1]], ["fine"], 1, 0.1, 1, 0.1)

    import mmeff.generate

    monkeypatch.setattr(mmeff.generate, "generate", fake_generate)
    monkeypatch.setattr("sys.stdin", _Keys("/help\nhello\nstop me\n/reset\nagain\n/bogus\n"))
    assert main(["chat", str(lm_export), "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr()
    assert prompts == ["User: hello\nAssistant:", "User: hello\nAssistant:fine\nUser: stop me\nAssistant:", "User: again\nAssistant:"]
    assert "(conversation forgotten)" in out.err and "(reply stopped)" in out.err and "unknown command /bogus" in out.err
    assert "Traceback" not in out.err
    monkeypatch.setattr("sys.stdin", io.StringIO("/quit\nnever sent\n"))
    assert main(["chat", str(lm_export)]) == 0 and len(prompts) == 3


def test_version_help_examples_and_print_config(tiny_config, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"mmeff {mmeff.__version__}"
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert "--key.path=value" in out and "later wins" in out and "examples:\n  mmeff fit configs/vision/digits.yaml" in out
    more = tmp_path / "more.yaml"
    more.write_text(yaml.safe_dump({"backbone": {"dim": 48}, "trainer": {"max_epochs": 7}}))
    assert main(["fit", "--print_config", str(tiny_config()), "--config", str(more), "--trainer.max_epochs=9"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["backbone"]["dim"] == 48 and printed["backbone"]["depth"] == 1  # merged, later file wins
    assert printed["trainer"]["max_epochs"] == 9 and printed["encoder"]["patch_size"] == 4  # overrides last
    assert not (tmp_path / "runs").exists()


def test_models_lists_presets_a_config_can_name(tmp_path, capsys):
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "vit-s-gla" in listing and "lm-150m-hybrid" in listing
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"preset": "vit-s-gla", "backbone": {"depth": 2}, "encoder": {"image_size": 32}, "task": {"name": "classify"}}))
    cfg = config.load(path)
    assert cfg.backbone.pattern == ["gla"] and cfg.backbone.dim == 384 and cfg.backbone.depth == 2  # the config's keys win
    assert cfg.encoder.image_size == 32 and cfg.encoder.patch_size == 16
    with pytest.raises(mmeff.ConfigError, match="preset: got 'vit-xxl'; expected one of: .*vit-s-gla"):
        config.load(path, ["--preset=vit-xxl"])


def test_sample_writes_a_shard_sample_as_files(digits_root, tmp_path, capsys):
    assert main(["sample", str(digits_root), "--index", "2", "--out", str(tmp_path)]) == 0
    written = sorted(Path(p).name for p in capsys.readouterr().out.split())
    assert len(written) == 2 and written[0].endswith(".cls") and written[1].endswith(".png")
    assert (tmp_path / written[1]).read_bytes()[:4] == b"\x89PNG"
    assert main(["sample", str(digits_root), "--index", "100000"]) == 2


def test_a_command_leaves_the_process_group_it_ran_in(tmp_path):
    # Lightning keeps the default group after a distributed fit; left to interpreter exit, a rank aborted (SIGABRT).
    import torch.distributed as dist

    from mmeff import cli

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert cli.main(["blocks"]) == 0 and not dist.is_initialized()
