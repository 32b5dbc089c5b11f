"""The text LM benchmark scripts at tiny sizes on the CPU, and the GPU run configs they time."""

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from mmeff import config

ROOT = Path(__file__).parents[2]
BENCHMARKS = ROOT / "benchmarks"
GPU_CONFIGS = sorted((ROOT / "configs" / "text").glob("gpu_150m_*.yaml"))
TINY = {"backbone.dim": 64, "backbone.depth": 2, "backbone.ffn_options.hidden": 176, "encoder.seq_len": 32,
        "data.batch_size": 2, "data.eval_batch_size": 2, "data.num_workers": 0, "trainer.accelerator": "cpu",
        "trainer.precision": "32-true", "trainer.logger": "csv", "trainer.enable_progress_bar": False,
        "trainer.kwargs.limit_val_batches": 2}  # fmt: skip


def test_gpu_configs_parse_as_the_benchmark_model():
    assert [p.stem for p in GPU_CONFIGS] == ["gpu_150m_attn", "gpu_150m_gated_deltanet", "gpu_150m_gla", "gpu_150m_mamba2"]
    for path in GPU_CONFIGS:
        cfg = config.load(path)
        mixer = path.stem.removeprefix("gpu_150m_")
        assert cfg.backbone.pattern == [mixer] and cfg.backbone.dim == 1024 and cfg.backbone.depth == 12
        assert cfg.backbone.ffn == "swiglu" and cfg.backbone.ffn_options == {"hidden": 2736}
        assert cfg.encoder.tokenizer == "byte" and cfg.encoder.seq_len == 4096 and cfg.data.batch_size == 4
        assert cfg.trainer.precision == "bf16-mixed" and cfg.data.source is None  # on demand it would pack 256-token rows
        assert cfg.optim.fused is True


def test_optim_fused_reaches_the_tasks_adamw():
    from mmeff.tasks import build_model, build_task

    for fused in (True, None):
        cfg = config.load(GPU_CONFIGS[0], ["backbone.dim=32", "backbone.depth=1", "backbone.mixers.attn.heads=2",
                                           "optim.schedule=constant", f"optim.fused={'true' if fused else 'null'}"])  # fmt: skip
        opt = build_task(cfg, build_model(cfg)).configure_optimizers()
        assert opt.defaults["fused"] is fused


def test_lm_train_speed_cpu_smoke_writes_every_field(script, tmp_path):
    script("lm_train_speed", "--device", "cpu", "--rows", "attn", "hf_llama", "gla", "fla_gla", "gla_moe",
           "--warmup", "0", "--iters", "1", "--out", str(tmp_path / "lm"))  # fmt: skip
    records = {r["row"]: r for r in json.loads((tmp_path / "lm.json").read_text())["records"]}
    assert list(records) == ["attn", "hf_llama", "gla", "fla_gla", "gla_moe"]
    pytest.importorskip("transformers")
    for row in ("attn", "hf_llama", "gla", "gla_moe"):
        r = records[row]
        assert "note" not in r, r["note"]
        assert (r["T"], r["B"]) == (64, 2) and r["tok_s"] > 0 and r["ms"] > 0 and r["peak_gib"] is None
        assert r["floor_ms"] == pytest.approx(r["floor_matmul_ms"] + r["floor_mixer_ms"] + r["floor_optimizer_ms"])
        assert 0 < r["mfu"] and r["vs_attn"] == pytest.approx(r["tok_s"] / records["attn"]["tok_s"])
    assert records["attn"]["vs_peer"] == pytest.approx(records["attn"]["tok_s"] / records["hf_llama"]["tok_s"])
    assert records["hf_llama"]["peer_of"] == "attn"
    assert records["attn"]["params_m"] == pytest.approx(records["hf_llama"]["params_m"])  # same dims
    assert records["gla_moe"]["vs_dense"] == pytest.approx(records["gla_moe"]["tok_s"] / records["gla"]["tok_s"])
    # 8 experts, top-2, each half the dense width: the active parameters are the dense twin's (+ the router).
    assert records["gla_moe"]["active_params_m"] == pytest.approx(records["gla"]["params_m"], rel=0.02)
    if "note" in records["fla_gla"]:  # no fla (or no GPU for its kernels): said, not crashed
        assert records["fla_gla"]["note"].startswith(("skipped:", "refused:"))
    assert "| gla_moe | 1 | 0 | eager | 2 |" in (tmp_path / "lm.md").read_text()  # run 1, no documents, eager, B


