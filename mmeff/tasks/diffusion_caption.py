"""Masked diffusion captioning (LLaDA-style conditional training, Nie et al. 2025): the image or audio prefix and <bos>
are the prompt and never masked; the answer (caption, <eos>, then padding up to `max_len`) is masked and predicted by
the bidirectional backbone. Val/test sample every caption with mmeff.diffusion_sampling in `eval_steps` steps.

The model is mmeff.tasks.caption's Captioner (same parameter names and prefix machinery) on a bidirectional backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmeff.config import TASKS, RunConfig
from mmeff.diffusion_sampling import DiffusionSampling, Remasking, cut_at_eos, diffusion_sample
from mmeff.tasks import caption
from mmeff.tasks.diffusion import MaskedDiffusion, MaskingOptions, check_mask_id, check_masking, response_mask, weighted_nll


@TASKS.register("diffusion_caption")
@dataclass
class DiffusionCaptionConfig(MaskingOptions, caption.CaptionTextConfig):
    """Caption text and masking options, and how val/test sample: `eval_steps` forward passes (None: one per answer
    token) in blocks of `eval_block_len` (None: one block)."""

    name: str = "diffusion_caption"
    eval_steps: int | None = None
    eval_block_len: int | None = None
    remasking: Remasking = "low_confidence"


def check_config(cfg: RunConfig) -> None:
    """Raise a ConfigError when `cfg` cannot describe a diffusion captioner."""
    caption.check_media(cfg)
    check_masking(cfg)


class DiffusionCaptioner(caption.Captioner):
    """The captioner on a bidirectional backbone: `forward(inputs, noisy ids)` gives the clean-token logits of the text."""

    check = staticmethod(check_config)


def build_model(cfg: RunConfig) -> DiffusionCaptioner:
    """The diffusion captioner of run config `cfg`."""
    return DiffusionCaptioner(cfg)


def make_transform(cfg: RunConfig, train: bool) -> caption.CaptionTransform:
    """Per-sample transform: media input, padded caption ids, caption text (as the captioner's)."""
    return caption.CaptionTransform(cfg, train)


def sampling(cfg: RunConfig) -> DiffusionSampling:
    """The sampler settings of val/test: the trained answer length (`max_new_tokens` or max_len - 1), greedy."""
    t = cfg.task
    return DiffusionSampling(gen_len=t.max_new_tokens or t.max_len - 1, steps=t.eval_steps, block_len=t.eval_block_len, remasking=t.remasking)


class Task(MaskedDiffusion, caption.Task):
    """The masked diffusion loss on the answer; val/test log it (negative ELBO per answer token) and, from sampled
    captions, exact match, token accuracy, BLEU, CER and WER."""

    def __init__(self, cfg: RunConfig, model: nn.Module) -> None:
        super().__init__(cfg, model)
        check_mask_id(self.tokenizer, cfg.task.vocab_size, "task.vocab_size")
        self.mask_id = self.tokenizer.mask_id

    def step(self, batch: dict, stage: str) -> torch.Tensor:
        tokens = batch["tokens"]
        eligible = response_mask(tokens.shape, torch.ones_like(tokens[:, 0]))  # <bos> is the prompt
        noisy, masked, t = self.corrupt(tokens, eligible, stage)
        loss = weighted_nll(self.model(batch["input"], noisy), tokens, masked, t) / eligible.sum()
        n, on_step = 0 if self.padding(batch) else tokens.shape[0], stage == "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=True, batch_size=n, sync_dist=not on_step)
        if stage != "train" and self.cfg.task.generate:
            self.sample_metrics(batch, stage)
        return loss

    def sample_metrics(self, batch: dict, stage: str) -> None:
        """Sample the batch's captions; log token accuracy against the reference answer, keep texts for the epoch."""
        tokens, s = batch["tokens"], sampling(self.cfg)
        with torch.inference_mode():
            prefix = self.model.encode_media(batch["input"])
        ids = diffusion_sample(self.model, tokens[:, :1], self.mask_id, s, prefix).ids
        target = tokens[:, 1 : 1 + s.gen_len]
        keep = (target != self.pad_id) & (not self.padding(batch))  # the caption and its <eos>
        correct = ((ids[:, : target.shape[1]] == target) & keep).sum()
        self.log(f"{stage}/token_acc", correct / keep.sum().clamp(min=1), on_epoch=True, batch_size=int(keep.sum()), sync_dist=True)
        self.keep_texts(batch, stage, [self.tokenizer.decode(row) for row in cut_at_eos(ids, self.tokenizer.eos_id)])
