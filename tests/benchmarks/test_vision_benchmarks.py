"""The vision benchmark scripts at tiny sizes on the CPU: every record they promise, written where they say."""

import dataclasses
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


def test_vision_speed_smoke_writes_every_field(script, tmp_path):
    script("vision_speed", "--smoke", "--rows", "attn", "linear_attn-global+local", "gla-cross", "--px", "224", "audio",
           "--warmup", "0", "--reps", "1", "--out-dir", str(tmp_path), "--name", "speed")  # fmt: skip
    records = json.loads((tmp_path / "speed.json").read_text())["records"]
    rows = ("timm", "attn", "linear_attn-global+local", "gla-cross")
    assert [(r["row"], r["px"]) for r in records] == [(row, px) for px in (32, "audio") for row in rows]
    timm = {r["px"]: r["img_s"] for r in records if r["row"] == "timm"}
    for r in records:
        assert "note" not in r, r["note"]
        assert r["img_s"] > 0 and r["flops_per_img"] > 0 and r["floor_ms"] > 0 and r["compiled"] is False
        assert r["vs_timm"] == pytest.approx(r["img_s"] / timm[r["px"]])
    assert (tmp_path / "speed.md").read_text().count("| gla-cross | no |") == 2


def test_vision_speed_keeps_each_compile_mode_apart(script, tmp_path, monkeypatch):
    # --compile MODE compiles timm and the mmeff rows alike in torch.compile's MODE (as trainer.compile: MODE); records
    # of two modes sit side by side, each row related to timm's record of its own mode.
    from torch import nn

    modes = []
    plain_compile = nn.Module.compile

    def compile_traced(self, **options):
        modes.append(options.get("mode", "default"))
        plain_compile(self, backend="aot_eager")  # AOT-autograd tracing without Inductor's C++ build: fast

    monkeypatch.setattr(nn.Module, "compile", compile_traced)
    # A peak as a GPU reports one (the CPU has none): reduce-overhead's CUDA graph pools are not in it, so not shown.
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import vision_speed

    timed = vision_speed.median_ms
    monkeypatch.setattr(vision_speed, "median_ms", lambda *a: (timed(*a)[0], 2.0))
    args = ("--smoke", "--rows", "attn", "--px", "224", "--warmup", "0", "--reps", "1", "--out-dir", str(tmp_path), "--name", "speed")
    script("vision_speed", *args, "--compile")
    script("vision_speed", *args, "--compile", "reduce-overhead")
    assert modes == ["default", "default", "reduce-overhead", "reduce-overhead"]  # timm, attn; timm, attn
    records = json.loads((tmp_path / "speed.json").read_text())["records"]
    assert [(r["row"], r["compiled"], r.get("compile_mode")) for r in records] == [
        ("timm", True, None), ("attn", True, None), ("timm", True, "reduce-overhead"), ("attn", True, "reduce-overhead")]
    timm = {r.get("compile_mode"): r["img_s"] for r in records if r["row"] == "timm"}
    for r in records:
        assert r["vs_timm"] == pytest.approx(r["img_s"] / timm[r.get("compile_mode")])
        assert r["peak_gib"] == (None if r.get("compile_mode") == "reduce-overhead" else 2.0)
    table = (tmp_path / "speed.md").read_text()
    assert "| attn | compiled | " in table and "| attn | compiled-reduce-overhead | " in table
    with pytest.raises(SystemExit):
        script("vision_speed", *args, "--compile", "fast")  # argparse names the modes it takes


def test_vision_speed_counts_flops_once_and_stops_a_row_at_its_limit(script, tmp_path, monkeypatch):
    # A second run takes each row's FLOPs from the first one's records (counting runs the references: minutes at
    # 2048 px on the H200), and --row-limit ends a row that runs too long, noting it, and goes on with the next row.
    import time

    args = ("--smoke", "--rows", "attn", "--px", "224", "--warmup", "0", "--reps", "1", "--out-dir", str(tmp_path), "--name", "speed")
    script("vision_speed", *args)
    first = json.loads((tmp_path / "speed.json").read_text())["records"]
    import vision_speed

    monkeypatch.setattr(vision_speed, "flops_per_input", lambda *a: pytest.fail("FLOPs counted again"))
    def compile_for_long(*a):  # as Inductor, which re-raises what interrupts its compile as its own error
        try:
            time.sleep(30)
        except vision_speed.RowLimit as e:
            raise RuntimeError("InductorError: RowLimit") from e

    monkeypatch.setattr(vision_speed, "median_ms", compile_for_long)
    started = time.monotonic()
    script("vision_speed", *args, "--row-limit", "1")
    assert time.monotonic() - started < 20
    records = json.loads((tmp_path / "speed.json").read_text())["records"]
    assert [r["row"] for r in records] == ["timm", "attn"]
    for r, before in zip(records, first):
        assert r["note"] == "stopped at the row limit, 1 s" and "img_s" not in r
        assert r["flops_per_img"] == before["flops_per_img"]
    with pytest.raises(SystemExit, match="--row-limit takes seconds >= 0"):
        script("vision_speed", *args, "--row-limit", "-5")
    with pytest.raises(SystemExit, match="--memory needs CUDA"):
        script("vision_speed", *args, "--memory")


