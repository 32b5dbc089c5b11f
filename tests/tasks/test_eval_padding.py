"""Eval padding: a batch repeated only so that every rank steps together (flagged `_pad` by the data pipeline) runs its
forward but counts in no validation metric of any task: the epoch's metrics equal those without it."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from mmeff import config
from mmeff.encoders.text import ByteTokenizer
from mmeff.tasks import build_task

pytestmark = pytest.mark.usefixtures("one_thread")

TOK = ByteTokenizer()
BACKBONE = {"dim": 16, "pattern": ["attn"], "mixers": {"attn": {"heads": 2}}}
IMAGE = {"name": "image", "image_size": 8, "patch_size": 4, "augment": False}
TEXTS = ["one digit: 4", "417", "a 7 and a 1", "9", "two digits: 3 8"]


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def classify(n: int, seed: int) -> dict:
    return {"input": images(n, seed), "label": torch.arange(seed, seed + n) % 10}


def multilabel(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input": images(n, seed), "label": (torch.rand(n, 4, generator=g) < 0.5).float()}


def rows(ids: list[list[int]], width: int) -> torch.Tensor:
    return torch.tensor([r[:width] + [TOK.pad_id] * (width - len(r[:width])) for r in ids])


def text(n: int, seed: int) -> dict:
    """`n` rows of seq_len + 1 ids, each a text and its <eos>, then padding."""
    tokens = rows([[*TOK.encode(TEXTS[(seed + i) % len(TEXTS)]), TOK.eos_id] for i in range(n)], 17)
    return {"tokens": tokens, "docs": torch.zeros_like(tokens)}


def captions(n: int, seed: int) -> dict:
    refs = [TEXTS[(seed + i) % len(TEXTS)] for i in range(n)]
    return {"input": images(n, seed), "tokens": rows([[TOK.bos_id, *TOK.encode(t), TOK.eos_id] for t in refs], 24), "text": refs}


CAUSAL = {**BACKBONE, "causal": True}
BIDI = {**BACKBONE, "causal": False}
TEXT = {"name": "text", "seq_len": 16}
CASES = {
    "classify": ({"encoder": IMAGE, "backbone": BIDI, "task": {"name": "classify", "num_classes": 10}}, classify),
    "multilabel": ({"encoder": IMAGE, "backbone": BIDI, "task": {"name": "classify", "num_classes": 4, "multilabel": True}}, multilabel),
    "lm": ({"encoder": TEXT, "backbone": CAUSAL, "task": {"name": "lm"}}, text),
    "diffusion": ({"encoder": TEXT, "backbone": BIDI, "task": {"name": "diffusion"}}, text),
    "caption": ({"encoder": IMAGE, "backbone": CAUSAL, "task": {"name": "caption", "max_len": 24, "max_new_tokens": 6}}, captions),
    "diffusion_caption": (
        {"encoder": IMAGE, "backbone": BIDI, "task": {"name": "diffusion_caption", "max_len": 24, "max_new_tokens": 6, "eval_steps": 2}},
        captions,
    ),
}


@pytest.mark.parametrize("kind", CASES)
def test_a_padded_batch_counts_in_no_validation_metric(kind, tmp_path):
    spec, make = CASES[kind]
    cfg = config.parse({**spec, "run_dir": str(tmp_path)})
    first, second = make(3, 0), make(5, 3)
    padded = {**second, "_pad": True}  # as the pipeline repeats a batch: last, on a rank with fewer batches
    seen = []

    def validate(batches: list[dict]) -> dict[str, float]:
        torch.manual_seed(0)
        task = build_task(cfg)
        task.model.register_forward_hook(lambda *_: seen.append(kind))
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        return trainer.validate(task, DataLoader(batches, batch_size=None), verbose=False)[0]

    plain = validate([first, second])
    forwards = len(seen)
    with_padding = validate([first, second, padded])
    assert len(seen) - forwards > forwards  # the padded batch still ran its forward (ranks stay in step)
    assert plain and with_padding.keys() == plain.keys()
    for key, value in plain.items():
        assert with_padding[key] == pytest.approx(value, rel=1e-5, nan_ok=True), key
