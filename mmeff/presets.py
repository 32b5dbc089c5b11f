"""Named model presets (`mmeff models`): ready encoder + backbone sections that a config names with `preset: NAME`.

The config's own keys are laid over the preset's, so `preset: vit-s-gla` with `backbone: {depth: 6}` is a
6-layer ViT-S with GLA mixers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmeff.registry import Registry


@dataclass(frozen=True)
class Preset:
    """The config sections a preset fills (`encoder`, `backbone`)."""

    sections: dict[str, Any]


PRESETS: Registry[Preset] = Registry("preset")


def _vit(mixer: str, dim: int, heads: int, options: dict[str, Any]) -> Preset:
    """A ViT-style image classifier body: 224x224 RGB in 16x16 patches, 12 bidirectional layers."""
    encoder = {"name": "image", "image_size": 224, "patch_size": 16, "in_chans": 3, "pool": "cls"}
    backbone = {"dim": dim, "depth": 12, "pattern": [mixer], "causal": False, "ffn": "mlp",
                "mixers": {mixer: {"heads": heads, **options}}}
    return Preset({"encoder": encoder, "backbone": backbone})


def _lm(pattern: list[str], depth: int, mixers: dict[str, dict[str, Any]], ffn: str = "swiglu") -> Preset:
    """A causal LM body: width 1024, 2048-token context (byte tokenizer unless the config sets one)."""
    encoder = {"name": "text", "seq_len": 2048}
    backbone = {"dim": 1024, "depth": depth, "pattern": pattern, "causal": True, "ffn": ffn, "mixers": mixers}
    return Preset({"encoder": encoder, "backbone": backbone})


# Parameter counts with a 1000-class head (ViTs) and the byte tokenizer (LMs), as `build_model` makes them.
for _name, _summary, _preset in [
    ("vit-t-attn", "ViT-Ti, 5.7M parameters: 12 layers of softmax attention, width 192, 3 heads", _vit("attn", 192, 3, {"rope": False})),
    ("vit-s-attn", "ViT-S, 22.0M: 12 layers of softmax attention, width 384, 6 heads", _vit("attn", 384, 6, {"rope": False})),
    ("vit-s-gla", "ViT-S with gated linear attention, 22.1M: bidirectional scans, width 384, 6 heads", _vit("gla", 384, 6, {"scan": "bi"})),
    ("lm-150m-attn", "151M causal LM: 12 layers of softmax attention (RoPE), width 1024, 16 heads", _lm(["attn"], 12, {"attn": {"heads": 16}})),
    ("lm-150m-gla", "152M causal LM: 12 layers of gated linear attention, width 1024, 16 heads", _lm(["gla"], 12, {"gla": {"heads": 16}})),
    ("lm-150m-mamba2", "152M causal LM: 23 Mamba-2 layers without channel mixers (as Mamba-2 stacks them), width 1024",
     _lm(["mamba2"], 23, {}, ffn="none")),
    ("lm-150m-hybrid", "152M causal LM: 3 GLA layers per attention layer (12 layers), width 1024, 16 heads",
     _lm(["gla*3", "attn"], 12, {"gla": {"heads": 16}, "attn": {"heads": 16}})),
]:
    PRESETS.register(_name, summary=_summary)(_preset)
