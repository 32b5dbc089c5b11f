"""Run configuration: one YAML file -> typed dataclasses, with dotted command-line overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config value is unknown, missing or of the wrong type; the message names the key path."""


# Sections whose dataclass depends on their `name` key (encoder, task): kind -> name -> class.
_SECTIONS: dict[str, dict[str, type]] = {"encoder": {}, "task": {}}


def register_section(kind: str, name: str):
    """Class decorator: make `cls` the config of `kind` section `name` (e.g. encoder 'image')."""

    def wrap(cls: type) -> type:
        _SECTIONS[kind][name] = cls
        return cls

    return wrap


@dataclass
class DataConfig:
    """Where the WebDataset shards are and how batches are made from them."""

    root: str = "data/digits"
    source: str | None = None  # what `mmeff shards --source` writes into `root` when it is empty
    train: str = "train-*.tar"  # shard patterns (glob or {a..b} brace form), relative to root
    val: str | None = "val-*.tar"
    test: str | None = "test-*.tar"
    batch_size: int = 64
    eval_batch_size: int | None = None
    num_workers: int = 0
    shuffle_buffer: int = 1000
    strict: bool = False  # True: a corrupt shard or missing key is an error, not a counted skip
    seed: int = 0


@dataclass
class BackboneConfig:
    """The shared layer stack: one token mixer per layer from `pattern`, each followed by `ffn`."""

    dim: int = 128
    pattern: list[str] = field(default_factory=lambda: ["attn"])
    depth: int | None = None  # cycle `pattern` to this many layers; None: as written
    causal: bool = True
    ffn: str = "swiglu"  # channel mixer name from the registry, or "none"
    ffn_options: dict[str, Any] = field(default_factory=dict)
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    mixers: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-mixer-name options
    drop_path: float = 0.0
    final_norm: bool = True


@dataclass
class TrainerConfig:
    """Options passed to `lightning.Trainer` (plus `kwargs` for any other Trainer argument)."""

    max_epochs: int | None = 10
    max_steps: int = -1
    precision: str = "32-true"
    accelerator: str = "auto"
    devices: Union[int, str, list[int]] = 1
    strategy: str = "auto"
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    check_val_every_n_epoch: int | None = 1  # None: validate by `kwargs.val_check_interval` steps only
    num_sanity_val_steps: int = 0
    enable_progress_bar: bool = True
    logger: Literal["auto", "csv", "tensorboard", "none"] = "auto"
    save_top_k: int = 1
    monitor: str = "val/loss"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay (per optimizer step)."""

    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.01
    groups: dict[str, float] = field(default_factory=dict)  # name pattern -> lr multiplier


@dataclass
class RunConfig:
    """One run: data, encoder, backbone, task, trainer, optim."""

    encoder: Any
    task: Any
    name: str = "run"
    run_dir: str = "runs/${name}"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    init_from: str | None = None  # checkpoint folder whose matching weights start this run
    freeze: list[str] = field(default_factory=list)  # parameter-name patterns kept fixed
    train: list[str] = field(default_factory=list)  # if set, only these patterns train
    upcycle: bool = False  # with init_from: dense MLP weights initialise every MoE expert
    lora: dict[str, Any] = field(default_factory=dict)  # LoRA adapters: targets, rank, alpha, dropout (mmeff.lora)

    @property
    def out_dir(self) -> Path:
        """The run folder, with `${name}` filled in."""
        return Path(self.run_dir.replace("${name}", self.name))


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_describe(a) for a in get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_describe(a) for a in get_args(tp))}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`, converting int->float; raise naming `path`."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
    elif origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                continue
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item,) = get_args(tp)
            return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            _, item = get_args(tp)
            return {k: _coerce(v, item, f"{path}.{k}") for k, v in value.items()}
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return from_dict(tp, value, path)
    elif tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{path}: got {value!r} ({type(value).__name__}); expected {_describe(tp)}")


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown, missing and mistyped keys by path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or '<root>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]!s}; allowed keys of {path or 'the config'}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required key {key} ({_describe(hints[name])})")
            continue
        if name in _SECTIONS and not path:
            kwargs[name] = _section(name, data[name])
        else:
            kwargs[name] = _coerce(data[name], hints[name], key)
    return cls(**kwargs)


def _section(kind: str, data: Any) -> Any:
    if not isinstance(data, dict) or "name" not in data:
        raise ConfigError(f"missing required key {kind}.name; one of: {', '.join(sorted(_SECTIONS[kind]))}")
    name = data["name"]
    if name not in _SECTIONS[kind]:
        raise ConfigError(f"{kind}.name: got {name!r}; expected one of: {', '.join(sorted(_SECTIONS[kind]))}")
    return from_dict(_SECTIONS[kind][name], data, kind)


def to_dict(cfg: Any) -> Any:
    """Plain-data form of a config (what `config.yaml` holds)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set `a.b.c=value` pairs (values parsed as YAML) into the raw config mapping."""
    for item in overrides:
        item = item.removeprefix("--")
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected --key.path=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}: {part} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return data


def _ensure_registered() -> None:
    import mmeff.encoders  # noqa: F401  (registers encoder sections)
    import mmeff.tasks  # noqa: F401  (registers task sections)


def parse(data: dict[str, Any]) -> RunConfig:
    """Validate a raw mapping into a RunConfig."""
    _ensure_registered()
    return from_dict(RunConfig, data)


def load(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config file, apply overrides and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse(apply_overrides(data, overrides or []))


def save(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
