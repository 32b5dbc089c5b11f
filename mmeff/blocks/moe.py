"""Sparse Mixture-of-Experts channel mixer (`ffn: moe`): routing, load balancing, dropless grouped execution, upcycling.

Papers: Shazeer et al., 2017 (sparsely-gated top-k MoE); Lepikhin et al., 2020 'GShard'; Fedus et al., 2021
'Switch Transformers' (auxiliary balancing loss, capacity factor, jitter); Zoph et al., 2022 'ST-MoE' (router
z-loss); Zhou et al., 2022 'Expert Choice Routing'; Gale et al., 2022 'MegaBlocks' (dropless grouped
execution); Dai et al., 2024 'DeepSeekMoE' (fine-grained and shared experts); DeepSeek-AI, 2024 'DeepSeek-V3'
(sigmoid scores, auxiliary-loss-free balancing bias); Komatsuzaki et al., 2022 'Sparse Upcycling' and He et
al., 2024 'Upcycling Large Language Models into Mixture of Experts' (fine-grained upcycling).

Options (`backbone.ffn_options`):
- `num_experts`, `top_k`, `hidden` (per-expert hidden size; fine-grained experts use a small one; default
  as the dense `expert` block with `ratio`), `expert: swiglu | mlp`, `shared_experts` (experts every token
  uses, each of size `hidden`, run as one dense FFN).
- `routing: token` (each token picks its top-k; `score: softmax | sigmoid`, weights renormalised over the k
  when `renormalize`; with top_k 1 that makes every weight 1, so Switch-style routers set it false) or `routing: expert` (each expert picks its top-C tokens of the whole batch: tokens
  see the future, so use it only in bidirectional encoders; balanced by construction, so `aux_loss_coef`
  and `bias_update_rate` do not apply to it).
- `capacity_factor`: None is dropless (token choice); a number gives each expert ceil(f * N * k / E) slots,
  first choices filled before second choices, and the overflow dropped (counted in `stats()`).
- Balancing, combinable: `aux_loss_coef` (Switch loss), `z_loss_coef` (router z-loss), `bias_update_rate`
  (DeepSeek-V3 per-expert selection bias, stepped by the observed load at every training forward; it moves
  which experts are chosen, never the mixing weights). `router_jitter` / `router_noise`: training-time
  multiplicative input jitter / additive logit noise.
- `impl: auto | grouped | loop`: dropless execution by `torch._grouped_mm`, one per projection ('auto' on
  Hopper in bf16, e.g. under bf16-mixed autocast; no host sync), or the per-expert loop reference (CPU and
  everything else). Dispatch, combine and SwiGLU around the matmuls are Triton kernels on CUDA
  (mmeff.kernels.moe), plain PyTorch elsewhere. Capacity and expert-choice modes run fixed [E, C] slots
  through two batched matmuls.

Per-layer MoE: `layers: [i, ...]` in `ffn_options` builds MoE only at those layer indices and the
`dense` block (default swiglu) with `dense_options` elsewhere (see `Backbone._ffn`).

Upcycling: `init_from: DENSE_CHECKPOINT` with `upcycle: true` loads the matching tensors, then fills every
MoE block from the dense ffn at the same path with `upcycle_state` (see `MoE.upcycled` for when it is exact).
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mmeff.blocks.ffn import MLP, SwiGLU, _hidden
from mmeff.blocks.registry import register
from mmeff.config import ConfigError
from mmeff.ops import grouped, routing as rt

log = logging.getLogger("mmeff")

MAX_LOGGED_EXPERTS = 16  # per-expert load fractions are logged only up to this many experts


def _compute_dtype(x: Tensor) -> torch.dtype:
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


@register("moe", kind="ffn")
class MoE(nn.Module):
    """Sparse Mixture-of-Experts FFN: token- or expert-choice routing over stacked experts, plus shared experts."""

    def __init__(
        self,
        dim: int,
        num_experts: int = 8,
        top_k: int = 2,
        hidden: int | None = None,
        ratio: float = 4.0,
        expert: Literal["swiglu", "mlp"] = "swiglu",
        shared_experts: int = 0,
        routing: Literal["token", "expert"] = "token",
        score: rt.Score = "softmax",
        renormalize: bool = True,
        capacity_factor: float | None = None,
        aux_loss_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        bias_update_rate: float = 0.0,
        router_jitter: float = 0.0,
        router_noise: float = 0.0,
        impl: grouped.Impl = "auto",
    ) -> None:
        super().__init__()
        for key, value, allowed in [
            ("expert", expert, ("swiglu", "mlp")),
            ("routing", routing, ("token", "expert")),
            ("score", score, ("softmax", "sigmoid")),
            ("impl", impl, ("auto", "grouped", "loop")),
        ]:
            if value not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.num_experts, self.top_k, self.gated = num_experts, top_k, expert == "swiglu"
        self.hidden = hidden or _hidden(dim, ratio * 2 / 3 if self.gated else ratio, 8)
        self.routing, self.score, self.renormalize, self.impl = routing, score, renormalize, impl
        self.capacity_factor = 1.0 if routing == "expert" and capacity_factor is None else capacity_factor
        self.aux_loss_coef, self.z_loss_coef, self.bias_update_rate = aux_loss_coef, z_loss_coef, bias_update_rate
        self.router_jitter, self.router_noise = router_jitter, router_noise

        self.router = nn.Linear(dim, num_experts, bias=False)
        width = self.hidden * (2 if self.gated else 1)  # swiglu: [gate | up] in one matmul
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, width).uniform_(-(dim**-0.5), dim**-0.5))
        bound = self.hidden**-0.5
        self.w_out = nn.Parameter(torch.empty(num_experts, self.hidden, dim).uniform_(-bound, bound))
        ffn = SwiGLU if self.gated else MLP
        self.shared = ffn(dim, hidden=shared_experts * self.hidden, bias=False) if shared_experts else None
        self.shared_experts = shared_experts
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        self.aux_loss: Tensor | None = None
        self.load: Tensor | None = None  # assignments per expert in the last forward
        self._observed: dict[str, Tensor] = {}

    def _logits(self, flat: Tensor) -> Tensor:
        with torch.autocast(flat.device.type, enabled=False):  # routing decisions in float32
            x = rt.jitter(flat.float(), self.router_jitter) if self.training and self.router_jitter > 0 else flat
            logits = rt.router_logits(x, self.router.weight)
        if self.training and self.router_noise > 0:
            logits = logits + torch.randn_like(logits) * self.router_noise
        return logits

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits = self._logits(flat)
        scores = rt.router_scores(logits, self.score)
        dtype = _compute_dtype(x)
        xe, w_in, w_out = flat.to(dtype), self.w_in.to(dtype), self.w_out.to(dtype)
        experts = None
        if self.routing == "expert":
            y, load, dropped = self._expert_choice(xe, scores, w_in, w_out)
        else:
            weights, experts = rt.topk_route(scores, self.top_k, self.expert_bias, self.renormalize)
            load = rt.expert_load(experts, self.num_experts)
            if self.capacity_factor is None:
                y, dropped = self._dropless(xe, experts, weights, load, w_in, w_out), load.new_zeros(())
            else:
                slots, dropped = self._capacity(xe, experts, w_in, w_out)
                y = torch.bmm(weights.to(dtype).unsqueeze(1), slots.view(-1, self.top_k, shape[-1])).squeeze(1)
        if self.shared is not None:
            y = y + self.shared(flat)
        self._observe(logits, scores, experts, load, dropped)
        return y.view(shape)

    def _dropless(self, x: Tensor, experts: Tensor, weights: Tensor, counts: Tensor, w_in: Tensor, w_out: Tensor) -> Tensor:
        """Every token's weighted sum of its k expert outputs [N, D], the assignments grouped by expert for the matmuls."""
        order, inv = grouped.sort_assignments(experts)
        rows = grouped.dispatch(x, order, inv, self.top_k)
        return grouped.combine(grouped.expert_ffn(rows, counts, w_in, w_out, self.gated, self.impl), order, inv, weights)

    def _capacity(self, x: Tensor, experts: Tensor, w_in: Tensor, w_out: Tensor) -> tuple[Tensor, Tensor]:
        """Expert outputs [N * k, D] with C slots per expert; overflowing assignments get zeros. Also the drop count."""
        n, e, k = x.shape[0], self.num_experts, self.top_k
        c = rt.capacity(n, e, k, self.capacity_factor)
        pos = rt.slot_positions(experts, e)
        keep = pos < c
        dest = torch.where(keep, experts * c + pos, e * c).reshape(-1)  # overflow goes to a spare all-zero row
        slots = x.new_zeros(e * c + 1, x.shape[1]).index_copy(0, dest, x.repeat_interleave(k, dim=0))
        out = grouped.padded_expert_ffn(slots[:-1].view(e, c, -1), w_in, w_out, self.gated).reshape(e * c, -1)
        return torch.cat([out, out.new_zeros(1, out.shape[1])])[dest], (~keep).sum()

    def _expert_choice(self, x: Tensor, scores: Tensor, w_in: Tensor, w_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Each expert processes its top-C tokens; returns the output [N, D], the load [E] and the unchosen-token count."""
        n = x.shape[0]
        c = rt.capacity(n, self.num_experts, self.top_k, self.capacity_factor)
        weights, tokens = rt.expert_choice_route(scores, c)
        out = grouped.padded_expert_ffn(x[tokens], w_in, w_out, self.gated) * weights.to(x.dtype).unsqueeze(-1)
        y = x.new_zeros(x.shape).index_add(0, tokens.reshape(-1), out.reshape(-1, x.shape[1]))
        chosen = torch.zeros(n, dtype=torch.bool, device=x.device).index_fill(0, tokens.reshape(-1), True)
        return y, torch.full((self.num_experts,), c, device=x.device), (~chosen).sum()

    def _observe(self, logits: Tensor, scores: Tensor, experts: Tensor | None, load: Tensor, dropped: Tensor) -> None:
        """Keep the balancing losses (training) and stats of this forward; step the balancing bias."""
        self.load = load.detach()
        self._observed = {"entropy": rt.router_entropy(scores.detach()), "dropped": dropped.detach()}
        self.aux_loss = None
        if not self.training:
            return
        terms = []
        if self.aux_loss_coef > 0 and experts is not None:
            terms.append(self.aux_loss_coef * rt.switch_aux_loss(scores, experts))
        if self.z_loss_coef > 0:
            terms.append(self.z_loss_coef * rt.z_loss(logits))
        self.aux_loss = torch.stack(terms).sum() if terms else None
        if self.bias_update_rate > 0 and experts is not None:
            total = self.load.clone()
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(total)  # every rank steps the bias by the global load
            with torch.no_grad():
                self.expert_bias.copy_(rt.balance_bias_update(self.expert_bias, total, self.bias_update_rate))

    def stats(self) -> dict[str, float]:
        """Last forward's expert load (max/mean and per-expert fractions), router entropy, drops, bias norm."""
        if self.load is None:
            return {}
        load = self.load.float()
        out = {
            "load_max_over_mean": (load.max() / load.mean().clamp_min(1e-9)).item(),
            "router_entropy": self._observed["entropy"].item(),
            "dropped": float(self._observed["dropped"].item()),
            "bias_norm": self.expert_bias.norm().item(),
        }
        if self.num_experts <= MAX_LOGGED_EXPERTS:
            out.update({f"load_{i}": v for i, v in enumerate((load / load.sum().clamp_min(1)).tolist())})
        return out

    def upcycled(self, dense: dict[str, Tensor]) -> dict[str, Tensor]:
        """This block's tensors initialised from a bias-free dense `expert`-type ffn state (keys relative to it).

        The dense hidden size H is cut into H / hidden segments: the shared experts take the first ones
        unchanged, and the routed experts cycle through the rest, grouped into consecutive runs holding each
        remaining segment once, with their output scaled by the run length. Every run gets one router row, so
        top-k picks whole runs; with renormalised weights and top_k a multiple of the run length the block
        then computes exactly the dense output (up to rounding).
        """
        keys = ("gate.weight", "up.weight", "down.weight") if self.gated else ("fc1.weight", "fc2.weight")
        missing = [k for k in keys if k not in dense]
        if missing or any(k.endswith(".bias") for k in dense):
            kind = "swiglu" if self.gated else "mlp"
            raise ValueError(f"upcycling {kind} experts needs a bias-free dense {kind} with {keys}; got {sorted(dense)}")
        w_in = torch.cat([dense[k].t() for k in keys[:-1]], dim=1)  # [D, H] or [D, 2H] as [gate | up]
        w_out = dense[keys[-1]].t()  # [H, D]
        h, total = self.hidden, w_out.shape[0]
        run = total // h - self.shared_experts
        if total % h or run < 1 or self.num_experts % run:
            raise ValueError(
                f"upcycling needs the dense hidden size ({total}) to be a multiple of hidden ({h}), with more "
                f"segments than shared_experts ({self.shared_experts}) and num_experts ({self.num_experts}) "
                f"a multiple of the {run} left"
            )
        if self.routing != "token" or not self.renormalize or self.top_k % run:
            log.warning(
                "upcycle: the MoE starts only near the dense ffn (exact: token routing, renormalize, top_k %% %d = 0)",
                run,
            )

        def segment(s: int) -> tuple[Tensor, Tensor]:
            cols = torch.arange(s * h, (s + 1) * h)
            parts = cols if not self.gated else torch.cat([cols, cols + total])
            return w_in[:, parts], w_out[cols]

        experts = [segment(self.shared_experts + i % run) for i in range(self.num_experts)]
        state = {
            "w_in": torch.stack([a for a, _ in experts]),
            "w_out": torch.stack([b for _, b in experts]) * run,
            "router.weight": self.router.weight.detach()[torch.arange(self.num_experts) // run * run].clone(),
            "expert_bias": torch.zeros_like(self.expert_bias),
        }
        if self.shared is not None:
            width = self.shared_experts * h
            state.update({f"shared.{k}": v[:width] for k, v in dense.items() if k != keys[-1]})
            state[f"shared.{keys[-1]}"] = dense[keys[-1]][:, :width]
        return {k: v.contiguous() for k, v in state.items()}


def upcycle_state(dense_state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """The tensors of every MoE block of `model`, initialised from the dense ffn at the same path in `dense_state`."""
    state: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            prefix = f"{name}."
            dense = {k.removeprefix(prefix): v for k, v in dense_state.items() if k.startswith(prefix)}
            try:
                state.update({prefix + k: v for k, v in module.upcycled(dense).items()})
            except ValueError as e:
                raise ConfigError(f"upcycle {name}: {e}") from None
    if not state:
        raise ConfigError("upcycle: the model has no moe ffn to initialise from the dense checkpoint")
    return state
