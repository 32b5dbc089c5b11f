"""Efficient full attention: a latent KV cache (mla), routed heads (moh), int8 scores (quant_attn).

Each changes one step of the shared softmax-attention path (mmeff/blocks/attention.py): the
projection and cache (mla), the head merge (moh), or the scores (quant_attn).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmeff.blocks.attention import Attention, SoftmaxAttention
from mmeff.blocks.cache import Cache
from mmeff.blocks.layout import Layout
from mmeff.blocks.registry import register
from mmeff.ops import flex
from mmeff.ops.rope import Positions
from mmeff.ops.routing import router_scores, switch_aux_loss, topk_route
from mmeff.ops.varlen import per_document


@register("mla")
class LatentAttention(SoftmaxAttention):
    """Multi-head latent attention (DeepSeek-AI, 2024 'DeepSeek-V2'): keys and values up-projected from one cached low-rank latent, plus a decoupled RoPE key.

    Per token the cache holds only the normalised latent c_kv (`kv_rank`) and the shared rotated key
    (`rope_dim`): (kv_rank + rope_dim) numbers against 2 * dim for `attn`. Training and prefill
    expand the latent into per-head keys/values; decoding from a cache attends in latent space, the
    key up-projection absorbed into the queries and the value up-projection applied after.
    `q_rank` adds DeepSeek's low-rank query compression. Defaults: kv_rank dim / 4, rope_dim
    head_dim / 2 (0 without RoPE).
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int = 4,
        kv_rank: int | None = None,
        q_rank: int | None = None,
        rope_dim: int | None = None,
        causal: bool = True,
        rope: bool = True,
        rope_base: float = 10000.0,
        bias: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(dim, heads, None, causal, rope, rope_base, dropout, bias)
        self.kv_rank = kv_rank or max(1, dim // 4)
        self.rope_dim = (self.head_dim // 2 if rope else 0) if rope_dim is None else rope_dim
        if rope and (self.rope_dim < 2 or self.rope_dim % 2):
            raise ValueError(f"rope_dim must be even and >= 2 with rope, got {self.rope_dim}")
        qk_dim = self.head_dim + self.rope_dim
        self.q = (
            nn.Linear(dim, heads * qk_dim, bias=bias)
            if q_rank is None
            else nn.Sequential(nn.Linear(dim, q_rank, bias=bias), nn.RMSNorm(q_rank), nn.Linear(q_rank, heads * qk_dim, bias=False))
        )
        self.kv_down = nn.Linear(dim, self.kv_rank + self.rope_dim, bias=bias)
        self.kv_norm = nn.RMSNorm(self.kv_rank)
        # no bias: the key/value up-projection must fold into the queries and outputs when decoding
        self.kv_up = nn.Linear(self.kv_rank, heads * 2 * self.head_dim, bias=False)

    def project(self, x: Tensor, pos: Positions) -> tuple[Tensor, dict[str, Tensor]]:
        B, T, _ = x.shape
        q_nope, q_rope = self.q(x).view(B, T, self.heads, -1).split([self.head_dim, self.rope_dim], -1)
        latent, k_rope = self.kv_down(x).split([self.kv_rank, self.rope_dim], -1)
        q_rope, k_rope = self.rotate(pos, q_rope, k_rope.unsqueeze(2))
        q = torch.cat([q_nope, q_rope], -1).transpose(1, 2)
        return q, {"latent": self.kv_norm(latent).unsqueeze(1), "k_rope": k_rope.transpose(1, 2)}

    def attend(
        self, q: Tensor, kv: dict[str, Tensor], offset: int, kv_pos: Tensor | None, layout: Layout, cache: Cache | None
    ) -> Tensor:
        latent, k_rope = kv["latent"], kv["k_rope"]  # [B, 1, S, kv_rank], [B, 1, S, rope_dim]
        mask = self.mask(offset + q.shape[2], q.device)
        up = self.kv_up.weight.view(self.heads, 2 * self.head_dim, self.kv_rank)
        up_k, up_v = up.split(self.head_dim, 1)  # [H, head_dim, kv_rank] each
        if kv_pos is None:
            k_nope, v = torch.einsum("bsr,hdr->bhsd", latent[:, 0], up).split(self.head_dim, -1)
            k = torch.cat([k_nope, k_rope.expand(-1, self.heads, -1, -1)], -1)
            return self.attention(q, k, v, offset, kv_pos, mask, layout)
        q_nope, q_rope = q.split([self.head_dim, self.rope_dim], -1)
        q_latent = torch.cat([torch.einsum("bhtd,hdr->bhtr", q_nope, up_k), q_rope], -1)
        o = self.attention(q_latent, torch.cat([latent, k_rope], -1), latent, offset, kv_pos, mask, layout, scale=q.shape[-1] ** -0.5)
        return torch.einsum("bhtr,hdr->bhtd", o, up_v)


@register("moh")
class MixtureOfHeads(Attention):
    """Mixture-of-head attention (Jin et al., 2024 'MoH'): per token a router weights `shared_heads` always-on heads and activates the top `active_heads` of the others.

    Head outputs are summed with gates: alpha_1 * softmax(W_s x) on the shared heads and
    alpha_2 * softmax(W_r x) on the chosen routed heads (0 elsewhere), [alpha_1, alpha_2] =
    softmax(W_h x); `balance` weighs the Switch load-balancing loss over routed heads (left in
    `aux_loss`). Every head is computed (dense), then gated.
    """

    def __init__(
        self, dim: int, *, shared_heads: int = 1, active_heads: int = 2, balance: float = 0.01, causal: bool = True, **options: Any
    ) -> None:
        super().__init__(dim, causal=causal, **options)
        routed = self.heads - shared_heads
        if not (0 <= shared_heads < self.heads and 1 <= active_heads <= routed):
            raise ValueError(f"need 0 <= shared_heads < heads={self.heads} and 1 <= active_heads <= heads - shared_heads")
        self.shared_heads, self.active_heads, self.balance = shared_heads, active_heads, balance
        self.shared_router = nn.Linear(dim, shared_heads, bias=False)
        self.router = nn.Linear(dim, routed, bias=False)
        self.mix = nn.Linear(dim, 2, bias=False)
        self.aux_loss: Tensor | None = None

    def gates(self, x: Tensor) -> Tensor:
        """Per-token head gates [B, T, H]; sets `aux_loss` while training."""
        flat = x.reshape(-1, x.shape[-1])
        alpha = router_scores(self.mix(flat))
        scores = router_scores(self.router(flat))
        weights, chosen = topk_route(scores, self.active_heads, renormalize=False)
        routed = torch.zeros_like(scores).scatter(-1, chosen, weights) * alpha[:, 1:]
        shared = router_scores(self.shared_router(flat)) * alpha[:, :1]
        self.aux_loss = self.balance * switch_aux_loss(scores, chosen) if self.training and self.balance > 0 else None
        return torch.cat([shared, routed], -1).view(*x.shape[:2], self.heads)

    def merge(self, o: Tensor, x: Tensor) -> Tensor:
        return super().merge(o * self.gates(x).transpose(1, 2).unsqueeze(-1).to(o.dtype), x)


def fake_int8(x: Tensor, block: int) -> Tensor:
    """`x` [B, H, T, D] rounded to int8 with one scale per `block` tokens (per batch and head), returned dequantised.

    round(x / s) * s with s = max|x| / 127 over the block, computed in fp32: a product of two such
    tensors is the int8 x int8 -> int32 product times the two scales. Gradients pass straight through.
    """
    T = x.shape[2]
    n = flex.block_count(T, block)
    blocks = F.pad(x.float(), (0, 0, 0, n * block - T)).unflatten(2, (n, block))
    scale = blocks.detach().abs().amax(dim=(3, 4), keepdim=True).clamp_min(1e-12) / 127
    rounded = ((blocks / scale).round().clamp(-127, 127) * scale).flatten(2, 3)[:, :, :T].to(x.dtype)
    return x + (rounded - x).detach()


def sage_inputs(
    q: Tensor, k: Tensor, v: Tensor, q_block: int = 128, k_block: int = 64, smooth_k: bool = True, v_dtype: str = "bf16"
) -> tuple[Tensor, Tensor, Tensor]:
    """SageAttention's view of q, k, v [B, H, T, D]: K minus its mean over tokens, Q and K through per-block int8, V rounded to `v_dtype`."""
    if smooth_k:
        k = k - k.mean(dim=2, keepdim=True)
    if v_dtype == "bf16":
        v = v + (v.to(torch.bfloat16).to(v.dtype) - v).detach()
    return fake_int8(q, q_block), fake_int8(k, k_block), v


@register("quant_attn")
class QuantAttention(Attention):
    """8-bit attention (Zhang et al., 2024 'SageAttention'): Q and K quantised to int8 per block with scales, K smoothed by its mean, V in bf16.

    Subtracting the mean key (over tokens, per head) leaves the softmax unchanged but removes the
    shared offset that would waste int8 range. Q blocks of `q_block` and K blocks of `k_block` tokens
    each get one scale; `v_dtype` rounds V to bf16 (or keeps fp32). This emulates the numerics
    (dequantised values through the shared kernels), not the int8 speed. Block scales and the key
    mean span neighbouring tokens, so decoding matches the forward within the quantisation error.
    """

    def __init__(
        self,
        dim: int,
        *,
        q_block: int = 128,
        k_block: int = 64,
        smooth_k: bool = True,
        v_dtype: Literal["bf16", "fp32"] = "bf16",
        causal: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(dim, causal=causal, **options)
        if v_dtype not in ("bf16", "fp32"):
            raise ValueError(f"v_dtype must be 'bf16' or 'fp32', got {v_dtype!r}")
        self.q_block, self.k_block, self.smooth_k, self.v_dtype = q_block, k_block, smooth_k, v_dtype

    def attend(
        self, q: Tensor, kv: dict[str, Tensor], offset: int, kv_pos: Tensor | None, layout: Layout, cache: Cache | None
    ) -> Tensor:
        quantise = lambda q, k, v: sage_inputs(q, k, v, self.q_block, self.k_block, self.smooth_k, self.v_dtype)  # noqa: E731
        if layout.docs is None:
            q, k, v = quantise(q, kv["k"], kv["v"])
        else:  # block scales and the key mean span tokens: take them within each document
            q, k, v = per_document(quantise, layout.host_bounds, q, kv["k"], kv["v"])
        return super().attend(q, {"k": k, "v": v}, offset, kv_pos, layout, cache)

