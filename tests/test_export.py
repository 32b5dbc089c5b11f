"""torch.export and ONNX of the classifier and the LM forward, one program for any batch size and sequence length,
against the eager model."""

import functools

import pytest
import torch

from mmeff import checkpoint, config
from mmeff.cli import main
from mmeff.export import dynamic_shapes, example_input, export_onnx, export_program, max_difference
from mmeff.tasks import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

# chunk_size 16: the lengths below cover part of a chunk, a whole one, one more token and several chunks.
MIXERS = {
    "attn": {"heads": 2},
    "gla": {"heads": 2, "chunk_size": 16},
    "linear_attn": {"heads": 2, "chunk_size": 16},
    "retnet": {"heads": 2, "chunk_size": 16},
    "mamba2": {"d_state": 16, "head_dim": 16, "chunk_size": 16},
    "gated_deltanet": {"heads": 2, "chunk_size": 16},
}
# Shape-dependent Python in the block (block counts, random tables, per-head masks, selections), 2 layers; blocks of 4
# and query groups of 8: the lengths below cover a partial block or group, whole ones, one more token and several.
SPARSE = {
    "quant_attn": {"heads": 2, "q_block": 8, "k_block": 4},
    "bigbird": {"heads": 2, "window": 4, "global_tokens": 1, "block": 4, "random_blocks": 1},
    "dilated": {"heads": 2, "window": [4, None], "dilation": [1, 3]},
    "block_topk": {"heads": 2, "block": 4, "topk": 2},
    "block_topk_shared": {"heads": 2, "block": 4, "topk": 2, "query_block": 8},
}
# One LM of the chunked forms that torch.onnx sees differently, one export instead of two: per-channel decay (gla) and
# the delta rule, whose inverse is matmuls while exporting (gated_deltanet; deltanet runs the same ops with zero decay:
# a third layer would cost ~10 s of test time).
LINEAR = "gla+gated_deltanet"
LM_MIXERS = [*(m for m in MIXERS if m not in LINEAR.split("+")), LINEAR, *SPARSE]
LENGTHS = (2, 16, 17, 40)
IMAGE_SIDES = ((8, 8), (4, 6), (16, 4), (32, 32))  # trained 8x8 in patches of 2; up to 4x larger


def _model(task: str, mixer: str):
    """A model of one layer per mixer of `mixer` ("a+b": one of each), or two of a sparse one."""
    torch.manual_seed(0)
    mixers = {m.removesuffix("_shared"): {**MIXERS, **SPARSE}[m] for m in mixer.split("+")}
    backbone = {"dim": 32, "pattern": list(mixers), "depth": 2 if mixer in SPARSE else len(mixers), "mixers": mixers}
    if task == "lm":
        cfg = {"encoder": {"name": "text", "seq_len": 40}, "backbone": backbone, "task": {"name": "lm"}}
    else:
        cfg = {
            "encoder": {"name": "image", "image_size": 8, "patch_size": 2},
            "backbone": {**backbone, "causal": False},
            "task": {"name": "classify", "num_classes": 3},
        }
    cfg = config.parse(cfg)
    return build_model(cfg).eval(), cfg


@functools.cache
def _exported(task: str, mixer: str):
    """(model, cfg, exported program), shared by the torch.export and the ONNX test (exporting is slow)."""
    model, cfg = _model(task, mixer)
    return model, cfg, export_program(model, cfg)


def _inputs(cfg, task: str) -> list[torch.Tensor]:
    """Inputs of several lengths (image sizes) and batch sizes."""
    if task == "lm":
        return [example_input(cfg, batch=1 + n % 3, length=length) for n, length in enumerate(LENGTHS)]
    return [torch.rand(1 + n % 3, 1, h, w) for n, (h, w) in enumerate(IMAGE_SIDES)]


@pytest.mark.parametrize("task, mixer", [*(("lm", m) for m in LM_MIXERS), ("classify", "attn"), ("classify", "gla")])
def test_one_exported_program_matches_the_eager_model_at_every_length(task, mixer):
    model, cfg, program = _exported(task, mixer)
    assert max_difference(program, model, _inputs(cfg, task)) < 1e-5


def test_bidirectional_bigbird_export_is_refused_with_the_reason():
    model, cfg = _model("classify", "bigbird")
    with pytest.raises(ValueError, match="causal bigbird only"):
        export_program(model, cfg)


def test_a_max_length_below_two_tokens_is_a_config_error():
    _, cfg = _model("lm", "attn")
    with pytest.raises(config.ConfigError, match="max_length 1"):
        dynamic_shapes(cfg, max_length=1)


@pytest.mark.parametrize("task, mixer", [("lm", LINEAR), ("classify", "attn")])
def test_onnx_runs_in_onnxruntime_like_the_eager_model_at_two_lengths(tmp_path, task, mixer):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, cfg, program = _exported(task, mixer)
    path = export_onnx(program, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for x in _inputs(cfg, task)[1::2]:
        (got,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(x), atol=1e-4, rtol=1e-4)


def test_export_command_writes_a_program_of_its_length_range_and_refuses_to_overwrite_it(tmp_path, capsys):
    model, cfg = _model("lm", "attn")
    checkpoint.export(model, cfg, tmp_path / "ckpt")
    out = tmp_path / "lm.pt2"
    assert main(["export", str(tmp_path / "ckpt"), str(out), "--max-length", "32"]) == 0
    program = torch.export.load(out)
    assert max_difference(program, model, [example_input(cfg, length=n) for n in (3, 32)]) < 1e-5
    with pytest.raises(Exception, match="length|32"):
        program.module()(example_input(cfg, length=33))
    assert main(["export", str(tmp_path / "ckpt"), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "lm.zip")]) == 2
    assert ".pt2 or .onnx" in capsys.readouterr().err
