"""Captioning: image or audio tokens, projected, form a prefix of the shared causal backbone; the caption's text
tokens (<bos> caption <eos>) follow, and only they are predicted. Decoding is the LM's (mmeff.generate), after the prefix.

Parameter names: `encoder.media` (the modality tokenizer of config `encoder`), `encoder.proj` (its projection),
`encoder.embed` (the text embedding, named as in a text LM so that `init_from` an LM checkpoint reuses it),
`backbone`, `head` (tied to `encoder.embed` by default).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmeff import encoders, metrics
from mmeff.backbone import Backbone
from mmeff.blocks import Cache, Layout
from mmeff.config import TASKS, ConfigError, RunConfig
from mmeff.encoders.text import TextEncoder, TextEncoderConfig, Tokenizer, load_tokenizer, tokenizer_files
from mmeff.hub import Model
from mmeff.tasks.base import TaskModule

IGNORE = -100  # target id that counts in no loss or metric


@dataclass
class CaptionTextConfig:
    """Caption text options shared by the captioners (the tokenizer is byte-level unless `tokenizer: bpe` names a
    tokenizer.json), and what val/test decode."""

    name: str = "caption"
    tokenizer: Literal["byte", "bpe"] = "byte"
    tokenizer_path: str | None = None
    vocab_size: int | None = None  # None: the tokenizer's (written back, so the exported config rebuilds the model)
    text_key: str = "txt"  # caption field of the shard samples
    max_len: int = 64  # caption tokens with <bos> and <eos>; longer captions are skipped (and counted)
    projector: Literal["linear", "mlp", "none"] = "linear"
    tie_embeddings: bool = True
    generate: bool = True  # val/test: decode every batch; log exact match, BLEU, CER, WER
    max_new_tokens: int | None = None  # decoding limit (diffusion: the answer length); None: max_len (diffusion: max_len - 1)


@TASKS.register("caption")
@dataclass
class CaptionConfig(CaptionTextConfig):
    """Autoregressive captioning options: prefix attention and label smoothing on top of the caption text options."""

    prefix_lm: bool = True  # prefix tokens attend to each other both ways (attention mixers); false: plain causal
    label_smoothing: float = 0.0


def text_config(task: CaptionTextConfig) -> TextEncoderConfig:
    """The text encoder config that names the caption tokenizer."""
    return TextEncoderConfig(tokenizer=task.tokenizer, tokenizer_path=task.tokenizer_path, vocab_size=task.vocab_size)


def check_media(cfg: RunConfig) -> None:
    """Raise a ConfigError when `cfg` has no media prefix or caption room (any captioner's checks)."""
    if cfg.encoder.name not in ("image", "audio"):
        raise ConfigError(
            f"task {cfg.task.name}: encoder.name must be 'image' or 'audio' (the prefix modality), got {cfg.encoder.name!r}"
        )
    if cfg.task.max_len < 3:
        raise ConfigError(f"task.max_len must be >= 3 (<bos>, one token, <eos>), got {cfg.task.max_len}")


def check_config(cfg: RunConfig) -> None:
    """Raise a ConfigError when `cfg` cannot describe an autoregressive captioner."""
    check_media(cfg)
    if not cfg.backbone.causal:
        raise ConfigError("task caption: backbone.causal must be true (text is predicted left to right after the prefix)")


class CaptionEncoder(TextEncoder):
    """The captioner's tokenizers: `embed` (text ids -> embeddings, the TextEncoder's), `media` (the image or audio
    tokenizer) and `proj` (media tokens -> prefix embeddings)."""

    def __init__(self, cfg: RunConfig, dim: int) -> None:
        super().__init__(cfg.task.vocab_size, dim)
        self.media = encoders.build(cfg.encoder, dim)
        kind = cfg.task.projector
        if kind == "linear":
            self.proj: nn.Module = nn.Linear(dim, dim)
        elif kind == "mlp":
            self.proj = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        else:
            self.proj = nn.Identity()

    def prefix(self, inputs: torch.Tensor) -> torch.Tensor:
        """Media inputs (images [B, C, H, W] or features [B, frames, mels]) -> prefix embeddings [B, P, D]."""
        return self.proj(self.media(inputs).x)


class Captioner(Model):
    """Media prefix + text through one causal backbone; decodes with mmeff.generate (`embed`, `hidden`, `head`,
    `new_cache`) after `encode_media` made the prefix embeddings. Subclasses change `check` (the config rules)."""

    check = staticmethod(check_config)

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__()
        self.check(cfg)
        cfg.task.vocab_size = cfg.task.vocab_size or load_tokenizer(text_config(cfg.task)).vocab_size
        dim = cfg.backbone.dim
        self.prefix_lm = getattr(cfg.task, "prefix_lm", False)  # configs without it see everything both ways
        self.encoder = CaptionEncoder(cfg, dim)
        self.backbone = Backbone(cfg.backbone)
        self.head = nn.Linear(dim, cfg.task.vocab_size, bias=False)
        if cfg.task.tie_embeddings:
            self.head.weight = self.encoder.embed.weight

    def encode_media(self, inputs: torch.Tensor) -> torch.Tensor:
        """Prefix embeddings [B, P, D] of media inputs."""
        return self.encoder.prefix(inputs)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text ids [B, T] -> embeddings [B, T, D]."""
        return self.encoder(tokens)

    def hidden(self, x: torch.Tensor, cache: list[Cache] | None = None, layout: Layout | None = None) -> torch.Tensor:
        """Embeddings [B, T, D] (media prefix first) -> hidden states; `layout.prefix` is the media prefix's length,
        which sees itself both ways when the task is a prefix LM."""
        if layout is not None and not self.prefix_lm:
            layout = layout.replace(prefix=0)
        return self.backbone(x, cache=cache, layout=layout)

    def new_cache(self) -> list[Cache]:
        """An empty decoding cache."""
        return self.backbone.new_cache()

    def forward(self, inputs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Media inputs and text ids [B, L] (<bos> first) -> next-token logits at the text positions [B, L, V]."""
        prefix = self.encode_media(inputs)
        P = prefix.shape[1]
        x = torch.cat([prefix, self.embed(tokens).to(prefix.dtype)], dim=1)
        return self.head(self.hidden(x, layout=Layout(prefix=P))[:, P:])


def caption_targets(tokens: torch.Tensor, prefix_len: int, pad_id: int) -> torch.Tensor:
    """Targets of every position of the sequence prefix + tokens[:, :-1]: [B, P + L - 1], IGNORE at the prefix
    (and its last position, whose next token <bos> is given) and at padding; tokens[:, 1:] at the text positions."""
    targets = tokens[:, 1:].masked_fill(tokens[:, 1:] == pad_id, IGNORE)
    ignored = torch.full((tokens.shape[0], prefix_len), IGNORE, dtype=targets.dtype, device=targets.device)
    return torch.cat([ignored, targets], dim=1)


class CaptionTransform:
    """Shard sample -> {'input': media tensor, 'tokens': [max_len] ids (<bos> caption <eos> <pad>...), 'text': caption}."""

    def __init__(self, cfg: RunConfig, train: bool) -> None:
        check_media(cfg)
        self.media = encoders.make_transform(cfg.encoder, train)
        self.tokenizer = load_tokenizer(text_config(cfg.task))
        self.key, self.max_len = cfg.task.text_key, cfg.task.max_len

    def __call__(self, sample: dict) -> dict[str, Any]:
        raw = sample[self.key]
        text = (raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)).strip()
        tok = self.tokenizer
        ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
        if len(ids) > self.max_len:
            raise ValueError(f"caption of {len(ids)} tokens (with <bos>/<eos>) is longer than task.max_len = {self.max_len}")
        tokens = torch.full((self.max_len,), tok.pad_id, dtype=torch.long)
        tokens[: len(ids)] = torch.tensor(ids)
        return {"input": self.media(sample), "tokens": tokens, "text": text}