def test_lm_train_speed_graphs_mode_keeps_its_own_ratios(script, tmp_path, monkeypatch):
    # --graphs: the mmeff rows through GraphedTraining (on the CPU it warns and runs eagerly: the step and the records
    # are what a GPU run writes), peers and packed rows skipped with a note, ratios only within the mode. Both runs
    # within one second (the clock frozen): still runs 1 and 2. Run ids used to be the second alone, which merges two
    # such runs as run 1: the likely cause of this test's one failure seen (its output was not kept).
    monkeypatch.setattr(time, "strftime", lambda fmt: "2026-12-07T11:00:00")
    out = tmp_path / "lm"
    script("lm_train_speed", "--device", "cpu", "--rows", "attn", "hf_llama", "gla", "--warmup", "0", "--iters", "1",
           "--out", str(out))  # fmt: skip
    script("lm_train_speed", "--device", "cpu", "--rows", "attn", "hf_llama", "gla", "--docs", "0", "2", "--graphs",
           "--warmup", "0", "--iters", "1", "--out", str(out))  # fmt: skip
    records = json.loads((out.with_suffix(".json")).read_text())["records"]
    graphed = {(r["row"], r["docs"]): r for r in records if r.get("graphs")}
    assert set(graphed) == {("attn", 0), ("hf_llama", 0), ("gla", 0), ("attn", 2), ("gla", 2)}
    for key in (("hf_llama", 0), ("attn", 2), ("gla", 2)):
        assert graphed[key]["note"].startswith("skipped: --graphs"), graphed[key]
    attn, gla = graphed[("attn", 0)], graphed[("gla", 0)]
    assert attn["tok_s"] > 0 and gla["vs_attn"] == pytest.approx(gla["tok_s"] / attn["tok_s"])
    assert "vs_peer" not in attn  # its peer did not run in this mode
    assert {r["run"] for r in records} == {"2026-12-07T11:00:00", "2026-12-07T11:00:00.2"}
    assert "| gla | 2 | 0 | graphs | 2 |" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit):  # two modes at once
        script("lm_train_speed", "--device", "cpu", "--graphs", "--compile", "--out", str(tmp_path / "x"))


def test_lm_train_speed_profile_records_the_hosts_time(script, tmp_path):
    # --profile: the host's time to queue a step, in ms (on the CPU the step runs as it is queued: the whole step, more
    # than 0.5 ms for this model). Not compared with the timed ms: beside the suite's other pytest worker one CI run
    # gave ms 234.5 against host 23.4, another (one process, no warm-up step) ms 12.6 against host 4.4.
    script("lm_train_speed", "--device", "cpu", "--rows", "attn", "--warmup", "1", "--iters", "3", "--profile",
           "--out", str(tmp_path / "lm"))  # fmt: skip
    (record,) = json.loads((tmp_path / "lm.json").read_text())["records"]
    assert 0.5 < record["host_ms"] < 60_000
    assert "profile_ms" not in record  # the GPU's kernel times: CUDA only
    header = next(line for line in (tmp_path / "lm.md").read_text().splitlines() if line.startswith("| row"))
    assert header.endswith("| params M | host ms | note |")


