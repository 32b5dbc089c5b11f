"""`from_pretrained` / `save_pretrained` on every mmeff model: huggingface_hub's `ModelHubMixin` on the mmeff folder.

The folder stays an mmeff checkpoint (config.yaml + model.safetensors + the tokenizer files), so what
`save_pretrained` writes, `mmeff.load`, `mmeff generate` and `mmeff serve` read, and the other way round.
The mixin adds the Hugging Face side: `from_pretrained("user/repo")` downloads a Hub repository of such a
folder (`snapshot_download`), `push_to_hub` uploads one. Its own config.json and model card are not written:
the run config is the model's description.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, TypeVar

from huggingface_hub import ModelHubMixin, snapshot_download
from safetensors.torch import save_model
from torch import nn

import mmeff
from mmeff import config as config_mod
from mmeff.config import RunConfig

T = TypeVar("T", bound="Model")
CONFIG, WEIGHTS = "config.yaml", "model.safetensors"


class Model(nn.Module, ModelHubMixin, library_name="mmeff", tags=["mmeff"]):
    """Base of the mmeff models (`Model(cfg: RunConfig)`): remembers its run config and saves / loads its folder."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Model:
        # The mixin would capture the __init__ arguments as a JSON config; the run config is kept as it is instead.
        instance = nn.Module.__new__(cls)
        cfg = kwargs.get("cfg", args[0] if args else None)
        object.__setattr__(instance, "_run_config", cfg if isinstance(cfg, RunConfig) else None)
        return instance

    @property
    def run_config(self) -> RunConfig:
        """The run config this model was built from."""
        if self._run_config is None:
            raise ValueError(f"{type(self).__name__} was not built from a RunConfig; save_pretrained needs one")
        return self._run_config

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        overwrite: bool = False,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        config: Any = None,
        model_card_kwargs: dict | None = None,
        **push_to_hub_kwargs: Any,
    ) -> str | None:
        """Write the checkpoint folder `save_directory` (atomically; an existing checkpoint only with `overwrite`).

        `push_to_hub` then uploads it to `repo_id` (default: the folder's name). `config` and `model_card_kwargs`
        are the mixin's arguments; the run config is the config here.
        """
        out = Path(save_directory)
        if (out / WEIGHTS).exists() and not overwrite:
            raise FileExistsError(f"{out} already holds a checkpoint; pass overwrite=True to replace it")
        write_folder(self, self.run_config, out, tokenizer_files(self.run_config))
        if push_to_hub:
            return self.push_to_hub(repo_id or out.name, **push_to_hub_kwargs)
        return None

    def _save_pretrained(self, save_directory: Path) -> None:
        # push_to_hub saves into a fresh temporary folder through this hook.
        write_folder(self, self.run_config, save_directory, tokenizer_files(self.run_config))

    @classmethod
    def from_pretrained(
        cls: type[T],
        pretrained_model_name_or_path: str | Path,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        force_download: bool = False,
        token: str | bool | None = None,
        local_files_only: bool = False,
        map_location: str = "cpu",
        **model_kwargs: Any,
    ) -> T:
        """The model of a checkpoint folder, or of a Hub repository holding one (downloaded); a `cls` instance."""
        if model_kwargs:
            raise TypeError(f"from_pretrained: unknown arguments {sorted(model_kwargs)}; the folder's config.yaml builds the model")
        path = Path(pretrained_model_name_or_path)
        if not path.is_dir():
            path = Path(
                snapshot_download(
                    str(pretrained_model_name_or_path), revision=revision, cache_dir=cache_dir,
                    force_download=force_download, token=token, local_files_only=local_files_only,
                )
            )
        model = mmeff.load(path, map_location=map_location)
        if not isinstance(model, cls):
            raise TypeError(f"{path} holds a {type(model).__name__} (task {model.run_config.task.name!r}), not a {cls.__name__}")
        return model


def tokenizer_files(cfg: RunConfig) -> dict[str, str]:
    """The tokenizer files a checkpoint of `cfg` carries (the text encoder's, or a captioner's caption tokenizer)."""
    from mmeff.encoders.text import TextEncoderConfig, tokenizer_files as files

    if isinstance(cfg.encoder, TextEncoderConfig):
        return files(cfg.encoder)
    if all(hasattr(cfg.task, key) for key in ("tokenizer", "tokenizer_path", "vocab_size")):  # a captioner's task
        return files(TextEncoderConfig(tokenizer=cfg.task.tokenizer, tokenizer_path=cfg.task.tokenizer_path, vocab_size=cfg.task.vocab_size))
    return {}


def write_folder(model: nn.Module, cfg: RunConfig, out: str | Path, extra: dict[str, str] | None = None) -> Path:
    """Write checkpoint folder `out` (config, weights, extra text files) in a temporary folder renamed into place."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    old = out.with_name(f".{out.name}.old")
    try:
        config_mod.save(cfg, tmp / CONFIG)
        save_model(model, str(tmp / WEIGHTS))
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.is_dir() and not out.exists():
            os.replace(old, out)
        raise
    return out
