"""Masked diffusion language modelling (MDLM, Sahoo et al. 2024; LLaDA, Nie et al. 2025) on the shared backbone.

Forward process: per sequence a masking level t ~ U(eps, 1), and each loss-eligible token becomes <mask>
independently with probability t. The bidirectional backbone predicts the clean tokens at the masked positions; the
loss, cross-entropy there weighted by 1/t and divided by the number of eligible positions, is the negative ELBO per
token (an upper bound on the NLL). Prompt / prefix tokens are never eligible: they condition the answer (LLaDA's SFT).
Sampling is mmeff.diffusion_sampling. `task.name: diffusion` is the text LM; mmeff.tasks.diffusion_caption the
captioner. Parameter names are the causal LM's, so `init_from` an AR checkpoint loads by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mmeff import encoders
from mmeff.config import TASKS, ConfigError, RunConfig
from mmeff.encoders.text import TextEncoderConfig, Tokenizer, load_tokenizer, tokenizer_files
from mmeff.tasks.base import TaskModule
from mmeff.tasks.lm import LanguageModel, _Sums, host_facts, token_bytes


@dataclass
class MaskingOptions:
    """The masking process: t ~ U(eps, 1) per sequence; `antithetic` stratifies t across the batch (MDLM's
    low-discrepancy sampler). Evaluation always stratifies and draws from a fixed seed, so val/loss is repeatable."""

    eps: float = 1e-3
    antithetic: bool = False


@TASKS.register("diffusion")
@dataclass
class DiffusionConfig(MaskingOptions):
    """Masked diffusion on packed text; `prompt_prob` of the training sequences keep a clean prompt of random length."""

    name: str = "diffusion"
    tie_embeddings: bool = True
    prompt_prob: float = 0.0
    eos_bytes: int = 1  # what an <eos> target counts in bits per byte (as in task lm)


def check_masking(cfg: RunConfig) -> None:
    """Raise a ConfigError when `cfg` cannot train a masked diffusion model (causal backbone, bad eps)."""
    if cfg.backbone.causal:
        raise ConfigError(
            f"task {cfg.task.name}: backbone.causal must be false (masked diffusion predicts each masked token from "
            "both sides)"
        )
    if not 0 < cfg.task.eps < 1:
        raise ConfigError(f"task.eps must be in (0, 1), got {cfg.task.eps}")


def check_mask_id(tokenizer: Tokenizer, vocab_size: int, key: str) -> None:
    """Raise a ConfigError when the vocabulary of `vocab_size` ids has no row for the tokenizer's <mask>."""
    if tokenizer.mask_id >= vocab_size:
        raise ConfigError(f"{key}: {vocab_size} ids leave no row for <mask> (id {tokenizer.mask_id})")


def check_config(cfg: RunConfig) -> None:
    """Raise a ConfigError when `cfg` cannot describe a text diffusion LM."""
    if not isinstance(cfg.encoder, TextEncoderConfig):
        raise ConfigError(f"task diffusion: encoder.name must be 'text', got {cfg.encoder.name!r}")
    check_masking(cfg)
    if not 0 <= cfg.task.prompt_prob <= 1:
        raise ConfigError(f"task.prompt_prob must be in [0, 1], got {cfg.task.prompt_prob}")
    if cfg.task.eos_bytes < 0:
        raise ConfigError(f"task.eos_bytes must be >= 0, got {cfg.task.eos_bytes}")


