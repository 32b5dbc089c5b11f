"""Intra-layer hybrid token mixer: attention heads and SSM (or linear-attention) heads side by side."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmeff.blocks.attention import Attention
from mmeff.blocks.cache import Cache
from mmeff.blocks.layout import Layout
from mmeff.blocks.registry import build, register


@register("hybrid_heads")
class HybridHeads(nn.Module):
    """Hybrid-head mixer (Dong et al., 2024 'Hymba: A Hybrid-head Architecture for Small Language Models').

    The same input feeds attention heads and an SSM/linear mixer (`ssm`: any registered scanned
    mixer, default mamba2) in parallel; each output is RMS-normalised with a learned per-channel
    scale (Hymba's beta), the two are averaged and projected: out(mean(b1 norm(attn), b2 norm(ssm))).
    The attention heads go straight into that shared projection. Scan options (scan, order) are
    passed to the SSM branch; `attn_options` / `ssm_options` reach each branch; the layout reaches both.
    With a cache, cache["attn"] and cache["ssm"] hold the two branches' caches.
    """

    def __init__(
        self,
        dim: int,
        *,
        causal: bool = True,
        heads: int = 4,
        kv_heads: int | None = None,
        rope: bool = True,
        ssm: str = "mamba2",
        ssm_options: dict[str, Any] | None = None,
        attn_options: dict[str, Any] | None = None,
        scan: str | None = None,
        order: str = "raster",
    ) -> None:
        super().__init__()
        self.attn = Attention(dim, heads=heads, kv_heads=kv_heads, causal=causal, rope=rope, **(attn_options or {}))
        self.attn.out = nn.Identity()  # heads are merged by the shared projection below
        scan_options = {k: v for k, v in {"scan": scan, "order": order if order != "raster" else None}.items() if v is not None}
        self.ssm = build(ssm, dim, where="hybrid_heads.ssm_options", causal=causal, **{**scan_options, **(ssm_options or {})})
        self.attn_norm = nn.RMSNorm(dim, eps=1e-6)
        self.ssm_norm = nn.RMSNorm(dim, eps=1e-6)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cache: Cache | None = None, layout: Layout | None = None) -> torch.Tensor:
        attn_cache = ssm_cache = None
        if cache is not None:
            attn_cache, ssm_cache = cache.setdefault("attn", Cache()), cache.setdefault("ssm", Cache())
            cache.offset += x.shape[1]
        a = self.attn_norm(self.attn(x, attn_cache, layout))
        s = self.ssm_norm(self.ssm(x, ssm_cache, layout))
        return self.out(0.5 * (a + s))
