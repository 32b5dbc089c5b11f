"""Bad config values end in one ConfigError naming the key (issue 25), before any run folder is written."""

import pytest
import yaml

import mmeff.trainer
from mmeff import config
from mmeff.config import ConfigError

BASE = {
    "name": "t",
    "encoder": {"name": "image", "image_size": 16, "patch_size": 4},
    "task": {"name": "classify", "num_classes": 10},
    "backbone": {"dim": 32, "pattern": ["attn"]},
}


@pytest.mark.parametrize(
    "override, key",
    [
        ("--backbone.dim=0", "backbone.dim"),
        ("--backbone.depth=0", "backbone.depth"),
        ("--backbone.depth=-1", "backbone.depth"),
        ("--backbone.pattern=[]", "backbone.pattern"),
        ("--backbone.mixers={gla: {heads: 2}}", "backbone.mixers.gla"),
        ("--optim.lr=-0.1", "optim.lr"),
        ("--optim.lr=.nan", "optim.lr"),
        ("--optim.betas=[0.9]", "optim.betas"),
        ("--data.batch_size=0", "data.batch_size"),
        ("--data.num_workers=-1", "data.num_workers"),
        ("--encoder.patch_size=5", "encoder.image_size"),
        ("--encoder.patch_size=0", "encoder.patch_size"),
        ("--task.num_classes=0", "task.num_classes"),
        ("--trainer.max_epochs=0", "trainer.max_epochs"),
        ("--trainer.logger=no such logger", "trainer.logger"),
        ("--trainer.on_nonfinite=ignore", "trainer.on_nonfinite"),
        ("--encoder.name={}", "encoder.name"),
        ("--backbone={1: 2, a: 3}", "unknown key backbone."),
        ("--optim.groups={1: 2.0}", "optim.groups"),
        ("--optim.lr=[1, 2", "override --optim.lr"),
    ],
)
def test_bad_value_names_its_key(tmp_path, override, key):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.load(path, [override])


def test_yaml_12_floats_are_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE) + "optim: {lr: 3e-4, weight_decay: 1E-2}\n")
    cfg = config.load(path, ["--optim.min_lr_ratio=1e-3"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.min_lr_ratio) == (3e-4, 1e-2, 1e-3)


@pytest.mark.parametrize("text", ["5\n", "- a\n- b\n", "just text\n", "!!python/object/apply:os.system ['touch x']\n"])
def test_a_file_that_is_no_config_mapping(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=str(path)):
        config.load(path)


def test_config_is_checked_before_the_run_folder_is_written(tiny_config):
    cfg = config.load(tiny_config(**{"backbone.mixers": {"attn": {"headz": 2}}}))
    with pytest.raises(ConfigError, match="backbone.mixers.attn.headz"):
        mmeff.trainer.fit(cfg)
    assert not cfg.out_dir.exists()


def test_an_accelerator_that_is_not_there(tiny_config):
    cfg = config.load(tiny_config(**{"trainer.accelerator": "tpu"}))
    with pytest.raises(ConfigError, match="trainer: Lightning rejected the options \\(accelerator='tpu', .*\\): .*torch_xla"):
        mmeff.trainer.build_trainer(cfg)