def sample_t(batch: int, eps: float, antithetic: bool, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Masking levels [batch] in [eps, 1): uniform, or one per stratum of [0, 1) at a shared random offset."""
    u = torch.rand(batch, device=device, generator=generator)
    if antithetic:
        u = (u[:1] + torch.arange(batch, device=device) / batch) % 1
    return eps + (1 - eps) * u


def response_mask(shape: torch.Size, prompt_len: torch.Tensor) -> torch.Tensor:
    """Bool [B, T]: True at the positions past each row's prompt (`prompt_len` [B] leading tokens)."""
    return torch.arange(shape[1], device=prompt_len.device) >= prompt_len[:, None]


def mask_tokens(
    tokens: torch.Tensor, eligible: torch.Tensor, t: torch.Tensor, mask_id: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy tokens, masked [B, T]): each eligible token replaced by `mask_id` with its row's probability `t` [B]."""
    masked = (torch.rand(tokens.shape, device=tokens.device, generator=generator) < t[:, None]) & eligible
    return tokens.masked_fill(masked, mask_id), masked


def weighted_nll(logits: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Sum over the masked positions of cross-entropy / t (nats); divided by the eligible positions it is the loss."""
    ce = F.cross_entropy(logits[masked].float(), tokens[masked], reduction="none")
    return (ce / t[:, None].expand_as(tokens)[masked]).sum()


class MaskedDiffusion:
    """What the diffusion tasks share: `corrupt` a batch by the masking process (repeatable in evaluation)."""

    cfg: RunConfig
    mask_id: int
    _eval_generator: torch.Generator | None = None

    def corrupt(self, tokens: torch.Tensor, eligible: torch.Tensor, stage: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy tokens, masked, t [B]) of `tokens` [B, T] whose `eligible` positions may be masked."""
        generator = None
        if stage != "train":
            if self._eval_generator is None:
                self._eval_generator = torch.Generator(tokens.device).manual_seed(self.cfg.seed)
            generator = self._eval_generator
        t = sample_t(tokens.shape[0], self.cfg.task.eps, self.cfg.task.antithetic or stage != "train", tokens.device, generator)
        noisy, masked = mask_tokens(tokens, eligible, t, self.mask_id, generator)
        return noisy, masked, t

    def on_validation_epoch_start(self) -> None:
        self._eval_generator = None

    def on_test_epoch_start(self) -> None:
        self._eval_generator = None


class DiffusionLM(LanguageModel):
    """mmeff.tasks.lm.LanguageModel (same parts and names, so AR checkpoints load) on a bidirectional backbone;
    `embed`, `hidden` and `head` are what mmeff.diffusion_sampling calls."""

    check = staticmethod(check_config)


def build_model(cfg: RunConfig) -> DiffusionLM:
    """The text diffusion LM of run config `cfg`."""
    return DiffusionLM(cfg)


def make_transform(cfg: RunConfig, train: bool) -> Callable[[dict], dict[str, torch.Tensor]]:
    """Per-sample transform: the text encoder's {'tokens', 'docs'} (the first `seq_len` ids are used)."""
    check_config(cfg)
    return encoders.make_transform(cfg.encoder, train)


class Task(MaskedDiffusion, TaskModule):
    """The masked diffusion loss on packed text; val/test log the negative ELBO per token (loss) and in bits per byte."""

    def __init__(self, cfg: RunConfig, model: nn.Module) -> None:
        super().__init__(cfg, model)
        tokenizer = load_tokenizer(cfg.encoder)
        check_mask_id(tokenizer, cfg.encoder.vocab_size, "encoder.vocab_size")
        self.pad_id, self.mask_id = tokenizer.pad_id, tokenizer.mask_id
        self.register_buffer("byte_table", token_bytes(tokenizer, cfg.encoder.vocab_size, cfg.task.eos_bytes), persistent=False)
        self.sums = nn.ModuleDict({stage: _Sums() for stage in ("val", "test")})
        self.export_files = tokenizer_files(cfg.encoder)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        return host_facts(batch, self.pad_id, bounds=not self.cfg.trainer.compile)

    def step(self, batch: dict, stage: str) -> torch.Tensor:
        tokens, docs = batch["tokens"][:, :-1], batch["docs"][:, :-1]
        eligible = tokens != self.pad_id
        if stage == "train" and self.cfg.task.prompt_prob > 0:
            B, T = tokens.shape
            lengths = torch.randint(1, T, (B,), device=tokens.device)
            conditional = torch.rand(B, device=tokens.device) < self.cfg.task.prompt_prob
            eligible &= response_mask(tokens.shape, lengths * conditional)
        noisy, masked, t = self.corrupt(tokens, eligible, stage)
        nll = weighted_nll(self.model(noisy, docs=docs, bounds=batch.get("bounds")), tokens, masked, t)
        count = eligible.sum()
        loss = nll / count.clamp(min=1)
        if stage == "train":
            self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=int(count))
        else:
            self.sums[stage].update(nll, count, self.byte_table[tokens][eligible].sum(), padding=self.padding(batch))
        return loss

    def _log_sums(self, stage: str) -> None:
        nll, count, nbytes = self.sums[stage].compute()
        self.log(f"{stage}/loss", nll / count.clamp(min=1), prog_bar=True)
        self.log(f"{stage}/bpb", nll / (math.log(2) * nbytes.clamp(min=1)), prog_bar=True)
        self.sums[stage].reset()

    def on_validation_epoch_end(self) -> None:
        self._log_sums("val")

    def on_test_epoch_end(self) -> None:
        self._log_sums("test")
