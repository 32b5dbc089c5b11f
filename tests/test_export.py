"""torch.export and ONNX of the classifier and the LM forward (attention, linear and SSM mixers) against the eager model."""

import pytest
import torch

from mmeff import config
from mmeff.export import example_input, export_onnx, export_program
from mmeff.tasks import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

MIXERS = {"attn": {"heads": 2}, "gla": {"heads": 2}, "mamba2": {"d_state": 16, "head_dim": 16}}


def _model(task: str, mixer: str, depth: int = 2):
    torch.manual_seed(0)
    backbone = {"dim": 32, "pattern": [mixer], "depth": depth, "mixers": {mixer: MIXERS[mixer]}}
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


@pytest.mark.parametrize("task, mixer", [("lm", "attn"), ("lm", "gla"), ("lm", "mamba2"), ("classify", "attn"), ("classify", "gla")])
def test_exported_program_matches_the_eager_model(task, mixer):
    model, cfg = _model(task, mixer)
    program = export_program(model, example_input(cfg, batch=2))
    x = example_input(cfg, batch=3)  # another batch size: the batch dimension stays dynamic
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("task, mixer", [("lm", "gla"), ("classify", "attn")])
def test_onnx_runs_in_onnxruntime_like_the_eager_model(tmp_path, task, mixer):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, cfg = _model(task, mixer, depth=1)  # ONNX export is slow; one layer shows the mapping
    path = export_onnx(model, example_input(cfg, batch=2), tmp_path / "model.onnx")
    x = example_input(cfg, batch=3)
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), atol=1e-4, rtol=1e-4)
