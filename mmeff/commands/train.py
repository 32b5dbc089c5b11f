"""`mmeff fit | validate | test`: run configs through Lightning."""

from __future__ import annotations

import argparse

from mmeff import config
from mmeff.commands import command
from mmeff.config import ConfigError, RunConfig

OVERRIDES = """config files and overrides:
  The config files are read in order, each laid over the ones before (mappings merge key by key, later
  wins); then any --key.path=value argument sets one key, its value read as YAML:
    --trainer.max_epochs=5  --backbone.pattern='[gla, attn]'  --backbone.mixers.attn.heads=8
    --trainer.kwargs.limit_train_batches=10   (any other lightning.Trainer argument)
  `preset: NAME` in a config fills its encoder and backbone sections from a named preset (mmeff models).
  Every key is checked before any work starts: a typo names the key and the allowed ones."""


def config_arguments(p: argparse.ArgumentParser) -> None:
    """The config file(s) and --print_config of the commands that take a run config."""
    p.add_argument("config", nargs="?", help="run config (YAML)")
    p.add_argument("--config", dest="configs", action="append", default=[], metavar="FILE",
                   help="another config file laid over the ones before (repeatable; later wins)")
    p.add_argument("--print_config", "--print-config", action="store_true", help="print the resolved config as YAML and exit")


def load_config(args: argparse.Namespace) -> RunConfig:
    """The run config of the command line: the files in order, then the overrides."""
    files = ([args.config] if args.config else []) + args.configs
    if not files:
        raise ConfigError("no run config given: mmeff COMMAND CONFIG.yaml [--config MORE.yaml] [--key.path=value ...]")
    return config.load(files, args.overrides)


def print_config(cfg: RunConfig) -> None:
    """Print the resolved config as the YAML a run folder's config.yaml holds."""
    import yaml

    print(yaml.safe_dump(config.to_dict(cfg), sort_keys=False), end="")


def _fit_arguments(p: argparse.ArgumentParser) -> None:
    config_arguments(p)
    p.add_argument("--resume", help="'last', a run folder or a .ckpt file to continue from")
    p.add_argument("--overwrite", action="store_true", help="replace the export of an earlier finished run of this name")


@command(
    "fit", "train a run config (extra --key.path=value arguments override it)", _fit_arguments, overrides=True, notes=OVERRIDES,
    examples=[
        "mmeff fit configs/vision/digits.yaml",
        "mmeff fit configs/vision/digits.yaml --trainer.max_epochs=5 --backbone.pattern='[gla]'",
        "mmeff fit --config base.yaml --config my_changes.yaml",
        "mmeff fit configs/text/python_docs_gla.yaml --print_config",
        "mmeff fit configs/vision/digits.yaml --resume last",
    ],
)
def fit(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    if args.print_config:
        print_config(cfg)
        return 0
    from mmeff import trainer

    trainer.fit(cfg, resume=args.resume, overwrite=args.overwrite)
    return 0


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    config_arguments(p)
    p.add_argument("--ckpt", help="checkpoint folder (default: <run_dir>/export)")


def _evaluate(args: argparse.Namespace, split: str) -> int:
    cfg = load_config(args)
    if args.print_config:
        print_config(cfg)
        return 0
    from mmeff import trainer

    metrics = trainer.evaluate(cfg, args.ckpt or cfg.out_dir / "export", split)
    for key in sorted(metrics, key=lambda k: (k.endswith("acc"), k)):
        print(f"{key}: {metrics[key]:.4f}")
    return 0


@command(
    "validate", "evaluate an exported checkpoint on the val split", _evaluate_arguments, overrides=True, notes=OVERRIDES,
    examples=["mmeff validate configs/vision/digits.yaml", "mmeff validate configs/vision/digits.yaml --ckpt runs/digits/export"],
)
def validate(args: argparse.Namespace) -> int:
    return _evaluate(args, "val")


@command(
    "test", "evaluate an exported checkpoint on the test split", _evaluate_arguments, overrides=True, notes=OVERRIDES,
    examples=["mmeff test configs/vision/digits.yaml", "mmeff test configs/vision/digits.yaml --data.batch_size=256"],
)
def test(args: argparse.Namespace) -> int:
    return _evaluate(args, "test")
