"""Mixture-of-Experts routing as pure functions: scores, token choice, expert choice, balancing losses.

Shapes: N tokens (batch and time flattened), E experts, k experts per token. Scores and losses are
computed in float32 whatever the model dtype.

- Token choice top-k: Shazeer et al., 2017 'Outrageously Large Neural Networks'; Fedus et al., 2021
  'Switch Transformers' (auxiliary load-balancing loss, router jitter).
- Expert choice: Zhou et al., 2022 'Mixture-of-Experts with Expert Choice Routing'.
- Router z-loss: Zoph et al., 2022 'ST-MoE'.
- Auxiliary-loss-free balancing bias: Wang et al., 2024 'Auxiliary-Loss-Free Load Balancing Strategy
  for Mixture-of-Experts'; DeepSeek-AI, 2024 'DeepSeek-V3'.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mmeff.ops.dispatch import cuda_fast_path

Score = Literal["softmax", "sigmoid"]


def jitter(x: Tensor, eps: float) -> Tensor:
    """Multiply `x` by uniform noise in [1 - eps, 1 + eps] (Switch's router input jitter)."""
    return x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps) if eps > 0 else x


class _HalfLogits(torch.autograd.Function):
    """x [N, D] @ w [E, D]^T of bf16/fp16 inputs, accumulated and returned in float32 in one matmul (what
    x.float() @ w.float().t() computes, without the float copies and the float32 SIMT matmul)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(x, w)
        return torch.mm(x, w.t(), out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        grad = grad.to(x.dtype)
        return grad @ w, grad.t() @ x


def router_logits(x: Tensor, weight: Tensor) -> Tensor:
    """Router logits [N, E] in float32 of tokens x [N, D] and router rows `weight` [E, D]."""
    half = x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16)
    if half and cuda_fast_path(x):
        return _HalfLogits.apply(x, weight)
    return F.linear(x.float(), weight.float())


def router_scores(logits: Tensor, score: Score = "softmax") -> Tensor:
    """Per-token expert scores [N, E] in float32: a softmax over experts or independent sigmoids."""
    logits = logits.float()
    if score == "softmax":
        return logits.softmax(dim=-1)
    if score == "sigmoid":
        return logits.sigmoid()
    raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")


def topk_route(scores: Tensor, k: int, bias: Tensor | None = None, renormalize: bool = True) -> tuple[Tensor, Tensor]:
    """Token choice: (weights [N, k], experts [N, k]); `bias` [E] shifts the selection only, never the weights."""
    chosen = (scores + bias if bias is not None else scores).topk(k, dim=-1).indices
    weights = scores.gather(-1, chosen)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return weights, chosen


def expert_choice_route(scores: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
    """Expert choice: each expert takes its `capacity` best tokens: (weights [E, C], tokens [E, C])."""
    weights, tokens = scores.t().topk(capacity, dim=-1)
    return weights, tokens


def capacity(tokens: int, num_experts: int, top_k: int, factor: float) -> int:
    """Slots per expert: ceil(factor * tokens * k / E), at least 1 and at most `tokens`."""
    return max(1, min(tokens, math.ceil(factor * tokens * top_k / num_experts)))


def expert_load(experts: Tensor, num_experts: int) -> Tensor:
    """Assignments per expert [E] (int64) from expert indices of any shape; no host sync on CUDA."""
    flat = experts.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def slot_positions(experts: Tensor, num_experts: int) -> Tensor:
    """Rank of each assignment [N, k] among those of its expert; first choices of all tokens rank before second choices."""
    n, k = experts.shape
    flat = experts.t().reshape(-1)  # choice-major: every token's first choice, then every second choice, ...
    order = flat.argsort(stable=True)
    counts = expert_load(flat, num_experts)
    starts = counts.cumsum(0) - counts
    ranks = torch.empty_like(flat)
    ranks[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    return ranks.view(k, n).t()


def switch_aux_loss(scores: Tensor, experts: Tensor) -> Tensor:
    """Switch load-balancing loss E * sum_e f_e * P_e: f_e the fraction of assignments, P_e the mean normalised score."""
    num_experts = scores.shape[-1]
    fraction = expert_load(experts, num_experts).float() / experts.numel()
    probs = scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return num_experts * (fraction * probs.mean(dim=0)).sum()


def z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return logits.float().logsumexp(dim=-1).square().mean()


def router_entropy(scores: Tensor) -> Tensor:
    """Mean over tokens of the entropy (nats) of the normalised expert scores."""
    probs = scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return -(probs * probs.clamp_min(1e-20).log()).sum(dim=-1).mean()


def balance_bias_update(bias: Tensor, load: Tensor, rate: float) -> Tensor:
    """Auxiliary-loss-free step: raise the bias of under-loaded experts and lower it for over-loaded ones by `rate`."""
    load = load.float()
    return bias + rate * torch.sign(load.mean() - load)
