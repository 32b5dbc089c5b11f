"""Checkpoint folders: `config.yaml` + `model.safetensors`, written atomically, loaded without pickle."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from mmeff import config as config_mod
from mmeff.config import ConfigError, RunConfig
from mmeff.encoders.text import TOKENIZER_FILE, TextEncoderConfig, Tokenizer, load_tokenizer
from mmeff.errors import CheckpointError
from mmeff.hub import CONFIG, WEIGHTS, write_folder
from mmeff.tasks import build_model

log = logging.getLogger("mmeff")


def export(model: nn.Module, cfg: RunConfig, out: str | Path, extra: dict[str, str] | None = None) -> Path:
    """Write `out/` (config + weights + optional extra text files) via a temp folder and a rename (`mmeff.hub.write_folder`).

    Leftovers of an interrupted export (`.<out>.old`, `.<out>.<random>` folders) are recovered or removed first.
    """
    recover(out)
    return write_folder(model, cfg, out, extra)


def recover(out: str | Path) -> Path | None:
    """Undo what a killed `export(out)` left: restore `.<out>.old` if `out` is gone, delete temp folders.

    Returns `out` when it then holds a complete checkpoint folder, else None.
    """
    out = Path(out)
    old = out.with_name(f".{out.name}.old")
    if old.is_dir() and not out.exists() and _complete(old):
        os.replace(old, out)  # killed between the two renames of export(): the previous export comes back
        log.warning("restored the export %s that an interrupted export had moved aside", out)
    for leftover in out.parent.glob(f".{out.name}.*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
    return out if _complete(out) else None


def _complete(path: Path) -> bool:
    return all((path / name).is_file() for name in (CONFIG, WEIGHTS))


def _check(path: Path) -> None:
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            old = path.with_name(f".{path.name}.old")
            hint = f" (an interrupted export left {old}; the next export restores it)" if old.is_dir() else ""
            raise FileNotFoundError(f"{path} is not an mmeff checkpoint folder: {name} is missing{hint}")


def load_config(path: str | Path) -> RunConfig:
    """The run config stored in checkpoint folder `path`."""
    path = Path(path)
    _check(path)
    file = path / CONFIG
    try:
        data = config_mod.yaml_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not a plain YAML config ({str(e).splitlines()[0]})") from None
    try:
        return config_mod.parse(data)
    except ConfigError as e:
        raise CheckpointError(f"{file}: {e}") from None


def read_weights(file: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` file; a file of another format or a truncated one names itself."""
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def load(path: str | Path, map_location: str = "cpu") -> nn.Module:
    """Rebuild the model of checkpoint folder `path` and load its weights (no unpickling)."""
    path = Path(path)
    model = build_model(load_config(path))
    file = path / WEIGHTS
    state = read_weights(file)
    own = model.state_dict()
    tied = _tied_names(model)
    missing = sorted(k for k in own if k not in state and not tied.get(k, set()) & state.keys())
    unexpected = sorted(k for k in state if k not in own)
    wrong = [f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} for the config"
             for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"shapes differ: {'; '.join(wrong[:3])}"] if wrong else []
        parts += [f"missing {missing[:5]}"] if missing else []
        parts += [f"unexpected {unexpected[:5]}"] if unexpected else []
        raise CheckpointError(f"{file}: the weights do not match {path / CONFIG}'s model; {', '.join(parts)}")
    model.load_state_dict({k: v.to(map_location) for k, v in state.items()}, strict=False)
    return model.eval()


def load_lm(path: str | Path) -> tuple[nn.Module, Tokenizer]:
    """The model of text LM checkpoint folder `path` and its tokenizer (the folder's tokenizer.json, else the
    config's); any other checkpoint is refused, naming what it is and how to sample it."""
    path = Path(path)
    cfg = load_config(path)
    if cfg.task.name in ("diffusion", "diffusion_caption"):  # a bidirectional backbone cannot decode left to right
        raise ConfigError(f"{path}: task {cfg.task.name!r} is a masked diffusion model; sample it with mmeff generate --sampler diffusion")
    if cfg.task.name == "caption":
        raise ConfigError(f"{path}: task 'caption' is a captioner; caption a file with mmeff generate {path} --{cfg.encoder.name} FILE")
    if not isinstance(cfg.encoder, TextEncoderConfig) or cfg.task.name != "lm":
        raise ConfigError(f"{path}: task {cfg.task.name!r} with encoder {cfg.encoder.name!r} is not a language model; "
                          "generation and chat need a text LM checkpoint (task.name: lm)")
    tokenizer = load_tokenizer(path if (path / TOKENIZER_FILE).is_file() else cfg.encoder)
    return load(path), tokenizer


def _tied_names(model: nn.Module) -> dict[str, set[str]]:
    """For each state name, the other names sharing its storage (tied weights, e.g. the LM head and embedding)."""
    groups: dict[tuple[int, int], set[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault((t.untyped_storage().data_ptr(), t.storage_offset()), set()).add(name)
    return {name: group - {name} for group in groups.values() for name in group if len(group) > 1}


@dataclass
class InitReport:
    """What `init_from` did: tensors loaded (`resized`: vocabulary tensors of which only the shared rows loaded),
    left new, and skipped with the reason."""

    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    resized: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        resized = f" ({len(self.resized)} of them vocabulary rows only)" if self.resized else ""
        lines = [f"init_from: {len(self.loaded)} tensors loaded{resized}, {len(self.new)} new, {len(self.skipped)} skipped"]
        lines += [f"  resized {k}: {what}" for k, what in self.resized.items()]
        lines += [f"  skipped {k}: {why}" for k, why in self.skipped.items()]
        lines += [f"  new {k}" for k in self.new[:20]] + ([f"  ... {len(self.new) - 20} more new"] if len(self.new) > 20 else [])
        return "\n".join(lines)


def vocab_tensors(model: nn.Module) -> set[str]:
    """Names of the tensors with one row per token id: embedding tables and the output `head`."""
    names = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    return names | ({"head.weight"} if isinstance(getattr(model, "head", None), nn.Linear) else set())


def init_from(model: nn.Module, path: str | Path) -> InitReport:
    """Load the tensors of checkpoint `path` whose names and shapes match `model`; report the rest.

    A vocabulary tensor (`vocab_tensors`) whose row count differs (e.g. a diffusion LM's added <mask> id) loads the
    rows both have; the other rows keep their fresh initialisation.
    """
    path = Path(path)
    _check(path)
    src = read_weights(path / WEIGHTS)
    own = model.state_dict()
    vocab = vocab_tensors(model)
    report = InitReport()
    take = {}
    for name, t in src.items():
        if name not in own:
            report.skipped[name] = "not in the new model"
        elif name in vocab and own[name].dim() == t.dim() and own[name].shape[1:] == t.shape[1:]:
            rows, have = min(len(t), len(own[name])), len(own[name])
            take[name] = t if len(t) == have else torch.cat([t[:rows], own[name][rows:].to(t.dtype)])
            report.loaded.append(name)
            if len(t) != have:
                report.resized[name] = f"rows 0-{rows - 1} loaded; the checkpoint has {len(t)} token ids, the new model {have}"
        elif own[name].shape != t.shape:
            report.skipped[name] = f"shape {tuple(t.shape)} in the checkpoint, {tuple(own[name].shape)} in the new model"
        else:
            take[name] = t
            report.loaded.append(name)
    tied = _tied_names(model)
    report.loaded += [k for k in own if k not in take and tied.get(k, set()) & take.keys()]  # loaded through its tie
    report.new = [k for k in own if k not in take and k not in report.loaded]
    model.load_state_dict(take, strict=False)
    return report