def test_vision_speed_pins_an_ops_backend_for_its_rows(script, tmp_path):
    # --backend OP=NAME makes NAME the op's default for the run's mmeff rows, recorded as row[OP=NAME] beside the
    # default rows; the default comes back after the run. On the CPU a pinned "triton" cannot run: the row's note
    # says so, which shows the pin reached the op.
    from mmeff.ops.conv import depthwise_conv2d

    args = ("--smoke", "--rows", "linear_attn-global+local", "--px", "224", "--warmup", "0", "--reps", "1",
            "--out-dir", str(tmp_path), "--name", "speed")  # fmt: skip
    script("vision_speed", *args)
    script("vision_speed", *args, "--backend", "depthwise_conv2d=torch")
    script("vision_speed", *args, "--backend", "depthwise_conv2d=triton")
    records = {r["row"]: r for r in json.loads((tmp_path / "speed.json").read_text())["records"]}
    assert set(records) == {"timm", "linear_attn-global+local", "linear_attn-global+local[depthwise_conv2d=torch]",
                            "linear_attn-global+local[depthwise_conv2d=triton]"}  # fmt: skip
    assert records["linear_attn-global+local[depthwise_conv2d=torch]"]["img_s"] > 0
    assert "backend='triton' requested" in records["linear_attn-global+local[depthwise_conv2d=triton]"]["note"]
    assert depthwise_conv2d.__kwdefaults__["backend"] == "auto"
    for bad, message in (("conv=torch", "not an mmeff.ops op"), ("depthwise_conv2d=cudnn", "backend must be one of")):
        with pytest.raises(SystemExit, match=message):
            script("vision_speed", *args, "--backend", bad)
    assert depthwise_conv2d.__kwdefaults__["backend"] == "auto"


def test_vision_speed_ckpt_rows_checkpoint_every_layer(script, tmp_path):
    # `<row>+ckpt` is the row with backbone.checkpoint: true (+ckpt_mixer: mixer, +no_ckpt: false), beside the plain row
    # (the default, norm); a bad name is refused.
    import vision_speed

    assert vision_speed.select(["gla-bi+ckpt", "attn", "mamba2-bi+ckpt_mixer"]) == ["timm", "gla-bi+ckpt", "attn", "mamba2-bi+ckpt_mixer"]
    assert vision_speed.select(["gla+ckpt"]) == ["timm", "gla-bi+ckpt", "gla-cross+ckpt", "gla-bi+local+ckpt"]
    for bad in ("timm+ckpt", "gla-bi+fast"):
        with pytest.raises(SystemExit, match="unknown row"):
            vision_speed.select([bad])
    model, _ = vision_speed.build("linear_attn-global+local+ckpt", 32, vision_speed.SMOKE)
    layers = model.backbone.layers
    assert all(layer.checkpoint for layer in layers) and layers[0].mixer.local_conv is not None
    assert all(layer.checkpoint == "norm" for layer in vision_speed.build("attn", 32, vision_speed.SMOKE)[0].backbone.layers)
    assert not any(layer.checkpoint for layer in vision_speed.build("attn+no_ckpt", 32, vision_speed.SMOKE)[0].backbone.layers)
    mixer_only = vision_speed.build("gla-bi+ckpt_mixer", 32, vision_speed.SMOKE)[0].backbone.layers
    assert all(layer.checkpoint == "mixer" for layer in mixer_only)
    script("vision_speed", "--smoke", "--rows", "attn+ckpt", "--px", "224", "--warmup", "0", "--reps", "1",
           "--out-dir", str(tmp_path), "--name", "speed")  # fmt: skip
    records = json.loads((tmp_path / "speed.json").read_text())["records"]
    assert [r["row"] for r in records] == ["timm", "attn+ckpt"] and records[1]["img_s"] > 0


