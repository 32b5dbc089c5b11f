"""Softmax attention through `scaled_dot_product_attention`, with MQA/GQA, RoPE and a KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmeff.blocks.cache import Cache
from mmeff.blocks.registry import register
from mmeff.ops.rope import apply_rope, rope_angles


@register("attn")
class Attention(nn.Module):
    """Multi-head softmax attention (Vaswani et al., 2017) with GQA/MQA `kv_heads` (Ainslie et al., 2023)."""

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        kv_heads: int | None = None,
        causal: bool = True,
        rope: bool = True,
        rope_base: float = 10000.0,
        qk_norm: bool = False,
        bias: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        kv_heads = kv_heads or heads
        if dim % heads or heads % kv_heads:
            raise ValueError(f"dim={dim} must divide by heads={heads}, and heads by kv_heads={kv_heads}")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.causal, self.rope, self.rope_base, self.dropout = causal, rope, rope_base, dropout
        self.q = nn.Linear(dim, dim, bias=bias)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q(x).view(B, T, self.heads, self.head_dim))
        k, v = self.kv(x).view(B, T, 2, self.kv_heads, self.head_dim).unbind(2)
        k = self.k_norm(k)
        offset = cache.offset if cache is not None else 0
        if self.rope:
            cos, sin = rope_angles(torch.arange(offset, offset + T, device=x.device), self.head_dim, self.rope_base)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
            cache.offset += T
        mask, is_causal = None, self.causal
        if self.causal and offset > 0:
            # Queries sit at the end of the key sequence; SDPA's is_causal aligns them to its start.
            is_causal = False
            if T > 1:
                qpos = torch.arange(offset, offset + T, device=x.device)
                mask = torch.arange(k.shape[2], device=x.device)[None, :] <= qpos[:, None]
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.kv_heads != self.heads,
        )
        return self.out(o.transpose(1, 2).reshape(B, T, -1))