def build_model(cfg: RunConfig) -> Captioner:
    """The captioner of run config `cfg`."""
    return Captioner(cfg)


def make_transform(cfg: RunConfig, train: bool) -> CaptionTransform:
    """Per-sample transform: media input, padded caption ids, caption text."""
    return CaptionTransform(cfg, train)


def caption(
    model: Captioner,
    inputs: torch.Tensor,
    tokenizer: Tokenizer,
    sampling: Any = None,
    prompt: str = "",
    max_new_tokens: int = 64,
) -> list[str]:
    """Captions of a batch of media inputs: greedy unless `sampling` (mmeff.generate.Sampling) says otherwise;
    decoding continues <bos> + `prompt` after the prefix and stops at <eos>."""
    from mmeff.generate import Sampling, generate

    sampling = sampling or Sampling(max_new_tokens=max_new_tokens, greedy=True)
    with torch.inference_mode():
        prefix = model.encode_media(inputs)
    prompts = [[tokenizer.bos_id, *tokenizer.encode(prompt)]] * inputs.shape[0]
    result = generate(model, prompts, sampling, tokenizer, prefix_embeds=prefix)
    return [prompt + text for text in result.texts] if prompt else result.texts


class Task(TaskModule):
    """Cross-entropy on the caption tokens only; val/test add teacher-forced token accuracy and, from greedy
    captions, exact match, BLEU (sacrebleu), character and word error rates over the epoch."""

    def __init__(self, cfg: RunConfig, model: nn.Module) -> None:
        super().__init__(cfg, model)
        text = text_config(cfg.task)
        self.tokenizer = load_tokenizer(text)
        self.pad_id = self.tokenizer.pad_id
        self.export_files = tokenizer_files(text)
        self.outputs: dict[str, dict[str, list]] = {}

    def step(self, batch: dict, stage: str) -> torch.Tensor:
        tokens = batch["tokens"]
        width = int((tokens != self.pad_id).sum(1).max())  # drop the columns that are padding in every row
        tokens = tokens[:, :width]
        logits = self.model(batch["input"], tokens[:, :-1])
        targets = caption_targets(tokens, 0, self.pad_id)
        smoothing = self.cfg.task.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, label_smoothing=smoothing)
        correct, count = metrics.token_accuracy(logits, targets, IGNORE)
        n = 0 if self.padding(batch) else tokens.shape[0]
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=True, batch_size=n, sync_dist=not on_step)
        self.log(f"{stage}/token_acc", correct / max(1, count), on_step=on_step, on_epoch=True, batch_size=n, sync_dist=not on_step)
        if stage != "train" and self.cfg.task.generate:
            hyps = caption(self.model, batch["input"], self.tokenizer, max_new_tokens=self.max_new_tokens)
            self.keep_texts(batch, stage, hyps)
        return loss

    def keep_texts(self, batch: dict, stage: str, hyps: list[str]) -> None:
        """Keep the batch's generated captions and references for the epoch's metrics (none of a padding batch)."""
        if not self.padding(batch):
            out = self.outputs.setdefault(stage, {"hyps": [], "refs": []})
            out["hyps"] += hyps
            out["refs"] += list(batch["text"])

    @property
    def max_new_tokens(self) -> int:
        return self.cfg.task.max_new_tokens or self.cfg.task.max_len

    def _log_generated(self, stage: str) -> None:
        out = self.outputs.pop(stage, None)
        if not out:
            return
        hyps, refs = out["hyps"], out["refs"]
        self.log(f"{stage}/exact", metrics.exact_match(hyps, refs), prog_bar=True)
        self.log(f"{stage}/bleu", metrics.bleu(hyps, refs))
        self.log(f"{stage}/cer", metrics.cer(hyps, refs), prog_bar=True)
        self.log(f"{stage}/wer", metrics.wer(hyps, refs))

    def on_validation_epoch_end(self) -> None:
        self._log_generated("val")

    def on_test_epoch_end(self) -> None:
        self._log_generated("test")


def media_sample(cfg: RunConfig, path: str | Path) -> dict[str, Any]:
    """A shard-like sample holding the bytes of an image or audio file under the field the encoder reads."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    data = path.read_bytes()
    if cfg.encoder.name == "image":
        from PIL import Image, UnidentifiedImageError

        try:
            Image.open(io.BytesIO(data)).verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as e:  # PIL reports a damaged PNG as SyntaxError
            raise ConfigError(f"--image {path}: not an image file PIL can read ({e})") from None
        return {cfg.encoder.key: data}
    ext = path.suffix.lstrip(".").lower()
    return {ext if ext in cfg.encoder.keys else cfg.encoder.keys[0]: data}