def test_lm_train_speed_ratios_stay_within_their_run(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import lm_train_speed

    def record(run, row, tok_s):
        return {"run": run, "row": row, "T": 64, "docs": 0, "compiled": False, "tok_s": tok_s}

    records = [record("a", "attn", 100.0), record("a", "gla", 50.0), record("b", "attn", 200.0), record("b", "gla", 150.0)]
    lm_train_speed.relate(records)
    assert [r["vs_attn"] for r in records] == [1.0, 0.5, 1.0, 0.75]


def test_lm_train_speed_profile_sorts_a_steps_kernels(monkeypatch):
    # --profile's per-category split and the step's longest kernels from torch.profiler's averaged events: CUDA
    # kernels only (a CPU op's own time is not GPU time), mmeff's recurrence kernels by name, the rest by pattern.
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import lm_train_speed

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(key, us, count, device=cuda):
        return SimpleNamespace(key=key, self_device_time_total=us, count=count, device_type=device)

    events = [event("nvjet_sm90_tst_256x128", 5250.0, 72), event("_bwd_dqk_kernel", 2360.0, 12),
              event("_gla_dv_kernel", 860.0, 12), event("multi_tensor_apply_kernel", 1560.0, 8),
              event("aten::mm", 9000.0, 72, cpu), event("idle", 0.0, 1)]  # fmt: skip
    monkeypatch.setattr(lm_train_speed, "TOP_KERNELS", 3)
    categories, top = lm_train_speed.kernel_times(events, {"_bwd_dqk_kernel", "_gla_dv_kernel"})
    assert categories == pytest.approx({"matmul": 5.25, "recurrence kernels": 3.22, "optimizer": 1.56})
    assert top == [["nvjet_sm90_tst_256x128", 5.25, 72], ["_bwd_dqk_kernel", 2.36, 12], ["multi_tensor_apply_kernel", 1.56, 8]]


def test_lm_train_speed_runs_the_peers_after_the_mmeff_rows(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import lm_train_speed

    assert lm_train_speed.select(["attn", "hf_llama", "retnet", "fla_gla", "gla"]) == ["attn", "retnet", "gla", "hf_llama", "fla_gla"]
    rows = lm_train_speed.select(None)
    first_peer = min(rows.index(p) for p in lm_train_speed.PEERS)
    assert all(r not in lm_train_speed.PEERS for r in rows[:first_peer]) and set(rows[first_peer:]) <= set(lm_train_speed.PEERS)


def test_lm_train_speed_checkpoint_rows_set_the_backbone_option(monkeypatch):
    # `<row>+ckpt_norm` (+ckpt_mixer, +ckpt) is the mmeff row with backbone.checkpoint set, as vision_speed's rows; a
    # peer or an unknown row with a suffix is refused by name.
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import lm_train_speed

    assert lm_train_speed.select(["hf_llama", "mamba2+ckpt_norm", "attn"]) == ["mamba2+ckpt_norm", "attn", "hf_llama"]
    for row, checkpoint in (("mamba2+ckpt_norm", "norm"), ("hybrid_gla+ckpt_mixer", "mixer"), ("gla+ckpt", True), ("gla", "norm"),
                           ("gla+no_ckpt", False)):
        cfg = lm_train_speed.run_config(row, lm_train_speed.SMOKE, 64)
        assert cfg.backbone.checkpoint == checkpoint and cfg.backbone.pattern == lm_train_speed.pattern_of(row)
    for bad in ("hf_llama+ckpt", "gla+fast"):
        with pytest.raises(SystemExit, match=bad.replace("+", r"\+")):
            lm_train_speed.select([bad])


def test_lm_train_speed_parameter_matched_gated_deltanet(monkeypatch):
    # gated_deltanet_v1: gated_deltanet's row with values as wide as its keys (expand_v 1), a variant the default
    # rows leave out; at the real dims its parameters are within 10% of attn's (gated_deltanet's 1.33x).
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import lm_train_speed
    from mmeff.tasks import build_model

    assert "gated_deltanet_v1" not in lm_train_speed.select(None)
    params = {}
    for row in ("attn", "gated_deltanet", "gated_deltanet_v1"):
        cfg = lm_train_speed.run_config(row, lm_train_speed.REAL, 64)
        with torch.device("meta"):
            params[row] = sum(p.numel() for p in build_model(cfg).parameters())
    mixer = lm_train_speed.run_config("gated_deltanet_v1", lm_train_speed.REAL, 64).backbone.mixers["gated_deltanet"]
    assert mixer["expand_v"] == 1.0 and mixer["heads"] == 8
    assert params["gated_deltanet_v1"] / params["attn"] < 1.1 < params["gated_deltanet"] / params["attn"]


def test_lm_train_speed_names_only_its_own_commit(monkeypatch, tmp_path):
    # A tree exported into another repository (as on the GPU machine) must not take that repository's commit.
    import subprocess

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import lm_train_speed

    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        assert f"mmeff {head.strip()}" in lm_train_speed.versions()
    outer = tmp_path / "outer"
    (outer / "tree" / "benchmarks").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    subprocess.run(["git", "-C", str(outer), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty",
                    "-m", "outer"], check=True)  # fmt: skip
    monkeypatch.setattr(lm_train_speed, "__file__", str(outer / "tree" / "benchmarks" / "lm_train_speed.py"))
    assert "mmeff" not in lm_train_speed.versions()


def test_lm_fit_speed_cpu_smoke_says_where_the_time_goes(script, tmp_path):
    from mmeff.data import build_shards

    build_shards(None, tmp_path / "docs", source="python-docs", seq_len=32, max_docs=20, val=0.2, test=0.1, maxcount=500)
    sets = [a for k, v in {**TINY, "data.root": tmp_path / "docs"}.items() for a in ("--set", f"{k}={v}")]
    script("lm_fit_speed", str(ROOT / "configs/text/gpu_150m_gla.yaml"), *sets, "--steps", "4", "--skip", "1",
           "--val-every", "2", "--variants", "fit", "no_clipping", "--warmup", "0", "--iters", "1",
           "--run-root", str(tmp_path / "runs"), "--out", str(tmp_path / "fit"))  # fmt: skip
    (record,) = json.loads((tmp_path / "fit.json").read_text())["records"]
    assert record["bare"]["tokens_per_step"] == 2 * 32 and record["bare"]["fused"]["tok_s"] > 0
    fit = record["fits"]["fit"]
    assert fit["steps"] == 3 and fit["validations"] == 2 and fit["tok_s"] <= fit["train_tok_s"]
    assert set(record["fits"]) == {"fit", "no_clipping"} and record["of_bare"] > 0
    gap = {g["item"].split(" (")[0]: g["ms_per_step"] for g in record["gap"]}
    assert sum(gap.values()) == pytest.approx(fit["ms"] - record["bare"]["fused"]["ms"])
    assert {"gradient clipping", "validation", "checkpointing after validation"} <= set(gap)
    assert (tmp_path / "runs" / "gpu_150m_gla" / "fit" / "checkpoints" / "last.ckpt").is_file()  # checkpointing was on
    assert "Where the difference goes" in (tmp_path / "fit.md").read_text()


def test_fit_clips_gradients_of_a_fused_adamw_under_bf16_mixed(tmp_path, monkeypatch):
    """Lightning's mixed-precision plugin refuses to clip for a fused AdamW (it unscales in its step, which only fp16's
    scaler needs); the gpu_150m configs ask for both under bf16-mixed, so the task clips itself."""
    import torch

    from mmeff.data import build_shards
    from mmeff.trainer import fit

    build_shards(None, tmp_path / "docs", source="python-docs", seq_len=32, max_docs=20, val=0.2, test=0.1, maxcount=500)
    overrides = {**TINY, "data.root": tmp_path / "docs", "trainer.precision": "bf16-mixed", "trainer.max_steps": 2,
                 "trainer.kwargs.val_check_interval": 2, "run_dir": tmp_path / "run"}  # fmt: skip
    cfg = config.load(GPU_CONFIGS[2], [f"{k}={v}" for k, v in overrides.items()])
    assert cfg.optim.fused and cfg.trainer.gradient_clip_val == 1.0
    norms, clip = [], torch.nn.utils.clip_grads_with_norm_  # by the norm that the non-finite check took
    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_",
                        lambda params, limit, norm: norms.append(limit) or clip(params, limit, norm))  # fmt: skip
    fit(cfg)
    assert norms == [1.0, 1.0]  # every step clipped (before: RuntimeError "does not allow for gradient clipping")


def test_saved_memory_of_the_lm_rows_counts_one_layer(tmp_path):
    # One layer's bytes per token (two pattern lengths of layers less one), on the kernels' path, for the LM rows: a
    # hybrid's figure is the mean of its pattern's layers.
    import subprocess

    subprocess.run([sys.executable, str(BENCHMARKS / "saved_memory.py"), "--lm", "--smoke", "--rows", "attn", "gla",
                    "hybrid_gla", "--out", str(tmp_path / "mem")], check=True)  # fmt: skip
    records = json.loads((tmp_path / "mem.json").read_text())["records"]
    kept = {r["row"]: r["kib_per_token_layer"] for r in records}
    assert list(kept) == ["attn", "gla", "hybrid_gla"] and records[0]["vs_attn"] == 1.0
    assert kept["gla"] > 0 and kept["attn"] > 0
    assert kept["hybrid_gla"] == pytest.approx((3 * kept["gla"] + kept["attn"]) / 4, rel=0.02)  # gla x3, attn
    assert "| hybrid_gla |" in (tmp_path / "mem.md").read_text()


def test_saved_memory_lm_peak_adds_the_step_transient(tmp_path):
    # --lm --peak: an LM row's training step census (a 2-layer model's step peak less what its forward keeps, per
    # token) and the step's peak per token at the row's depth (the smoke model's 2 layers), as for the vision rows.
    import subprocess

    subprocess.run([sys.executable, str(BENCHMARKS / "saved_memory.py"), "--lm", "--smoke", "--rows", "attn", "--peak",
                    "--detail", "--out", str(tmp_path / "mem")], check=True)  # fmt: skip
    record = json.loads((tmp_path / "mem.json").read_text())["records"][0]
    assert record["transient_kib_per_token"] > 0 and record["peak_vs_attn"] == 1.0
    assert record["peak_kib_per_token"] == pytest.approx(2 * record["live_kib_per_token_layer"] + record["transient_kib_per_token"])
    # --detail: the 2-layer step's peak by allocating code, largest first: at most that whole peak and most of it
    sites, whole = [n for _, n in record["at_peak"]], record["two_layer_peak_kib_per_token"]
    assert sites == sorted(sites, reverse=True) and 0.5 * whole < sum(sites) <= whole + 1e-6
    assert any("ffn.py" in where for where, _ in record["at_peak"])  # the SwiGLU's projections, the largest activations
    text = (tmp_path / "mem.md").read_text()
    assert "| attn | " in text.split("step peak")[-1] and "allocated by" in text


def test_launches_traffic_counts_the_glue_of_an_lm_step(tmp_path):
    # --lm --traffic: the bytes per token and layer of the aten ops outside matmuls, attention and the optimizer. Mamba-2's
    # v = x dt and its skip D x run as per-head kernels (mmeff.kernels.pointwise): no elementwise product is left in its
    # glue (its plain ops moved 108 of its 383 KiB per token and layer through aten.mul at the LM's size). In its own
    # process: the script runs Triton in its interpreter and fakes the GPU.
    import subprocess

    subprocess.run([sys.executable, str(BENCHMARKS / "launches.py"), "--lm", "--traffic", "--smoke", "--rows", "mamba2",
                    "--out", str(tmp_path / "traffic")], check=True)  # fmt: skip
    records = {r["row"]: r for r in json.loads((tmp_path / "traffic.json").read_text())["records"]}
    assert records["mamba2"]["kib_per_token_layer"] > 0 and records["mamba2"]["vs_mamba2"] == 1.0
    assert sum(records["mamba2"]["ops"].values()) == pytest.approx(records["mamba2"]["kib_per_token_layer"], rel=0.01)
    assert "mul" not in records["mamba2"]["ops"], records["mamba2"]["ops"]
    assert "| mamba2 |" in (tmp_path / "traffic.md").read_text()


def test_lm_train_speed_profile_files_mmeffs_kernels_as_recurrence_kernels():
    # --profile's "recurrence kernels" are mmeff's kernels by name, found through their wrappers (Launcher,
    # Autotuner); a wrapper it cannot see through would file them all under "other". In a subprocess: importing
    # mmeff.kernels here would stay for the later tests (tests/kernels/test_dispatch.py checks it is not imported).
    import subprocess

    code = ("import sys; sys.path.insert(0, 'benchmarks'); import lm_train_speed; "
            "print(' '.join(sorted(lm_train_speed.mmeff_kernels())))")  # fmt: skip
    names = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parents[2]).stdout.split()  # fmt: skip
    assert {"_fwd_h_kernel", "_bwd_dqk_kernel", "_intra_fwd_kernel", "_cumsum_kernel"} <= set(names)
