"""Parallel decoding of masked diffusion LMs (LLaDA, Nie et al. 2025, Algorithm 4 with semi-autoregressive blocks).

The answer starts as `gen_len` <mask> tokens after the prompt (and any media prefix). Blocks of `block_len` positions
are filled left to right, each in its share of the `steps`; at every step the model predicts all masked positions at
once and commits the most confident predictions (`low_confidence` remasking) or random ones (`random`), so `steps`
forward passes produce `gen_len` tokens. The model needs `embed(ids)`, `hidden(x)` and `head(h)` (mmeff.tasks.diffusion).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from mmeff.blocks import Layout
from mmeff.config import ConfigError
from mmeff.encoders.text import Tokenizer

Remasking = Literal["low_confidence", "random"]


@dataclass
class DiffusionSampling:
    """How the answer is unmasked: `steps` forward passes for `gen_len` tokens in blocks of `block_len` (None: one
    block); `temperature` scales Gumbel noise on the logits (0: greedy)."""

    gen_len: int = 128
    steps: int | None = None  # None: gen_len (one token per step)
    block_len: int | None = None
    remasking: Remasking = "low_confidence"
    temperature: float = 0.0
    seed: int | None = None

    def check(self) -> None:
        """Raise ConfigError naming the flag of an out-of-range setting."""
        blocks = -(-self.gen_len // (self.block_len or self.gen_len or 1))
        problems = [
            (self.gen_len < 1, f"--gen-len must be >= 1, got {self.gen_len}"),
            (self.block_len is not None and self.block_len < 1, f"--block-len must be >= 1, got {self.block_len}"),
            (self.steps is not None and self.steps < blocks, f"--steps must be >= the number of blocks ({blocks}), got {self.steps}"),
            (self.remasking not in ("low_confidence", "random"), f"--remasking must be low_confidence or random, got {self.remasking!r}"),
            (self.temperature < 0, f"--temperature must be >= 0, got {self.temperature}"),
        ]
        for bad, message in problems:
            if bad:
                raise ConfigError(message)


@dataclass
class DiffusionOutput:
    """Sampled answer ids [B, gen_len], the step (0-based) at which each position was committed, forward passes used."""

    ids: torch.Tensor
    committed_at: torch.Tensor
    forward_passes: int


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` as `parts` integers differing by at most one, larger ones first."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def schedule(gen_len: int, steps: int, block_len: int) -> list[tuple[int, int, list[int]]]:
    """Per block (start, end, tokens committed at each of its steps): steps split evenly among the blocks, and each
    block's tokens evenly among its steps (a block with fewer tokens than steps uses one step per token)."""
    starts = range(0, gen_len, block_len)
    plan = []
    for start, block_steps in zip(starts, split_evenly(steps, len(starts))):
        end = min(start + block_len, gen_len)
        plan.append((start, end, split_evenly(end - start, min(block_steps, end - start))))
    return plan


def masked_logits(model: nn.Module, ids: torch.Tensor, start: int, prefix_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, T - start, V] of positions `start:` of `ids` [B, T] after the optional media prefix."""
    x, layout = model.embed(ids), None
    if prefix_embeds is not None:
        x = torch.cat([prefix_embeds.to(x.dtype), x], dim=1)
        layout = Layout(prefix=prefix_embeds.shape[1])
    return model.head(model.hidden(x, layout=layout)[:, x.shape[1] - ids.shape[1] + start :])


@torch.inference_mode()
def diffusion_sample(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    mask_id: int,
    sampling: DiffusionSampling,
    prefix_embeds: torch.Tensor | None = None,
) -> DiffusionOutput:
    """Unmask `sampling.gen_len` tokens after `prompt_ids` [B, P] (every row the same length) in `sampling.steps`
    forward passes; `prefix_embeds` [B, M, D] (e.g. image tokens) go first. <mask> itself is never predicted."""
    s = sampling
    s.check()
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(s.seed) if s.seed is not None else None
    B, P = prompt_ids.shape
    ids = torch.cat([prompt_ids.to(device), torch.full((B, s.gen_len), mask_id, dtype=torch.long, device=device)], dim=1)
    committed_at = torch.full((B, s.gen_len), -1, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)[:, None]
    step = 0
    training = model.training
    model.eval()
    try:
        for start, end, per_step in schedule(s.gen_len, s.steps or s.gen_len, s.block_len or s.gen_len):
            for k in per_step:
                logits = masked_logits(model, ids, P, prefix_embeds).float()
                logits[..., mask_id] = float("-inf")
                if s.temperature > 0:
                    u = torch.rand(logits.shape, device=device, generator=generator).clamp_(1e-20, 1)
                    guess = (logits + s.temperature * -torch.log(-torch.log(u))).argmax(-1)  # Gumbel-max at T
                else:
                    guess = logits.argmax(-1)
                if s.remasking == "low_confidence":
                    score = logits.softmax(-1).gather(-1, guess[..., None]).squeeze(-1)
                else:
                    score = torch.rand(guess.shape, device=device, generator=generator)
                open_ = ids[:, P:] == mask_id
                open_[:, :start] = open_[:, end:] = False  # only the current block's masked positions
                chosen = score.masked_fill(~open_, float("-inf")).topk(k, dim=-1).indices
                ids[rows, P + chosen] = guess.gather(1, chosen)
                committed_at[rows, chosen] = step
                step += 1
    finally:
        model.train(training)
    return DiffusionOutput(ids[:, P:], committed_at, step)


@dataclass
class DiffusionGeneration:
    """Texts (cut at the first <eos>), their ids, and what producing them cost."""

    tokens: list[list[int]]
    texts: list[str]
    gen_len: int
    forward_passes: int
    generated_tokens: int
    seconds: float

    def speed(self) -> str:
        """One line: forward passes per generated token and throughput."""
        rate = self.generated_tokens / self.seconds if self.seconds > 0 else float("inf")
        return (
            f"diffusion: {self.forward_passes} forward passes for {self.gen_len} tokens "
            f"({self.forward_passes / self.gen_len:.3f} per generated token), "
            f"{self.generated_tokens} tokens in {self.seconds:.3f}s ({rate:.1f} tokens/s)"
        )


def cut_at_eos(ids: torch.Tensor, eos_id: int) -> list[list[int]]:
    """Each row of `ids` [B, L] up to (without) its first `eos_id`."""
    return [row[: row.index(eos_id)] if eos_id in row else row for row in ids.tolist()]


def diffusion_generate(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    tokenizer: Tokenizer,
    sampling: DiffusionSampling,
    prefix_embeds: torch.Tensor | None = None,
) -> DiffusionGeneration:
    """`diffusion_sample`, decoded to text up to each row's first <eos>, and timed."""
    start = time.perf_counter()
    out = diffusion_sample(model, prompt_ids, tokenizer.mask_id, sampling, prefix_embeds)
    if out.ids.device.type == "cuda":
        torch.cuda.synchronize(out.ids.device)
    seconds = time.perf_counter() - start
    tokens = cut_at_eos(out.ids, tokenizer.eos_id)
    return DiffusionGeneration(
        tokens, [tokenizer.decode(t) for t in tokens], sampling.gen_len, out.forward_passes, out.ids.numel(), seconds
    )
