"""Config loading: every kind of error names the key path; overrides; round trip."""

from pathlib import Path

import pytest
import yaml

from mmeff import config
from mmeff.config import ConfigError

BASE = {
    "name": "t",
    "encoder": {"name": "image", "image_size": 16, "patch_size": 4},
    "task": {"name": "classify", "num_classes": 10},
    "backbone": {"dim": 32, "pattern": ["attn"]},
}


def _with(**patch):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    for path, value in patch.items():
        node = data
        *parents, last = path.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return data


def test_valid_config_parses_with_types():
    cfg = config.parse(_with(optim__lr=1))
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.encoder.image_size == 16 and cfg.task.num_classes == 10
    assert str(cfg.out_dir) == "runs/t"


@pytest.mark.parametrize(
    "patch, fragment",
    [
        ({"backbone__dimm": 3}, "unknown key backbone.dimm"),
        ({"optim__lr": "fast"}, "optim.lr: got 'fast'"),
        ({"trainer__logger": "wandbb"}, "trainer.logger: got 'wandbb'"),
        ({"backbone__pattern": "attn"}, "backbone.pattern: got 'attn'"),
        ({"encoder__pool": "max"}, "encoder.pool"),
        ({"task__name": "segment"}, "task.name: got 'segment'; expected one of"),
        ({"data__batch_size": True}, "data.batch_size: got True"),
        ({"topping": 1}, "unknown key topping"),
    ],
)
def test_errors_name_the_key(patch, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace("(", r"\(").replace("'", "'")):
        config.parse(_with(**patch))


def test_missing_required_key():
    data = _with()
    del data["encoder"]
    with pytest.raises(ConfigError, match="missing required key encoder"):
        config.parse(data)


def test_error_lists_allowed_values():
    with pytest.raises(ConfigError) as e:
        config.parse(_with(trainer__logger="wandbb"))
    assert "csv" in str(e.value) and "tensorboard" in str(e.value) and "class path" in str(e.value)


def test_overrides_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    cfg = config.load(path, ["--backbone.dim=64", "--backbone.pattern=[attn, attn]", "--trainer.max_epochs=3"])
    assert cfg.backbone.dim == 64 and cfg.backbone.pattern == ["attn", "attn"] and cfg.trainer.max_epochs == 3
    config.save(cfg, tmp_path / "resolved.yaml")
    again = config.load(tmp_path / "resolved.yaml")
    assert config.to_dict(again) == config.to_dict(cfg)
    with pytest.raises(ConfigError, match="unknown key backbone.width"):
        config.load(path, ["--backbone.width=3"])
    with pytest.raises(ConfigError, match="expected --key.path=value"):
        config.load(path, ["--backbone.dim"])


def test_bad_block_option_names_the_key():
    from mmeff.backbone import Backbone

    cfg = config.parse(_with(backbone__mixers={"attn": {"headz": 2}}))
    with pytest.raises(ConfigError, match="backbone.mixers.attn.headz"):
        Backbone(cfg.backbone)
    cfg = config.parse(_with(backbone__pattern=["nope"]))
    with pytest.raises(ConfigError, match="unknown block 'nope'"):
        Backbone(cfg.backbone)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)


def test_backbone_takes_a_dict_checked_like_the_config():
    from mmeff.backbone import Backbone

    backbone = Backbone({"dim": 32, "pattern": ["gla"], "mixers": {"gla": {"heads": 2}}})
    assert backbone.cfg.dim == 32 and len(backbone.layers) == 1
    with pytest.raises(ConfigError, match="unknown key backbone.dimm"):
        Backbone({"dimm": 32})


@pytest.mark.parametrize("name", ["gla", "deltanet", "mamba2", "attn"])
def test_every_block_names_its_options_on_a_typo(name):
    from mmeff import blocks

    with pytest.raises(ConfigError, match=rf"unknown option head for block '{name}'; allowed: .*causal"):
        blocks.build(name, 64, head=4)


def test_every_block_declares_its_options():
    from mmeff import blocks
    from mmeff.blocks.registry import options

    assert [n for n in blocks.names() if options(blocks.entry(n).cls) is None] == []


def test_config_files_layer_later_wins(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump(BASE))
    b.write_text(yaml.safe_dump({"backbone": {"pattern": ["gla"], "mixers": {"gla": {"heads": 2}}}, "optim": {"lr": 0.5}}))
    cfg = config.load([a, b], ["--optim.lr=0.25"])
    assert cfg.backbone.dim == 32 and cfg.backbone.pattern == ["gla"] and cfg.optim.lr == 0.25


@pytest.mark.parametrize("name", ["vit-t-attn", "vit-s-gla", "lm-150m-attn", "lm-150m-mamba2", "lm-150m-hybrid"])
def test_presets_fill_a_valid_config(name):
    from mmeff.presets import PRESETS

    task = {"name": "lm"} if name.startswith("lm") else {"name": "classify"}
    cfg = config.parse({"preset": name, "task": task})
    assert cfg.backbone.dim == PRESETS.get(name).sections["backbone"]["dim"]


def test_config_error_needs_no_encoder_or_task_module():
    import subprocess
    import sys

    code = "import sys\nfrom mmeff import config\ntry:\n    config.parse({**%r, 'backbone': {'dimm': 3}})\nexcept config.ConfigError as e:\n    print(e)\nprint(sorted(m for m in sys.modules if m.startswith(('torch', 'mmeff.tasks.', 'mmeff.encoders.'))))"
    lines = subprocess.run([sys.executable, "-c", code % BASE], capture_output=True, text=True, timeout=120).stdout.splitlines()
    assert lines[0].startswith("unknown key backbone.dimm; allowed keys of backbone: ") and lines[-1] == "[]"


def test_task_modules_keep_their_contract():
    import types

    from mmeff import tasks
    from mmeff.config import TASKS
    from mmeff.registry import check_contract

    for name in TASKS.names():
        assert callable(tasks.task_module(name).build_model)
    broken = types.ModuleType("broken")
    broken.build_model = lambda cfg: None
    with pytest.raises(TypeError, match=r"broken is not a complete task: it needs def make_transform\(cfg, train\); Task: "):
        check_contract(broken, tasks.TaskContract, "task")


VISION_CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "vision").glob("*.yaml"))


@pytest.mark.parametrize("path", VISION_CONFIGS, ids=lambda p: p.stem)
def test_every_vision_config_builds_and_classifies_an_image(path):
    import torch

    from mmeff.tasks import build_model

    cfg = config.load(path)
    model = build_model(cfg).eval()
    enc = cfg.encoder
    with torch.no_grad():
        logits = model(torch.rand(1, enc.in_chans, enc.image_size, enc.image_size))
    assert logits.shape == (1, cfg.task.num_classes) and torch.isfinite(logits).all()
