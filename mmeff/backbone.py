"""The shared layer stack: `x + mixer(norm(x))`, then `x + ffn(norm(x))`, one mixer per layer from a pattern."""

from __future__ import annotations

from typing import Callable

import torch
from timm.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmeff.blocks import Cache, Layout, Tokens, build
from mmeff.config import BackboneConfig, ConfigError, from_dict
from mmeff.ops.recompute import compiled_recomputing, recomputed, under_autocast_now


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
    """One pre-norm residual layer: a token mixer then a channel mixer (`checkpoint`: its activations, with "mixer"
    the token mixer's only, with "norm" the two pre-norms' outputs, recomputed in the backward instead of kept).

    It takes the residual stream x and the branch the layer before left `pending`, and hands on its own: x + pending
    is made together with the first norm of it (the norm's `added`: one kernel each way on the GPU), x + the mixer's
    branch with the second, so that no residual add runs on its own (the backbone's final norm adds the last branch)."""

    def __init__(
        self, mixer: nn.Module, ffn: nn.Module | None, norm: str, eps: float, dim: int, drop_path: float,
        checkpoint: bool | str = False,
    ) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self.norm1 = build(norm, dim, eps=eps)
        self.mixer = mixer
        self.norm2 = build(norm, dim, eps=eps) if ffn is not None else None
        self.ffn = ffn
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self, x: torch.Tensor, pending: torch.Tensor | None = None, cache: Cache | None = None,
        layout: Layout | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the stream up to this layer's last branch, that branch): their sum is the layer's output."""
        recompute = self.checkpoint in (True, "mixer") and cache is None and torch.is_grad_enabled()
        if recompute and self.checkpoint is True:
            # Inside the layer, so that an FSDP unit wrapping it gathers its weights around the recomputation too.
            return checkpoint(self._forward, x, pending, None, layout, use_reentrant=False)
        return self._forward(x, pending, cache, layout, recompute)

    def _forward(
        self, x: torch.Tensor, pending: torch.Tensor | None, cache: Cache | None, layout: Layout | None,
        mixer_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if mixer_only:
            x = x if pending is None else x + pending
            branch = checkpoint(self._mix, x, layout, use_reentrant=False)
        else:
            x, branch = self._normed(self.norm1, x, pending, lambda h: self.mixer(h, cache=cache, layout=layout))
        branch = self.drop_path(branch)
        if self.ffn is None:
            return x, branch
        x, branch = self._normed(self.norm2, x, branch, self.ffn)
        return x, self.drop_path(branch)

    def _normed(
        self, norm: nn.Module, x: torch.Tensor, pending: torch.Tensor | None, fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, fn(norm(s))) with s = x + pending; with checkpoint "norm" the saved norm(s) is made again from s in the
        backward (the norm keeps s for its own backward: one [tokens, dim] tensor less kept per norm)."""
        remade = self.checkpoint == "norm" and torch.is_grad_enabled()
        if remade and torch.compiler.is_compiling():
            # Inductor's partitioner keeps norm(s) for the projection's weight gradient unless the norm runs in a
            # selective-checkpoint region (it fuses the add either way).
            s = x if pending is None else x + pending
            return s, fn(compiled_recomputing(norm, s))
        s, h = (x, norm(x)) if pending is None else norm.added(x, pending)
        if not remade:
            return s, fn(h)
        with recomputed([(h, under_autocast_now(norm, s.device.type), (s,))]):
            return s, fn(h)

    def _mix(self, x: torch.Tensor, layout: Layout | None) -> torch.Tensor:
        return self.mixer(self.norm1(x), layout=layout)


class Backbone(nn.Module):
    """Tokens [B, T, D] -> hidden states [B, T, D] through the configured layers."""

    def __init__(self, cfg: BackboneConfig | dict) -> None:
        super().__init__()
        if isinstance(cfg, dict):  # Backbone({"dim": 64, "pattern": ["gla"]}): checked as the config's backbone section
            cfg = from_dict(BackboneConfig, cfg, "backbone")
        if not isinstance(cfg, BackboneConfig):
            raise ConfigError(f"Backbone takes a BackboneConfig or a dict of its keys, got {type(cfg).__name__}")
        self.cfg = cfg
        self.names = expand_pattern(cfg.pattern, cfg.depth)
        rates = torch.linspace(0, cfg.drop_path, len(self.names), device="cpu").tolist()  # also under a meta device
        self.layers = nn.ModuleList(
            Layer(self._mixer(name), self._ffn(i), cfg.norm, cfg.norm_eps, cfg.dim, rate, cfg.checkpoint)
            for i, (name, rate) in enumerate(zip(self.names, rates))
        )
        self.norm = build(cfg.norm, cfg.dim, eps=cfg.norm_eps) if cfg.final_norm else nn.Identity()

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
        self, x: torch.Tensor | Tokens, cache: list[Cache] | None = None, layout: Layout | None = None
    ) -> torch.Tensor:
        """Hidden states of tokens `x` ([B, T, D], or an encoder's `Tokens` with their layout); `layout` reaches every mixer."""
        if isinstance(x, Tokens):
            x, layout = x.x, layout or x.layout
        if x.dim() != 3 or x.shape[-1] != self.cfg.dim:
            raise ValueError(f"Backbone expects tokens [B, T, {self.cfg.dim}], got {tuple(x.shape)}")
        layout = layout or Layout()
        layout.check(x.shape[0], x.shape[1])
        pending = None
        for i, layer in enumerate(self.layers):
            x, pending = layer(x, pending, cache=cache[i] if cache is not None else None, layout=layout)
        if isinstance(self.norm, nn.Identity):
            return x + pending
        return self.norm.added(x, pending)[1]
