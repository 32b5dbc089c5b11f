"""Run configuration: one YAML file -> typed dataclasses, with dotted command-line overrides."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from mmeff.errors import ConfigError
from mmeff.presets import PRESETS
from mmeff.registry import Registry

# The sections whose dataclass depends on their `name` key. Each encoder and task module registers its config
# class (`@TASKS.register("lm")`); the tables name those modules so that validating a config imports only the
# encoder and task it names, after the plain sections are checked.
ENCODERS: Registry[type] = Registry(
    "encoder", {"image": "mmeff.encoders.image", "audio": "mmeff.encoders.audio", "text": "mmeff.encoders.text"}
)
TASKS: Registry[type] = Registry(
    "task",
    {
        "classify": "mmeff.tasks.classify",
        "lm": "mmeff.tasks.lm",
        "caption": "mmeff.tasks.caption",
        "diffusion": "mmeff.tasks.diffusion",
        "diffusion_caption": "mmeff.tasks.diffusion_caption",
    },
)
SECTIONS = {"encoder": ENCODERS, "task": TASKS}


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise a ConfigError naming `key`, the `value` given and what is `allowed`, unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}: got {value!r}; expected {allowed}")


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
    resampled: bool = False  # train: each rank and worker draws shards with replacement (any shard count), endless
    samples_per_epoch: int | None = None  # train samples per epoch over all ranks; None: the split's sample count

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "data.batch_size", self.batch_size, "an integer >= 1")
        require(self.eval_batch_size is None or self.eval_batch_size >= 1, "data.eval_batch_size", self.eval_batch_size,
                "null or an integer >= 1")
        require(self.num_workers >= 0, "data.num_workers", self.num_workers,
                "an integer >= 0 (0: load in the main process)")
        require(self.shuffle_buffer >= 0, "data.shuffle_buffer", self.shuffle_buffer, "an integer >= 0")
        require(self.samples_per_epoch is None or self.samples_per_epoch >= 1, "data.samples_per_epoch",
                self.samples_per_epoch, "null (the train split's sample count) or an integer >= 1")


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
    # Activation checkpointing: true recomputes each layer's activations in the backward instead of keeping them;
    # "mixer" only the token mixer's (the channel mixer's stay: less recomputation, most of the memory saved where
    # the mixer keeps more than attention, e.g. mamba2's expanded streams); "norm" only the two pre-norms' outputs
    # (no layer runs twice: each norm again where the backward reads its output; one [tokens, dim] tensor less each).
    # "norm" is the default: bit for bit the same gradients for one norm pass more per norm in the backward. On an H100
    # at 1,024 px (benchmarks/results/vision_speed_h100.md run 18, one process, timm 11.26 GiB) gated_deltanet-bi
    # peaked at 11.04 GiB with it and 12.08 without, at 0.591x and 0.596x timm's img/s; false keeps them.
    checkpoint: bool | Literal["mixer", "norm"] = "norm"

    def __post_init__(self) -> None:
        require(self.dim >= 1, "backbone.dim", self.dim, "an integer >= 1")
        require(self.depth is None or self.depth >= 1, "backbone.depth", self.depth,
                "null (the pattern as written) or an integer >= 1")
        require(bool(self.pattern), "backbone.pattern", self.pattern, "a non-empty list of token mixers, e.g. [attn]")
        require(0.0 <= self.drop_path < 1.0, "backbone.drop_path", self.drop_path, "a number in [0, 1)")
        require(self.norm_eps > 0 and math.isfinite(self.norm_eps), "backbone.norm_eps", self.norm_eps, "a number > 0")
        # The recomputation in the backward must route as the forward did; this balancing steps the routing bias in
        # every forward (mmeff.blocks.moe), so it would not.
        require(not (self.checkpoint is True and self.ffn == "moe" and self.ffn_options.get("bias_update_rate", 0) > 0),
                "backbone.checkpoint", self.checkpoint, "false, mixer or norm with backbone.ffn_options.bias_update_rate > 0 "
                "(the MoE routing bias moves in each forward, so a recomputed layer would route differently); or set "
                "bias_update_rate: 0")
        used = {item.partition("*")[0].strip() for item in self.pattern}
        for name in self.mixers:
            require(name in used, f"backbone.mixers.{name}", self.mixers[name],
                    f"options of a mixer in backbone.pattern ({', '.join(sorted(used))}); "
                    f"add {name} to the pattern or remove these options")


LOGGERS = ("auto", "csv", "tensorboard", "wandb", "none")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class FSDPConfig:
    """`trainer.strategy: fsdp`: FSDP2 (`fully_shard`, one unit per backbone layer) through Lightning's
    ModelParallelStrategy."""

    param_dtype: str | None = "bfloat16"  # dtype of the gathered parameters in forward/backward; null: as stored
    reduce_dtype: str | None = "float32"  # dtype of the gradient reduce-scatter; null: param_dtype
    cpu_offload: bool = False  # keep the sharded parameters, gradients and optimizer state in CPU memory
    reshard_after_forward: bool = True  # free each layer's gathered parameters after its forward (ZeRO-3)
    sharded_checkpoint: bool = True  # one file per rank (resumable on any rank count); false: one file on rank 0

    def __post_init__(self) -> None:
        for key in ("param_dtype", "reduce_dtype"):
            value = getattr(self, key)
            require(value is None or value in DTYPES, f"trainer.fsdp.{key}", value, f"null or one of {', '.join(DTYPES)}")


@dataclass
class TrainerConfig:
    """Options passed to `lightning.Trainer` (plus `kwargs` for any other Trainer argument)."""

    max_epochs: int | None = 10
    max_steps: int = -1
    precision: str = "32-true"
    accelerator: str = "auto"
    devices: Union[int, str, list[int]] = 1  # per node
    num_nodes: int = 1  # machines; torchrun or SLURM starts devices x num_nodes processes (README: Scaling out)
    strategy: str = "auto"  # auto | ddp | fsdp (mmeff's FSDP2 plan, `fsdp` options) | any Lightning strategy name
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    check_val_every_n_epoch: int | None = 1  # None: validate by `kwargs.val_check_interval` steps only
    num_sanity_val_steps: int = 0
    enable_progress_bar: bool = True
    logger: str = "auto"  # auto | csv | tensorboard | wandb (offline) | none | a Logger class path
    save_top_k: int = 1
    monitor: str = "val/loss"
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss stops the run, or its optimizer step is skipped
    # torch.compile the model (in place: checkpoints keep the plain parameter names); true: torch.compile's default
    # mode, or a mode by name (reduce-overhead: Inductor's CUDA graphs besides)
    compile: bool | Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = False
    cuda_graphs: bool = False  # classify, lm with task.documents joined: training forward + backward as CUDA graphs (one GPU)
    checkpoint_every_n_steps: int | None = None  # also rewrite last.ckpt every n optimizer steps (mid-epoch resume)
    async_checkpoint: bool = True  # one process: checkpoints written by a background thread from a host copy
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)  # options of strategy: fsdp
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(self.max_epochs is None or self.max_epochs >= 1, "trainer.max_epochs", self.max_epochs,
                "null or an integer >= 1 (max_steps: 0 exports the initial weights)")
        require(self.max_steps >= -1, "trainer.max_steps", self.max_steps, "-1 (no limit) or an integer >= 0")
        require(self.num_nodes >= 1, "trainer.num_nodes", self.num_nodes, "an integer >= 1")
        require(self.accumulate_grad_batches >= 1, "trainer.accumulate_grad_batches", self.accumulate_grad_batches,
                "an integer >= 1")
        require(self.log_every_n_steps >= 1, "trainer.log_every_n_steps", self.log_every_n_steps, "an integer >= 1")
        require(self.gradient_clip_val is None or self.gradient_clip_val > 0 and math.isfinite(self.gradient_clip_val),
                "trainer.gradient_clip_val", self.gradient_clip_val, "null or a number > 0")
        if self.cuda_graphs:
            require(self.accumulate_grad_batches == 1, "trainer.accumulate_grad_batches", self.accumulate_grad_batches,
                    "1 with trainer.cuda_graphs (a replay rewrites the gradients the last one left)")
            one = self.devices in (1, "1", "auto") or isinstance(self.devices, list) and len(self.devices) == 1
            require(self.strategy == "auto" and self.num_nodes == 1 and one,
                    "trainer.strategy", f"{self.strategy} on {self.devices} device(s) x {self.num_nodes} node(s)",
                    "one device (strategy auto, devices 1, num_nodes 1) with trainer.cuda_graphs")
            require(not self.compile, "trainer.compile", self.compile,
                    "false with trainer.cuda_graphs (compiled CUDA graphs: trainer.compile: reduce-overhead)")
        require(self.checkpoint_every_n_steps is None or self.checkpoint_every_n_steps >= 1,
                "trainer.checkpoint_every_n_steps", self.checkpoint_every_n_steps, "null or an integer >= 1")
        require(self.logger in LOGGERS or "." in self.logger.strip(".") and " " not in self.logger, "trainer.logger",
                self.logger, f"{' | '.join(LOGGERS)} or a Logger class path (lightning.pytorch.loggers.CSVLogger)")


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
    fused: bool | None = None  # true: AdamW's fused kernel (one launch a step); null: torch's default (foreach on CUDA)

    def __post_init__(self) -> None:
        require(self.lr >= 0 and math.isfinite(self.lr), "optim.lr", self.lr, "a finite number >= 0")
        require(self.weight_decay >= 0 and math.isfinite(self.weight_decay), "optim.weight_decay", self.weight_decay,
                "a finite number >= 0")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas", self.betas,
                "two numbers in [0, 1), e.g. [0.9, 0.999]")
        require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "an integer >= 0")
        require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        for pattern, mult in self.groups.items():
            require(mult >= 0 and math.isfinite(mult), f"optim.groups.{pattern}", mult, "a finite lr multiplier >= 0")


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
            key_type, item = get_args(tp)
            for k in value:
                if key_type is str and not isinstance(k, str):
                    raise ConfigError(f"{path}: key {k!r} ({type(k).__name__}) is not a name; expected text keys")
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
    unknown = sorted(map(str, set(data) - set(fields)))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]!s}; allowed keys of {path or 'the config'}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    # The encoder and task sections come last: their classes live in modules that import torch.
    for name, f in sorted(fields.items(), key=lambda item: not path and item[0] in SECTIONS):
        key = f"{path}.{name}" if path else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required key {key} ({_describe(hints[name])})")
            continue
        if name in SECTIONS and not path:
            kwargs[name] = _section(name, data[name])
        else:
            kwargs[name] = _coerce(data[name], hints[name], key)
    return cls(**kwargs)


def _section(kind: str, data: Any) -> Any:
    known = SECTIONS[kind].names()
    if not isinstance(data, dict) or "name" not in data:
        raise ConfigError(f"missing required key {kind}.name; one of: {', '.join(known)}")
    name = data["name"]
    if not isinstance(name, str) or name not in SECTIONS[kind]:
        raise ConfigError(f"{kind}.name: got {name!r}; expected one of: {', '.join(known)}")
    return from_dict(SECTIONS[kind].get(name), data, kind)


def to_dict(cfg: Any) -> Any:
    """Plain-data form of a config (what `config.yaml` holds)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader (no Python objects), also reading YAML 1.2 floats such as `1e-3` as floats.

    PyYAML follows YAML 1.1, where a float needs a dot (`1.0e-3`), so `lr: 3e-4` would be the string '3e-4'.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """Parse YAML text safely (no Python objects), with YAML 1.2 floats like `1e-3`."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set `a.b.c=value` pairs (values parsed as YAML) into the raw config mapping."""
    for item in overrides:
        item = item.removeprefix("--")
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected --key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            why = str(e).splitlines()[0]
            raise ConfigError(f"override --{key}: the value {raw!r} is not valid YAML ({why})") from None
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` laid on `base`: mappings merge key by key, any other value of `over` replaces."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse(data: dict[str, Any]) -> RunConfig:
    """Validate a raw mapping into a RunConfig (a `preset:` key first fills the sections it names)."""
    if isinstance(data, dict) and "preset" in data:
        data = dict(data)
        name = data.pop("preset")
        if not isinstance(name, str) or name not in PRESETS:
            raise ConfigError(f"preset: got {name!r}; expected one of: {', '.join(PRESETS.names())} (mmeff models)")
        data = merge(PRESETS.get(name).sections, data)
    return from_dict(RunConfig, data)


def read(path: str | Path) -> dict[str, Any]:
    """The raw mapping of one YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        got = f"{type(data).__name__} {data!r:.60}"
        raise ConfigError(f"{path}: expected a mapping of sections (data, encoder, backbone, ...), got {got}")
    return data


def load(paths: str | Path | list[str | Path], overrides: list[str] | None = None) -> RunConfig:
    """Read YAML config file(s), later files laid over earlier ones, apply overrides and validate."""
    data: dict[str, Any] = {}
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        data = merge(data, read(path))
    return parse(apply_overrides(data, overrides or []))


def save(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
