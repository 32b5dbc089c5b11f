"""LoRA (Hu et al., 2021): low-rank adapters on chosen nn.Linear layers, merged into plain weights on export.

A run config's `lora:` block (`targets`, `rank`, `alpha`, `dropout`) wraps each matching nn.Linear in a
`LoraLinear`: the base weight stays fixed, `lora_A` [rank, in] and `lora_B` [out, rank] train, and the output is
`base(x) + (alpha / rank) * B A dropout(x)`. `B` starts at zero, so the wrapped model starts as the base one.
The trainable set is the adapters plus whatever the config's `train:` names (e.g. a new head); `freeze:` still applies.
`merged` folds the adapters back, giving a model and a config without `lora` that `mmeff.load` reads.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmeff.config import ConfigError, RunConfig, from_dict

ADAPTER_PATTERNS = ["*.lora_A", "*.lora_B"]  # the parameters a LoRA run trains (with `train:`)


@dataclass
class LoraConfig:
    """`targets`: module-name patterns (fnmatch, e.g. `backbone.layers.*.mixer.q`) of the nn.Linear layers to adapt."""

    targets: list[str] = field(default_factory=list)
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0


def parse_config(data: dict[str, Any] | LoraConfig) -> LoraConfig:
    """The typed, checked `lora:` block; errors name the key (`lora.rank`, ...)."""
    cfg = data if isinstance(data, LoraConfig) else from_dict(LoraConfig, data, "lora")
    if not cfg.targets:
        raise ConfigError("lora.targets: name at least one pattern of nn.Linear module names (e.g. 'backbone.layers.*.mixer.q')")
    if cfg.rank < 1:
        raise ConfigError(f"lora.rank: must be >= 1, got {cfg.rank}")
    if cfg.alpha <= 0:
        raise ConfigError(f"lora.alpha: must be > 0, got {cfg.alpha}")
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"lora.dropout: must be in [0, 1), got {cfg.dropout}")
    return cfg


class LoraLinear(nn.Module):
    """`base` (frozen) plus a trainable low-rank update scaled by alpha / rank."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scaling = alpha / rank
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (code that reads `.weight` of a Linear keeps working)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta(self) -> torch.Tensor:
        """The weight update [out, in] the adapter adds."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.drop(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def merge(self) -> nn.Linear:
        """A plain nn.Linear computing the same function (in eval mode)."""
        base = self.base
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            merged.weight.copy_(base.weight + self.delta().to(base.weight.dtype))
            if base.bias is not None:
                merged.bias.copy_(base.bias)
        return merged

    def extra_repr(self) -> str:
        return f"rank={self.lora_A.shape[0]}, scaling={self.scaling:g}"


@dataclass
class LoraReport:
    """What `apply` wrapped, and the parameter counts after it."""

    wrapped: list[str]
    adapter_params: int
    total_params: int

    def __str__(self) -> str:
        share = 100 * self.adapter_params / max(1, self.total_params)
        return (
            f"lora: {len(self.wrapped)} linear layers adapted, {self.adapter_params} adapter parameters "
            f"({share:.2f}% of {self.total_params})\n" + "\n".join(f"  lora {n}" for n in self.wrapped)
        )


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply(model: nn.Module, lora: dict[str, Any] | LoraConfig) -> LoraReport:
    """Wrap the nn.Linear layers of `model` matching `lora.targets` (in place); freeze everything but the adapters."""
    cfg = parse_config(lora)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoraLinear)}
    chosen: list[str] = []
    for pattern in cfg.targets:
        hits = [n for n in linears if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            shown = ", ".join(list(linears)[:8]) + (", ..." if len(linears) > 8 else "")
            raise ConfigError(f"lora.targets: pattern {pattern!r} matches no nn.Linear of the model; some are: {shown}")
        chosen += [n for n in hits if n not in chosen]
    shared = _shared_weights(model)
    for name in chosen:
        if id(linears[name].weight) in shared:
            raise ConfigError(
                f"lora.targets: {name} shares its weight with another module (tied embeddings); "
                "merging would untie them, so adapt other layers or untie the weights"
            )
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        _set(model, name, LoraLinear(linears[name], cfg.rank, cfg.alpha, cfg.dropout))
    adapters = sum(p.numel() for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B")))
    return LoraReport(chosen, adapters, sum(p.numel() for p in model.parameters()))


def _shared_weights(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def task_config(cfg: RunConfig) -> RunConfig:
    """The config the training task sees: with `lora`, `train` also names the adapters (so only they, and what
    `train` already named, are trained); unchanged without."""
    if not cfg.lora:
        return cfg
    return dataclasses.replace(cfg, train=[*ADAPTER_PATTERNS, *cfg.train])


def merged(model: nn.Module, cfg: RunConfig) -> tuple[nn.Module, RunConfig]:
    """(a copy of `model` with every LoraLinear folded into a plain nn.Linear, `cfg` without `lora`): what to export.
    Without adapters in the model both come back unchanged."""
    if not any(isinstance(m, LoraLinear) for m in model.modules()):
        return model, cfg
    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if isinstance(module, LoraLinear):
            _set(out, name, module.merge())
    train = [p for p in cfg.train if p not in ADAPTER_PATTERNS]
    return out, dataclasses.replace(cfg, lora={}, train=train)
