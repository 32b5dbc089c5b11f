"""from_pretrained / save_pretrained (huggingface_hub's ModelHubMixin) on the mmeff checkpoint folder, for every task model."""

import pytest
import torch

import mmeff
from mmeff import checkpoint, config
from mmeff.tasks import build_model
from mmeff.tasks.classify import Classifier
from mmeff.tasks.lm import LanguageModel

pytestmark = pytest.mark.usefixtures("one_thread")

BACKBONE = {"dim": 32, "pattern": ["gla", "attn"], "depth": 2, "mixers": {"gla": {"heads": 2}, "attn": {"heads": 2}}}
CONFIGS = {
    "lm": {"encoder": {"name": "text"}, "backbone": BACKBONE, "task": {"name": "lm"}},
    "classify": {
        "encoder": {"name": "image", "image_size": 8, "patch_size": 4},
        "backbone": {**BACKBONE, "causal": False},
        "task": {"name": "classify", "num_classes": 3},
    },
}
INPUTS = {"lm": lambda: torch.randint(0, 256, (2, 9)), "classify": lambda: torch.rand(2, 1, 8, 8)}


@pytest.mark.parametrize("task", sorted(CONFIGS))
def test_save_pretrained_then_from_pretrained_gives_the_same_model(tmp_path, task):
    torch.manual_seed(0)
    model = build_model(config.parse(CONFIGS[task])).eval()
    model.save_pretrained(tmp_path / "m")
    assert {"config.yaml", "model.safetensors"} <= {p.name for p in (tmp_path / "m").iterdir()}
    assert ((tmp_path / "m" / "tokenizer.json").is_file()) == (task == "lm")
    loaded = mmeff.Model.from_pretrained(tmp_path / "m")
    assert type(loaded) is type(model)
    x = INPUTS[task]()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    again = type(model).from_pretrained(tmp_path / "m")  # the class of the model, and its folder read by mmeff.load
    assert isinstance(again, type(model)) and isinstance(mmeff.load(tmp_path / "m"), type(model))
    loaded.save_pretrained(tmp_path / "again")  # a loaded model knows its run config
    assert (tmp_path / "again" / "config.yaml").read_text() == (tmp_path / "m" / "config.yaml").read_text()


def test_the_folder_is_the_trainers_export(tmp_path):
    cfg = config.parse(CONFIGS["lm"])
    model = build_model(cfg)
    checkpoint.export(model, cfg, tmp_path / "export")
    assert isinstance(LanguageModel.from_pretrained(tmp_path / "export"), LanguageModel)


def test_from_pretrained_refuses_another_task_and_save_refuses_to_overwrite(tmp_path):
    model = build_model(config.parse(CONFIGS["lm"]))
    model.save_pretrained(tmp_path / "lm")
    with pytest.raises(TypeError, match="holds a LanguageModel .*not a Classifier"):
        Classifier.from_pretrained(tmp_path / "lm")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save_pretrained(tmp_path / "lm")
    model.save_pretrained(tmp_path / "lm", overwrite=True)
    with pytest.raises(TypeError, match="unknown arguments"):
        LanguageModel.from_pretrained(tmp_path / "lm", hidden_size=3)
