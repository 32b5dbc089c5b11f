"""The shared layer stack: `x + mixer(norm(x))`, then `x + ffn(norm(x))`, one mixer per layer from a pattern."""

from __future__ import annotations

import inspect
import logging

import torch
from timm.layers import DropPath
from torch import nn

from mmeff.blocks import Cache, build
from mmeff.config import BackboneConfig, ConfigError

log = logging.getLogger("mmeff")

# Per-batch context a mixer may take as a keyword: `docs` [B, T] document index per token (packed
# documents stay apart); `prefix` (int) leading tokens that see each other both ways (prefix LM).
CONTEXT = ("docs", "prefix")


def expand_pattern(pattern: list[str], depth: int | None = None) -> list[str]:
    """Expand items like 'gla*3' and cycle the result to `depth` layers."""
    layers: list[str] = []
    for item in pattern:
        name, _, times = item.partition("*")
        try:
            count = int(times) if times else 1
        except ValueError:
            raise ConfigError(f"backbone.pattern: bad item {item!r}; expected NAME or NAME*COUNT") from None
        layers += [name.strip()] * count
    if not layers:
        raise ConfigError("backbone.pattern: empty; name at least one token mixer")
    if depth is not None:
        layers = [layers[i % len(layers)] for i in range(depth)]
    return layers


class Layer(nn.Module):
    """One pre-norm residual layer: a token mixer then a channel mixer."""

    def __init__(self, mixer: nn.Module, ffn: nn.Module | None, norm: str, eps: float, dim: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = build(norm, dim, eps=eps)
        self.mixer = mixer
        self.norm2 = build(norm, dim, eps=eps) if ffn is not None else None
        self.ffn = ffn
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.takes = set(inspect.signature(mixer.forward).parameters) & set(CONTEXT)

    def forward(self, x: torch.Tensor, cache: Cache | None = None, **context: object) -> torch.Tensor:
        extra = {k: v for k, v in context.items() if v is not None and k in self.takes}
        x = x + self.drop_path(self.mixer(self.norm1(x), cache=cache, **extra))
        if self.ffn is not None:
            x = x + self.drop_path(self.ffn(self.norm2(x)))
        return x


class Backbone(nn.Module):
    """Tokens [B, T, D] -> hidden states [B, T, D] through the configured layers."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.names = expand_pattern(cfg.pattern, cfg.depth)
        rates = torch.linspace(0, cfg.drop_path, len(self.names)).tolist()
        self.layers = nn.ModuleList(
            Layer(self._mixer(name), self._ffn(i), cfg.norm, cfg.norm_eps, cfg.dim, rate)
            for i, (name, rate) in enumerate(zip(self.names, rates))
        )
        self.norm = build(cfg.norm, cfg.dim, eps=cfg.norm_eps) if cfg.final_norm else nn.Identity()
        self._told_docs = False

    def _mixer(self, name: str) -> nn.Module:
        options = dict(self.cfg.mixers.get(name, {}))
        kind = options.pop("type", name)  # an alias in `mixers` may name its block type
        options.setdefault("causal", self.cfg.causal)
        return build(kind, self.cfg.dim, where=f"backbone.mixers.{name}", **options)

    def _ffn(self, index: int) -> nn.Module | None:
        if self.cfg.ffn == "none":
            return None
        options = dict(self.cfg.ffn_options)
        if self.cfg.ffn == "moe" and "layers" in options:  # MoE on the listed layers only, `dense` elsewhere
            layers, dense = options.pop("layers"), options.pop("dense", "swiglu")
            dense_options = options.pop("dense_options", {})
            if not isinstance(layers, list) or not all(isinstance(i, int) and 0 <= i < len(self.names) for i in layers):
                raise ConfigError(
                    f"backbone.ffn_options.layers: expected layer indices in [0, {len(self.names)}), got {layers!r}"
                )
            if index not in layers:
                return build(dense, self.cfg.dim, where="backbone.ffn_options.dense_options", **dense_options)
        return build(self.cfg.ffn, self.cfg.dim, where="backbone.ffn_options", **options)

    def new_cache(self) -> list[Cache]:
        """An empty decoding cache, one entry per layer."""
        return [Cache() for _ in self.layers]

    def forward(
        self, x: torch.Tensor, cache: list[Cache] | None = None, docs: torch.Tensor | None = None, prefix: int | None = None
    ) -> torch.Tensor:
        """Hidden states of tokens `x`; `docs` and `prefix` (see CONTEXT) reach the mixers that take them."""
        if x.dim() != 3 or x.shape[-1] != self.cfg.dim:
            raise ValueError(f"Backbone expects tokens [B, T, {self.cfg.dim}], got {tuple(x.shape)}")
        if docs is not None and docs.shape != x.shape[:2]:
            raise ValueError(f"docs must be [B, T] = {tuple(x.shape[:2])}, got {tuple(docs.shape)}")
        if docs is not None and not self._told_docs:
            leaky = sorted({n for n, layer in zip(self.names, self.layers) if "docs" not in layer.takes})
            if leaky:
                log.info("document boundaries are not kept by mixers %s (they see packed documents as one)", leaky)
            self._told_docs = True
        for i, layer in enumerate(self.layers):
            x = layer(x, cache=cache[i] if cache is not None else None, docs=docs, prefix=prefix)
        return self.norm(x)