def test_vision_speed_groups_rows_cap_the_scan_tokens_and_the_census_scales_them(script, census):
    # `<scan row>+groups` sets scan_tokens (GROUP_TOKENS: four groups of a 1,024 px batch for `bi`, eight for
    # `cross`); saved_memory.py gives its small census batches as many groups, so that its transient is that step's.
    import vision_speed

    from mmeff.blocks.scan import ScanMixer

    assert vision_speed.select(["gated_deltanet-bi+groups", "gla+groups+ckpt_norm"]) == [
        "timm", "gated_deltanet-bi+groups", "gla-bi+groups+ckpt_norm", "gla-cross+groups+ckpt_norm",
        "gla-bi+local+groups+ckpt_norm"]  # fmt: skip
    for row, groups in (("gated_deltanet-bi+groups", 4), ("gla-cross+groups+ckpt_norm", 8)):
        model, _ = vision_speed.build(row, 32, vision_speed.SMOKE)
        scans = [m for m in model.modules() if isinstance(m, ScanMixer)]
        assert scans and all(m.routes.max_tokens == vision_speed.GROUP_TOKENS for m in scans)
        census.groups_as_at_1024(model, 8, 4)
        routes = 2 if "-bi" in row else 4
        assert all(m.routes.max_tokens == 8 * routes * 4 // groups for m in scans)
    plain, _ = vision_speed.build("gated_deltanet-bi", 32, vision_speed.SMOKE)
    assert all(m.routes.max_tokens is None for m in plain.modules() if isinstance(m, ScanMixer))


def test_vision_speed_no_recurrence_rows_skip_only_the_recurrence(script, tmp_path, monkeypatch):
    # `<row>+no_recurrence` runs the row's step with each linear-recurrence mixer's op replaced by a stand-in (o = v),
    # at the row's own FLOP count (its ceiling: the most a faster recurrence could give). Every projection before
    # the recurrence still gets its gradient; a model without such a mixer is refused in the row's note.
    import torch
    import vision_speed

    from mmeff import ops

    assert vision_speed.select(["gla-bi+no_recurrence", "retnet-bi+groups+no_recurrence+ckpt", "gla-bi+routes"]) == [
        "timm", "gla-bi+no_recurrence", "retnet-bi+groups+no_recurrence+ckpt", "gla-bi+routes"]  # fmt: skip
    model, example = vision_speed.build("gla-bi+no_recurrence", 32, vision_speed.SMOKE)
    vision_speed.stub_recurrence(model)
    monkeypatch.setattr(ops, "gated_linear_attention", lambda *a, **k: pytest.fail("the recurrence ran"))
    model(example.expand(2, -1, -1, -1)).square().mean().backward()
    mixer = model.backbone.layers[0].mixer
    for name, p in (("qkv", mixer.qkv.weight), ("decay", mixer.decay[0].weight), ("gate", mixer.gate.weight)):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert mixer.decay[0].weight.grad.abs().sum() == 0  # kept in the graph at no weight, as the stand-in promises
    monkeypatch.undo()
    args = ("--smoke", "--px", "224", "--warmup", "0", "--reps", "1", "--out-dir", str(tmp_path), "--name", "speed")
    script("vision_speed", "--rows", "gla-bi", "gla-bi+no_recurrence", "gla-bi+routes", "mamba2-bi+no_recurrence", *args)
    records = {r["row"]: r for r in json.loads((tmp_path / "speed.json").read_text())["records"]}
    for row in ("gla-bi+no_recurrence", "gla-bi+routes"):  # the same model's FLOPs, taken from gla-bi's record
        assert records[row]["flops_per_img"] == records["gla-bi"]["flops_per_img"] and records[row]["img_s"] > 0
    assert "no linear-recurrence mixer" in records["mamba2-bi+no_recurrence"]["note"]


def test_saved_memory_counts_what_the_gpu_path_keeps(tmp_path):
    # The non-causal linear_attn recomputes its feature maps and keeps q, k, v and a state: no more than softmax
    # attention per token (the block-level census in tests/blocks/test_linear_mixers.py, here through the whole model,
    # on the kernels' path). What is live after the forward is what is saved: gla-bi's route copies, which the scan's
    # saved-tensor hook kept alive outside the saved count until 5416efe, are gone. In its own process: the script
    # runs Triton in its interpreter and fakes the GPU.
    import subprocess
    import sys

    subprocess.run([sys.executable, str(BENCHMARKS / "saved_memory.py"), "--smoke", "--rows", "attn", "linear_attn-global",
                    "gla-bi", "gla-bi+ckpt_mixer", "--detail", "--out", str(tmp_path / "mem")], check=True)  # fmt: skip
    records = json.loads((tmp_path / "mem.json").read_text())["records"]
    assert [r["row"] for r in records] == ["timm", "attn", "linear_attn-global", "gla-bi", "gla-bi+ckpt_mixer"]
    kept = {r["row"]: r["kib_per_token_layer"] for r in records}
    assert 0 < kept["linear_attn-global"] <= kept["attn"] < 1.1 * kept["timm"]
    assert kept["gla-bi+ckpt_mixer"] < min(kept["gla-bi"], kept["attn"])  # the mixer recomputed: only its input kept
    for r in records:
        assert abs(r["live_kib_per_token_layer"] - r["kib_per_token_layer"]) <= 0.05 * r["kib_per_token_layer"], r
    assert records[0]["vs_timm"] == records[0]["live_vs_timm"] == 1.0 and all(r["largest"] for r in records)
    assert "| linear_attn-global |" in (tmp_path / "mem.md").read_text() and (tmp_path / "mem.png").stat().st_size > 0


def test_saved_memory_peak_adds_the_backward_transient(tmp_path):
    # --peak: a 2-layer model's training step, its peak less what its forward keeps (the backward's buffers, the
    # weights' gradients left out), per token; the full-depth estimate is live x depth + that. In its own process as
    # above.
    import subprocess
    import sys

    subprocess.run([sys.executable, str(BENCHMARKS / "saved_memory.py"), "--smoke", "--rows", "attn", "--peak", "--out",
                    str(tmp_path / "mem")], check=True)  # fmt: skip
    records = json.loads((tmp_path / "mem.json").read_text())["records"]
    for r in records:
        assert r["transient_kib_per_token"] > 0
        assert r["peak_kib_per_token"] == pytest.approx(2 * r["live_kib_per_token_layer"] + r["transient_kib_per_token"])
    assert records[0]["peak_vs_timm"] == 1.0 and "| attn | " in (tmp_path / "mem.md").read_text().split("step peak")[-1]


def test_saved_memory_compiled_keeps_what_eager_keeps(tmp_path):
    # --compiled: the partition torch.compile's backward takes. gla-bi's route copies and MLP activation are made again
    # there as in eager mode (mmeff.ops.recompute.compiled_recomputing; kept, they came to 1.6x eager's count). In its
    # own process as above.
    import subprocess
    import sys

    subprocess.run([sys.executable, str(BENCHMARKS / "saved_memory.py"), "--smoke", "--rows", "gla-bi", "--compiled",
                    "--out", str(tmp_path / "mem")], check=True)  # fmt: skip
    records = {r["row"]: r for r in json.loads((tmp_path / "mem.json").read_text())["records"]}
    assert list(records) == ["timm", "gla-bi"] and records["timm"]["compiled_kib_per_token_layer"] > 0
    gla = records["gla-bi"]
    assert gla["compiled_kib_per_token_layer"] <= 1.05 * gla["kib_per_token_layer"], gla
    assert "| gla-bi |" in (tmp_path / "mem.md").read_text().split("Compiled")[-1]


def test_vision_train_trains_an_mmeff_config_and_timm_and_tests_them(script, tmp_path):
    from mmeff.data import build_shards

    build_shards(None, tmp_path / "canvas", source="digit-canvas", size=32, train=16, val=8, test=8)
    overrides = {"data.root": tmp_path / "canvas", "data.num_workers": 0, "data.batch_size": 8, "encoder.image_size": 32,
                 "backbone.dim": 32, "backbone.depth": 1, "backbone.mixers.gla.heads": 2}  # fmt: skip
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    script("vision_train", str(BENCHMARKS.parent / "configs/vision/canvas_gla.yaml"), "--timm", "vit_small_patch16_224",
           "--timm-args", "{embed_dim: 32, depth: 1, num_heads: 2}", "--steps", "2", "--skip", "1", *sets,
           "--out-dir", str(tmp_path), "--name", "train")  # fmt: skip
    rows = json.loads((tmp_path / "train.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["canvas_gla", "timm vit_small_patch16_224"]
    for r in rows:
        assert r["steps"] == 2 and r["img_s"] > 0 and 0 <= r["test_exact"] <= 1 and 0 < r["test_map"] <= 1
        assert [t["step"] for t in r["loss_trace"]] == [2] and r["loss_trace"][0]["grad_norm"] > 0


def test_init_gradients_finds_the_amplified_gradients_of_identity_gla_features(script, tmp_path):
    # 64 px canvases, 2 layers: the bidirectional gla default (elu+1 features) gets about attention's gradient at the
    # first layer (1.3x measured); identity q/k features, which trained to chance on the H200, 4.5x (61x at 256 px, 4
    # layers: benchmarks/results/init_gradients.md).
    script("init_gradients", "--size", "64", "--depth", "2", "--mixers", "gla", "gla:feature_map=identity",
           "--out-dir", str(tmp_path), "--name", "grads")  # fmt: skip
    records = json.loads((tmp_path / "grads.json").read_text())["records"]
    assert [r["row"] for r in records] == ["attn (canvas_vit)", "gla", "gla:feature_map=identity"]
    assert records[1]["options"]["heads"] == 6 and records[2]["options"]["feature_map"] == "identity"
    assert records[0]["first_ratio"] == 1.0 and all(len(r["layer_rms"]) == 2 for r in records)
    assert records[1]["first_ratio"] < 2 < 3 < records[2]["first_ratio"]


def test_init_gradients_names_a_row_option_that_is_not_key_value(script, tmp_path):
    with pytest.raises(SystemExit, match="'feature_map' is not KEY=VALUE"):
        script("init_gradients", "--mixers", "gla:feature_map", "--out-dir", str(tmp_path))


def test_vision_ops_times_each_backend_or_says_why_not(script, tmp_path):
    # On the CPU the Triton rows say why they did not run; the PyTorch rows have times; files are written.
    script("vision_ops", "--smoke", "--reps", "2", "--warmup", "1", "--out-dir", str(tmp_path))
    records = json.loads((tmp_path / "vision_ops_cpu.json").read_text())["records"]
    assert {(r["op"], r["backend"]) for r in records} == {
        (op, b) for op in ("global_linear_attention", "depthwise_conv2d") for b in ("triton", "torch")
    }
    for r in records:
        assert (r["ms"] > 0 and r["vs_torch"] == 1.0) if r["backend"] == "torch" else "not on CUDA" in r["note"]
    assert "| depthwise_conv2d | 32 |" in (tmp_path / "vision_ops_cpu.md").read_text()
    assert (tmp_path / "vision_ops_cpu.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="--px takes 224, 512, 1024, 2048, got 300"):
        script("vision_ops", "--px", "300")


def test_memory_peak_charges_what_is_live_at_the_peak_to_its_frame(tmp_path, capsys, script):
    # A hand-made history: 10 bytes allocated before it (2 of them freed during it), a 100-byte activation (mmeff)
    # and a 50-byte temporary (no frame) live together at the peak, then the temporary freed and a 30-byte buffer.
    import pickle

    frame = {"filename": "/x/site-packages/mmeff/blocks/linear.py", "line": 7, "name": "project"}
    history = [
        {"action": "free_completed", "addr": 1, "size": 2},
        {"action": "alloc", "addr": 10, "size": 100, "frames": [{"filename": "torch/nn/x.py", "line": 1, "name": "f"}, frame]},
        {"action": "alloc", "addr": 20, "size": 50, "frames": []},
        {"action": "free_completed", "addr": 20, "size": 50},
        {"action": "alloc", "addr": 30, "size": 30, "frames": [frame]},
    ]  # fmt: skip
    blocks = [{"size": s, "state": "active_allocated"} for s in (8, 100, 30)] + [{"size": 50, "state": "inactive"}]
    path = tmp_path / "memory.pickle"
    path.write_bytes(pickle.dumps({"device_traces": [history], "segments": [{"device": 0, "blocks": blocks}]}))
    script("memory_peak", str(path))
    out = capsys.readouterr().out
    assert out.startswith("peak 0.0 MiB")
    import memory_peak

    found = memory_peak.peak(pickle.loads(path.read_bytes()))
    assert (found["peak"], found["older"], found["end"]) == (158, 8, 138)
    assert found["live"] == {"mmeff/blocks/linear.py:7 (project)": [100, 1], "(no Python frame: autograd's backward thread or C++)": [50, 1]}
    assert "mmeff/blocks/linear.py:7 (project)" in out
    (tmp_path / "other.pickle").write_bytes(pickle.dumps({"segments": []}))
    for argv, message in (([str(tmp_path / "missing.pickle")], "cannot read the snapshot"),
                          ([str(tmp_path / "other.pickle")], "not a CUDA allocator snapshot"),
                          ([str(path), "--device", "1"], "the snapshot has devices 0 to 0")):  # fmt: skip
        with pytest.raises(SystemExit, match=message):
            script("memory_peak", *argv)


def test_launches_counts_the_ops_and_kernels_of_a_step(tmp_path):
    # timm launches no Triton kernel; mmeff attn's norms one kernel each way per norm (the residual adds inside them),
    # and each pre-norm's forward again in the backward (backbone.checkpoint: norm, the default);
    # a bidirectional scan (retnet-bi) stacks all of its streams in one launch: forward, stacked again in the backward,
    # and the output's gradient (3 a layer), and merges in 2 (the output; the streams' gradients); gla-bi takes no
    # route in its forward but the bidirectional GLA op (2 kernels: the second only finishes chunks of strong gates),
    # whose backward stacks the inputs and the output's gradient along the routes (2 launches), runs the chunked
    # recurrence's backward and merges the gradients in 1; `gla-bi+routes` runs the routes as retnet-bi does. In its
    # own process: the script runs Triton in its interpreter and fakes the GPU.
    import subprocess
    import sys

    subprocess.run([sys.executable, str(BENCHMARKS / "launches.py"), "--smoke", "--rows", "timm", "attn", "gla-bi",
                    "gla-bi+routes", "retnet-bi", "--out", str(tmp_path / "launches")], check=True)  # fmt: skip
    records = {r["row"]: r for r in json.loads((tmp_path / "launches.json").read_text())["records"]}
    depth = 2  # vision_speed.SMOKE
    assert records["timm"]["triton_launches"] == 0 and records["timm"]["aten"]["native_layer_norm"] == 2 * depth + 1
    assert records["attn"]["triton"] == {"_norm_fwd_kernel": 4 * depth + 1, "_norm_bwd_kernel": 2 * depth + 1}
    for row in ("retnet-bi", "gla-bi+routes"):
        assert records[row]["triton"]["_stack_kernel"] == 3 * depth and records[row]["triton"]["_merge_kernel"] == 2 * depth
    assert not any(name.startswith("_bigla") for name in records["gla-bi+routes"]["triton"])
    gla = records["gla-bi"]["triton"]
    assert {name: n for name, n in gla.items() if name.startswith("_bigla")} == {"_bigla_fwd_kernel": depth,
                                                                                 "_bigla_exact_fwd_kernel": depth}
    assert gla["_stack_kernel"] == 2 * depth and gla["_merge_kernel"] == depth and "_fwd_h_kernel" in gla  # fmt: skip
    assert records["timm"]["launches"] < records["gla-bi"]["launches"] and records["timm"]["vs_timm"] == 1.0
    assert "| gla-bi |" in (tmp_path / "launches.md").read_text() and (tmp_path / "launches.png").stat().st_size > 0


def test_host_cost_says_it_needs_cuda():
    # It times what a CUDA step launches (tests/gpu/test_benchmarks_gpu.py runs it there); here it says so and stops.
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(BENCHMARKS / "host_cost.py")], capture_output=True, text=True)
    assert done.returncode != 0 and "no CUDA device here" in done.stderr
    # A step it cannot build is refused before any timing, on any machine.
    done = subprocess.run([sys.executable, str(BENCHMARKS / "host_cost.py"), "--steps", "gla-bi"], capture_output=True, text=True)
    assert done.returncode != 0 and "--steps takes vision:<row> or lm:<row>, got gla-bi" in done.stderr


def test_vision_speed_profile_shows_the_backwards_host_time(script, tmp_path):
    # The cProfile section runs the backward on the calling thread: on CUDA, autograd's device thread ran the Python
    # autograd.Functions' backwards out of cProfile's sight. Here mmeff's own backward functions must be listed.
    script("vision_speed", "--smoke", "--rows", "gla-bi", "--px", "224", "--warmup", "0", "--reps", "1", "--profile",
           "--out-dir", str(tmp_path), "--name", "speed")  # fmt: skip
    text = next(tmp_path.rglob("profile_gla-bi_*.txt")).read_text()  # --smoke: 32 px
    assert "Ops of one step by the host's own time" in text and "autograd::engine::evaluate_function" in text
    host = text.split("under cProfile", 1)[1]
    assert "(backward)" in host and "mmeff/" in host


def test_vision_speed_chunk_size_builds_the_scan_mixers_with_it(script, tmp_path, monkeypatch):
    # --chunk-size: an A/B of the chunk length at one image size (196 tokens fill 64-token chunks to 77%).
    import vision_speed

    built = []
    build = vision_speed.build
    monkeypatch.setattr(vision_speed, "build", lambda row, px, shape: built.append((row, shape.chunk)) or build(row, px, shape))
    script("vision_speed", "--smoke", "--rows", "gla-bi", "--px", "224", "--warmup", "0", "--reps", "1", "--chunk-size",
           "16", "--out-dir", str(tmp_path), "--name", "speed")  # fmt: skip
    assert built == [("timm", None), ("gla-bi", 16)]
    model, _ = build("gla-bi", 224, dataclasses.replace(vision_speed.SMOKE, chunk=16))
    assert {m.chunk_size for m in model.modules() if hasattr(m, "chunk_size")} == {16}
    records = json.loads((tmp_path / "speed.json").read_text())["records"]
    assert [r["row"] for r in records] == ["timm", "gla-bi[chunk_size=16]"]
    with pytest.raises(SystemExit):  # 48 would run as 64 in the kernels under a row named 48
        script("vision_speed", "--smoke", "--rows", "gla-bi", "--chunk-size", "48")


def test_launches_traffic_counts_the_glue_of_a_vision_step(tmp_path):
    # --traffic without --lm: the vision rows' glue bytes per token and layer (the patch embedding and head left out by
    # the difference of one- and two-layer models). Its own process: the script fakes the GPU.
    import subprocess
    import sys

    subprocess.run([sys.executable, str(BENCHMARKS / "launches.py"), "--traffic", "--smoke", "--rows", "timm", "attn",
                    "--out", str(tmp_path / "traffic")], check=True)  # fmt: skip
    records = {r["row"]: r for r in json.loads((tmp_path / "traffic.json").read_text())["records"]}
    assert set(records) == {"timm", "attn"} and records["timm"]["vs_timm"] == 1.0
    for r in records.values():
        assert r["kib_per_token_layer"] > 0
        assert sum(r["ops"].values()) == pytest.approx(r["kib_per_token_layer"], rel=0.01)
    # The Triton kernels' bytes beside the glue's: timm launches none; attn's norms run on mmeff's kernels.
    assert records["timm"]["kernel_kib_per_token_layer"] == 0 and records["attn"]["kernel_kib_per_token_layer"] > 0
    assert set(records["attn"]["kernels"]) == {"_norm_fwd_kernel", "_norm_bwd_kernel"}
    assert "patch embedding and head left out" in (tmp_path / "traffic.md").read_text()


def test_launches_traffic_counts_a_kernels_distinct_bytes():
    # A launch's bytes are its distinct addresses loaded plus those stored, as its masks let them through: the route
    # stack reads each stream once (a strided slice only its own columns, not the rest of its rows or of the tiles)
    # and writes it twice (the sequence and its reverse).
    import subprocess
    import sys

    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import launches, torch\n"
        "from mmeff.kernels import routes\n"
        "counter = [None]; launches._hook_triton(counter)\n"
        "x, y = torch.randn(3, 40, 24), torch.randn(3, 40, 8)\n"
        "counted = counter[0] = launches._Traffic()\n"
        "with counted:\n"
        "    routes.stack([x, y[..., :5]])\n"
        "print(json.dumps(counted.kernels))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(BENCHMARKS)], check=True, capture_output=True, text=True)
    assert json.loads(out.stdout.splitlines()[-1]) == {"_stack_kernel": 3 * (3 * 40 * (24 + 5) * 4)}


def test_launches_traffic_names_a_bad_image_size():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(BENCHMARKS / "launches.py"), "--traffic", "--px", "100", "--rows", "timm"],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode != 0 and "--px 100 must be a positive multiple of the patch size, 16" in out.stderr
