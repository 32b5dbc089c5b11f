"""Causal language modelling: embeddings -> causal backbone -> (tied) vocabulary head; loss, perplexity, bits per byte."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tokenizers import pre_tokenizers
from torch import nn
from torchmetrics.aggregation import SumMetric

from mmeff import encoders
from mmeff.backbone import Backbone
from mmeff.blocks import Cache, Layout
from mmeff.config import TASKS, ConfigError, RunConfig
from mmeff.encoders.text import TextEncoderConfig, Tokenizer, load_tokenizer, tokenizer_files
from mmeff.hub import Model
from mmeff.ops.varlen import doc_bounds
from mmeff.tasks.base import TaskModule


@TASKS.register("lm")
@dataclass
class LMConfig:
    """Next-token prediction on packed text; `eos_bytes` is what an <eos> target counts in bits per byte."""

    name: str = "lm"
    tie_embeddings: bool = True
    # <eos> stands for the document separator, so by default it counts as one byte (like a newline);
    # the other special tokens count 0 bytes.
    eos_bytes: int = 1
    # separate: each document of a packed row is read on its own (every mixer restarts at its first token); joined:
    # a row is one stream across its documents, <eos> between them, as GPT-2 and litgpt train. Joined calls the model
    # on the token ids alone, a step of one shape that trainer.cuda_graphs can replay.
    documents: str = "separate"

    def __post_init__(self) -> None:
        if self.documents not in ("separate", "joined"):
            raise ConfigError(f"task.documents: got {self.documents!r}; expected 'separate' or 'joined'")


def check_config(cfg: RunConfig) -> None:
    """Raise a ConfigError when `cfg` cannot describe a causal LM."""
    if not isinstance(cfg.encoder, TextEncoderConfig):
        raise ConfigError(f"task lm: encoder.name must be 'text', got {cfg.encoder.name!r}")
    if not cfg.backbone.causal:
        raise ConfigError("task lm: backbone.causal must be true (each token is predicted from the ones before)")
    if cfg.task.eos_bytes < 0:
        raise ConfigError(f"task.eos_bytes must be >= 0, got {cfg.task.eos_bytes}")


class LanguageModel(Model):
    """Text embedding + causal backbone + vocabulary head (its weight tied to the embedding when `tie_embeddings`).

    Generation (mmeff.generate) uses `embed`, `hidden`, `head` and `new_cache`; any model with
    those four (e.g. a captioner) decodes the same way.
    """

    check = staticmethod(check_config)  # subclasses (the diffusion LM) change the config rules

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__()
        self.check(cfg)
        self.encoder = encoders.build(cfg.encoder, cfg.backbone.dim)
        self.backbone = Backbone(cfg.backbone)
        self.head = nn.Linear(cfg.backbone.dim, cfg.encoder.vocab_size, bias=False)
        if cfg.task.tie_embeddings:
            self.head.weight = self.encoder.embed.weight

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] -> embeddings [B, T, D]."""
        return self.encoder(tokens)

    def hidden(self, x: torch.Tensor, cache: list[Cache] | None = None, layout: Layout | None = None) -> torch.Tensor:
        """Embeddings [B, T, D] -> final hidden states [B, T, D] (decoding: reads and fills `cache`)."""
        return self.backbone(x, cache=cache, layout=layout)

    def new_cache(self) -> list[Cache]:
        """An empty decoding cache."""
        return self.backbone.new_cache()

    def forward(
        self, tokens: torch.Tensor, docs: torch.Tensor | None = None, bounds: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """Token ids [B, T] (and their document indices, with their boundaries as host integers: `Layout.bounds`)
        -> next-token logits [B, T, V]."""
        layout = None if docs is None else Layout(docs=docs, bounds=bounds)
        return self.head(self.hidden(self.embed(tokens), layout=layout))


def host_facts(batch: dict, pad_id: int, bounds: bool) -> dict:
    """`batch` of text ids [B, T + 1] with what the step needs as host integers, found while the batch is on the CPU
    (read back from the GPU, each would wait for the step's queued kernels): with `bounds`, "bounds", the boundaries
    of the documents of the model's input `docs[:, :-1]` (not for a compiled model: torch.compile would specialise on
    them and compile again for every batch), and "targets", the count of non-pad targets."""
    out = {**batch, "targets": int((batch["tokens"][:, 1:] != pad_id).sum())}
    if bounds:
        out["bounds"] = doc_bounds(batch["docs"][:, :-1])
    return out


def token_bytes(tokenizer: Tokenizer, vocab_size: int, eos_bytes: int = 1) -> torch.Tensor:
    """UTF-8 length of each token id [vocab_size]: special tokens 0 (<eos>: `eos_bytes`), ids past the tokenizer 0."""
    byte_chars = set(pre_tokenizers.ByteLevel.alphabet())
    hf = tokenizer.to_hf()
    lengths = torch.zeros(vocab_size, dtype=torch.long)
    for i in range(min(vocab_size, tokenizer.vocab_size)):
        if i in tokenizer.special_ids:
            continue
        piece = hf.id_to_token(i)
        if piece is not None and all(c in byte_chars for c in piece):
            lengths[i] = len(piece)  # byte-level vocabularies spell each byte as one character
        else:
            lengths[i] = len(tokenizer.decode([i]).encode("utf-8"))
    if tokenizer.eos_id < vocab_size:
        lengths[tokenizer.eos_id] = eos_bytes
    return lengths


def lm_sums(
    logits: torch.Tensor, targets: torch.Tensor, byte_table: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed negative log-likelihood in nats, target tokens, target bytes) over the non-pad targets."""
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=pad_id, reduction="sum")
    keep = targets != pad_id
    return nll, keep.sum(), torch.where(keep, byte_table[targets], 0).sum()  # a mask index would wait for the device


def make_transform(cfg: RunConfig, train: bool) -> Callable[[dict], dict[str, torch.Tensor]]:
    """Per-sample transform: the text encoder's {'tokens', 'docs'} of `seq_len + 1` ids."""
    check_config(cfg)
    return encoders.make_transform(cfg.encoder, train)


def build_model(cfg: RunConfig) -> LanguageModel:
    """The language model of run config `cfg`."""
    return LanguageModel(cfg)


class Task(TaskModule):
    """Next-token cross-entropy (pad targets ignored); val/test log loss, perplexity and bits per byte over the epoch."""

    def __init__(self, cfg: RunConfig, model: nn.Module) -> None:
        super().__init__(cfg, model)
        tokenizer = load_tokenizer(cfg.encoder)
        self.pad_id = tokenizer.pad_id
        table = token_bytes(tokenizer, cfg.encoder.vocab_size, cfg.task.eos_bytes)
        self.register_buffer("byte_table", table, persistent=False)
        self.sums = nn.ModuleDict({stage: _Sums() for stage in ("val", "test")})
        self.export_files = tokenizer_files(cfg.encoder)

    @property
    def joined(self) -> bool:
        """Whether rows are read as one stream across their documents (task.documents: joined)."""
        return self.cfg.task.documents == "joined"

    def cuda_graphs_refusal(self) -> str | None:
        if self.joined:
            return None
        return ("needs task.documents: joined for the lm task (the bounds of packed documents change from batch to "
                "batch, and a graph replays the work of one)")  # fmt: skip

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        return host_facts(batch, self.pad_id, bounds=not (self.cfg.trainer.compile or self.joined))

    def step(self, batch: dict, stage: str) -> torch.Tensor:
        tokens, docs = batch["tokens"], batch["docs"]
        if self.joined:
            logits = self.run_model(tokens[:, :-1])
        else:
            logits = self.model(tokens[:, :-1], docs=docs[:, :-1], bounds=batch.get("bounds"))
        nll, count, nbytes = lm_sums(logits, tokens[:, 1:], self.byte_table, self.pad_id)
        loss = nll / count.clamp(min=1)
        if stage == "train":
            targets = batch["targets"] if "targets" in batch else int(count)
            self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=targets)
        else:
            self.sums[stage].update(nll, count, nbytes, padding=self.padding(batch))
        return loss

    def _log_sums(self, stage: str) -> None:
        nll, count, nbytes = self.sums[stage].compute()
        loss = nll / count.clamp(min=1)
        self.log(f"{stage}/loss", loss, prog_bar=True)
        self.log(f"{stage}/ppl", loss.exp())
        self.log(f"{stage}/bpb", nll / (math.log(2) * nbytes.clamp(min=1)), prog_bar=True)
        self.sums[stage].reset()

    def on_validation_epoch_end(self) -> None:
        self._log_sums("val")

    def on_test_epoch_end(self) -> None:
        self._log_sums("test")


class _Sums(nn.Module):
    """Summed NLL, target tokens and target bytes over an epoch (summed across ranks on compute)."""

    def __init__(self) -> None:
        super().__init__()
        self.nll, self.count, self.bytes = SumMetric(), SumMetric(), SumMetric()

    def update(self, nll: torch.Tensor, count: torch.Tensor, nbytes: torch.Tensor, padding: bool = False) -> None:
        """Add a batch's sums; `padding` (TaskModule.padding): add zeros instead, so that every rank updates alike."""
        if padding:
            nll, count, nbytes = torch.zeros_like(nll), torch.zeros_like(count), torch.zeros_like(nbytes)
        self.nll.update(nll.detach())
        self.count.update(count)
        self.bytes.update(nbytes)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.nll.compute(), self.count.compute(), self.bytes.compute()

    def reset(self) -> None:
        for metric in (self.nll, self.count, self.bytes):
            metric.reset()
