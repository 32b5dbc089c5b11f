"""Multi-label classification: BCE and the exact-set accuracy / mAP metrics on a hand-computed case, the multi-hot
field, and a tiny fit on digit-canvas shards."""

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from mmeff import config, metrics
from mmeff.tasks.classify import Task, multi_hot

# 4 samples x 3 classes. Predicted sets (logit > 0): {0, 2} {0, 1} {2} {0}: only the first is exact.
LOGITS = torch.tensor([[2.0, -1.0, 0.5], [0.5, 3.0, -2.0], [-1.0, -1.5, 1.0], [1.0, -2.0, -1.0]])
TARGET = torch.tensor([[1, 0, 1], [0, 1, 0], [0, 1, 0], [0, 0, 1]])
# Average precision per class, ranking the samples by score: class 0: its one positive ranks first -> 1;
# class 1: positives at ranks 1 and 3 -> (1/1 + 2/3) / 2; class 2: positives at ranks 2 and 3 -> (1/2 + 2/3) / 2.
MAP = (1 + (1 + 2 / 3) / 2 + (1 / 2 + 2 / 3) / 2) / 3
# Binary cross-entropy: -log sigmoid(x) = log(1 + e^-x) for a positive, log(1 + e^x) for a negative; mean of 12.
BCE = sum(math.log1p(math.exp(-x if y else x)) for x, y in zip(LOGITS.flatten().tolist(), TARGET.flatten().tolist()))
BCE /= 12


def test_metrics_on_a_hand_computed_case():
    scores = metrics.multilabel(3)
    scores.update(torch.sigmoid(LOGITS[:2]), TARGET[:2])  # accumulated over batches, computed over the split
    scores.update(torch.sigmoid(LOGITS[2:]), TARGET[2:])
    result = scores.compute()
    assert float(result["exact"]) == pytest.approx(0.25)
    assert float(result["map"]) == pytest.approx(MAP)


class Fixed(nn.Module):
    """A model that returns the hand-made logits."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return LOGITS * self.w


def multilabel_config(**task):
    task = {"name": "classify", "num_classes": 3, "multilabel": True, **task}
    return config.parse({"encoder": {"name": "image"}, "task": task})


def test_an_empty_update_counts_no_sample_and_keeps_the_states_gatherable():
    # A padded eval batch updates with no samples: a rank of padding only must still hold 2-D `map` states, which
    # torchmetrics gathers with the other ranks' [N, labels] ones (an unupdated rank's 1-D placeholder breaks the sync).
    scores = metrics.multilabel(3)
    scores.update(torch.sigmoid(LOGITS[:0]), TARGET[:0])
    assert all(state.shape == (0, 3) for state in scores["map"].preds + scores["map"].target)
    scores.update(torch.sigmoid(LOGITS), TARGET)
    result = scores.compute()
    assert float(result["exact"]) == pytest.approx(0.25) and float(result["map"]) == pytest.approx(MAP)


def test_task_loss_and_val_metrics_on_the_hand_computed_case():
    task = Task(multilabel_config(), Fixed())
    loss = task.step({"input": torch.zeros(4, 1), "label": TARGET.float()}, "val")
    assert loss.item() == pytest.approx(BCE, rel=1e-6)
    result = task.scores["val"].compute()
    assert float(result["val/exact"]) == pytest.approx(0.25) and float(result["val/map"]) == pytest.approx(MAP)


def test_label_smoothing_with_multilabel_is_a_config_error():
    with pytest.raises(config.ConfigError, match="task.label_smoothing"):
        multilabel_config(label_smoothing=0.1)


def test_multi_hot_field_is_checked_by_name():
    def npy(array):
        buffer = io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()

    assert multi_hot(npy(np.array([0, 1, 1], np.uint8)), 3, "labels.npy").tolist() == [0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="'labels.npy': expected a 0/1 vector of 3 classes"):
        multi_hot(npy(np.array([0, 1], np.uint8)), 3, "labels.npy")
    with pytest.raises(ValueError, match="'cls' is not a .npy multi-hot vector"):
        multi_hot(b"7", 3, "cls")


def test_tiny_compiled_fit_on_digit_canvas_logs_exact_and_map(tmp_path, monkeypatch):
    from mmeff.data import build_shards
    from mmeff.trainer import evaluate, fit

    # trainer.compile runs nn.Module.compile; AOT-autograd tracing without Inductor's C++ build keeps this test fast.
    compiled = []
    plain_compile = nn.Module.compile
    def compile_traced(self, **options):
        compiled.append(self)
        plain_compile(self, backend="aot_eager")

    monkeypatch.setattr(nn.Module, "compile", compile_traced)

    root = tmp_path / "canvas"
    build_shards(None, root, source="digit-canvas", size=32, train=16, val=8, test=8)
    cfg = config.parse(
        {
            "run_dir": str(tmp_path / "run"),
            "data": {"root": str(root), "batch_size": 8},
            "encoder": {"name": "image", "image_size": 32, "patch_size": 8, "pool": "mean", "augment": False},
            "backbone": {"dim": 16, "depth": 1, "causal": False, "mixers": {"attn": {"heads": 2}}},
            "task": {"name": "classify", "num_classes": 10, "multilabel": True, "label_key": "labels.npy"},
            "trainer": {"max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False, "logger": "none",
                        "monitor": "val/exact", "compile": True},
        }
    )
    trainer = fit(cfg)
    assert len(compiled) == 1 and compiled[0]._compiled_call_impl is not None
    assert {"val/exact", "val/map", "train/exact"} <= set(trainer.callback_metrics)
    results = evaluate(cfg, cfg.out_dir / "export")  # the export loads into a plain model: names without _orig_mod
    assert 0 <= results["test/exact"] <= 1 and 0 < results["test/map"] <= 1


@pytest.mark.parametrize("mixer, options", [
    ("linear_attn", {"heads": 2, "scan": "global", "local_conv": 3}),
    ("gla", {"heads": 2, "scan": "bi"}),
    ("attn", {"heads": 2}),
])  # fmt: skip
def test_the_whole_image_classifier_compiles_as_one_graph(mixer, options):
    # The encoder makes the Layout inside the compiled model, and the mixers read its cached properties. On Python
    # 3.11 functools.cached_property enters an RLock that dynamo cannot trace: the graph broke in every layer and the
    # resumed frames recompiled at every step (the canvas fit under trainer.compile). fullgraph=True fails on any
    # break; the compiled forward and gradients equal the eager ones (tolerance 1e-4 of the largest value).
    from mmeff.tasks.classify import build_model

    cfg = config.parse({
        "encoder": {"name": "image", "image_size": 32, "patch_size": 8, "in_chans": 1, "pool": "mean"},
        "backbone": {"dim": 16, "depth": 2, "pattern": [mixer], "causal": False, "mixers": {mixer: options}},
        "task": {"name": "classify", "num_classes": 10, "multilabel": True},
    })  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    images = torch.randn(2, 1, 32, 32)
    results = []
    torch._dynamo.reset()
    for run in (model, torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)):
        logits = run(images)
        logits.square().sum().backward()
        results.append([logits.detach(), *(p.grad.clone() for p in model.parameters())])
        model.zero_grad(set_to_none=True)
    for got, want in zip(results[1], results[0]):
        assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())
