"""trainer.cuda_graphs (mmeff.tasks.graphs): what the config refuses, and the eager fallback (no CUDA here; the
replay itself is tested on the GPU: tests/gpu/test_cuda_graphs_gpu.py)."""

import contextlib

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from mmeff import config
from mmeff.config import ConfigError
from mmeff.encoders.text import ByteTokenizer
from mmeff.tasks import build_task

pytestmark = pytest.mark.usefixtures("one_thread")
TOK = ByteTokenizer()

SPEC = {
    "encoder": {"name": "image", "image_size": 8, "patch_size": 4, "augment": False},
    "backbone": {"dim": 16, "pattern": ["gla"], "causal": False, "mixers": {"gla": {"heads": 2}}},
    "task": {"name": "classify", "num_classes": 10},
}


@pytest.mark.parametrize(
    "trainer,culprit",
    [
        ({"accumulate_grad_batches": 2}, "trainer.accumulate_grad_batches"),
        ({"devices": 2}, "trainer.strategy"),
        ({"strategy": "ddp"}, "trainer.strategy"),
        ({"compile": True}, "trainer.compile"),
    ],
)
def test_cuda_graphs_refuses_what_a_replay_cannot_do(trainer, culprit):
    with pytest.raises(ConfigError, match=culprit):
        config.parse({**SPEC, "trainer": {"cuda_graphs": True, **trainer}})


def test_cuda_graphs_is_for_the_classify_task_and_joined_lm_rows():
    cfg = config.parse({**SPEC, "encoder": {"name": "text", "seq_len": 8}, "task": {"name": "lm"},
                        "backbone": {**SPEC["backbone"], "causal": True}, "trainer": {"cuda_graphs": True}})  # fmt: skip
    with pytest.raises(ConfigError, match="trainer.cuda_graphs: true needs task.documents: joined"):
        build_task(cfg)


def test_cuda_graphs_without_a_gpu_trains_eagerly_and_says_so(tmp_path):
    def fit(graphs: bool) -> dict[str, torch.Tensor]:
        cfg = config.parse({**SPEC, "run_dir": str(tmp_path), "trainer": {"cuda_graphs": graphs}})
        torch.manual_seed(0)
        task = build_task(cfg)
        batches = [{"input": torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(i)), "label": torch.arange(4) + i}
                   for i in range(3)]  # fmt: skip
        trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
        trainer.fit(task, DataLoader(batches, batch_size=None))
        return {k: v.clone() for k, v in task.model.state_dict().items()}

    eager = fit(False)
    with pytest.warns(UserWarning, match="not on a CUDA device; training runs eagerly"):
        graphs = fit(True)
    assert eager.keys() == graphs.keys()
    assert all(torch.equal(eager[k], graphs[k]) for k in eager)


LM = {
    "encoder": {"name": "text", "seq_len": 8},
    "backbone": {"dim": 16, "pattern": ["attn", "gla"], "mixers": {"attn": {"heads": 2}, "gla": {"heads": 2}}},
    "task": {"name": "lm"},
}


def test_joined_lm_rows_call_the_model_on_the_ids_alone_and_fall_back_eagerly_off_cuda(tmp_path):
    # Two documents in every row: read separately, the second one's tokens see nothing of the first; joined, the model
    # is called on the ids alone (GPT-2's packing) and that one-shape call is what trainer.cuda_graphs replays.
    tokens = torch.tensor([[*TOK.encode("abc"), TOK.eos_id, *TOK.encode("defg"), TOK.eos_id]] * 2)
    batch = {"tokens": tokens, "docs": torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1]] * 2)}
    losses = {}
    for documents, graphs in (("separate", False), ("joined", False), ("joined", True)):
        cfg = config.parse({**LM, "run_dir": str(tmp_path), "task": {"name": "lm", "documents": documents},
                            "trainer": {"cuda_graphs": graphs}})  # fmt: skip
        torch.manual_seed(0)
        task = build_task(cfg).train()
        called = []
        task.model.register_forward_pre_hook(lambda m, args, kwargs: called.append((len(args), kwargs)), with_kwargs=True)
        with pytest.warns(UserWarning, match="not on a CUDA device") if graphs else contextlib.nullcontext():
            losses[documents, graphs] = task.step(task.on_before_batch_transfer(batch, 0), "val").item()
        assert called == ([(1, {})] if documents == "joined" else [(1, {"docs": called[0][1]["docs"], "bounds": (0, 4, 8, 12, 16)})])
    assert losses["joined", False] == losses["joined", True] != losses["separate", False]


def test_task_documents_is_checked():
    with pytest.raises(ConfigError, match="task.documents: got 'apart'"):
        config.parse({**LM, "task": {"name": "lm", "documents": "apart"}})
