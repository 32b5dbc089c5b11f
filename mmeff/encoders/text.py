"""Text tokenizer: UTF-8 bytes (default) or byte-level BPE ids -> token embeddings; document-aware causal masks."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import tokenizers
import torch
from timm.layers import trunc_normal_
from tokenizers import decoders, models, pre_tokenizers, trainers
from torch import nn

from mmeff.config import ENCODERS, ConfigError

SPECIALS = ("<pad>", "<bos>", "<eos>", "<mask>")  # <eos> ends a document; <mask> is for diffusion LMs
TOKENIZER_FILE = "tokenizer.json"
TOKENS_KEY, DOCS_KEY = "tokens.npy", "docs.npy"


@ENCODERS.register("text")
@dataclass
class TextEncoderConfig:
    """Tokenizer and embedding options; samples hold `seq_len + 1` tokens (inputs and shifted targets)."""

    name: str = "text"
    tokenizer: Literal["byte", "bpe"] = "byte"
    tokenizer_path: str | None = None  # bpe: a folder holding tokenizer.json (`mmeff tokenizer train`) or the file
    vocab_size: int | None = None  # None: the tokenizer's
    seq_len: int = 256


class Tokenizer:
    """Text <-> ids with the special ids `pad_id`, `bos_id`, `eos_id`, `mask_id`; saved as Hugging Face tokenizer.json."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    mask_id: int

    def encode(self, text: str) -> list[int]:
        """The ids of `text`; never special ids, even if the text spells one out."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """The text of `ids`: bad UTF-8 becomes U+FFFD; special tokens are dropped (or spelled out), unknown ids dropped."""
        raise NotImplementedError

    def to_hf(self) -> tokenizers.Tokenizer:
        """The Hugging Face `tokenizers.Tokenizer` giving the same ids."""
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the vocabulary, merges and special tokens: equal for tokenizers that give the same ids."""
        spec = json.loads(self.to_hf().to_str())
        ids = {"model": spec["model"], "added": sorted((t["id"], t["content"]) for t in spec["added_tokens"])}
        return hashlib.sha256(json.dumps(ids, sort_keys=True).encode()).hexdigest()

    @property
    def special_ids(self) -> frozenset[int]:
        """The ids of the special tokens."""
        return frozenset((self.pad_id, self.bos_id, self.eos_id, self.mask_id))

    def save(self, folder: str | Path) -> Path:
        """Write `folder/tokenizer.json`; return its path."""
        path = Path(folder) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_hf().to_str())
        return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of bytes to printable characters, the alphabet of the ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are ids 0-255, the special tokens follow; no vocabulary file."""

    def __init__(self) -> None:
        self.pad_id, self.bos_id, self.eos_id, self.mask_id = range(256, 256 + len(SPECIALS))
        self.vocab_size = 256 + len(SPECIALS)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        parts, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
            elif not skip_special and i < self.vocab_size:
                parts += [run.decode("utf-8", errors="replace"), SPECIALS[i - 256]]
                run = bytearray()
        return "".join(parts) + run.decode("utf-8", errors="replace")

    def to_hf(self) -> tokenizers.Tokenizer:
        # A byte-level BPE without merges whose vocabulary maps each byte's character to the byte value.
        chars = _bytes_to_unicode()
        hf = tokenizers.Tokenizer(models.BPE({chars[b]: b for b in range(256)}, []))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens(list(SPECIALS))
        return hf


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers.Tokenizer` (e.g. byte-level BPE); missing special tokens are added."""

    def __init__(self, hf: tokenizers.Tokenizer) -> None:
        hf.add_special_tokens([s for s in SPECIALS if hf.token_to_id(s) is None])
        hf.encode_special_tokens = True  # text spelling "<eos>" is encoded as text
        self.hf = hf
        self.pad_id, self.bos_id, self.eos_id, self.mask_id = (hf.token_to_id(s) for s in SPECIALS)
        self.vocab_size = hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def to_hf(self) -> tokenizers.Tokenizer:
        return self.hf


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, show_progress: bool = False) -> HFTokenizer:
    """A byte-level BPE tokenizer of `vocab_size` ids (special tokens first) learnt from `texts` (`show_progress`:
    the tokenizers library's progress bars)."""
    smallest = 256 + len(SPECIALS)
    if vocab_size < smallest:
        raise ValueError(f"BPE vocab_size {vocab_size}: at least {smallest} (256 bytes + {len(SPECIALS)} special tokens)")
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    hf.train_from_iterator(texts, trainer)
    return HFTokenizer(hf)


def load_tokenizer(src: str | Path | TextEncoderConfig) -> Tokenizer:
    """The tokenizer of an encoder config, or of a folder (checkpoint, shards) holding tokenizer.json, or that file."""
    if isinstance(src, TextEncoderConfig):
        if src.tokenizer == "byte":
            return ByteTokenizer()
        if not src.tokenizer_path:
            raise ConfigError("encoder.tokenizer_path: required for tokenizer 'bpe' (make one with `mmeff tokenizer train`)")
        src = src.tokenizer_path
    path = Path(src)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer at {path} (expected a folder holding {TOKENIZER_FILE}, or the file)")
    return HFTokenizer(tokenizers.Tokenizer.from_file(str(file)))


def tokenizer_files(cfg: TextEncoderConfig) -> dict[str, str]:
    """The files a checkpoint of `cfg` carries so that it decodes on its own: {'tokenizer.json': text}."""
    return {TOKENIZER_FILE: load_tokenizer(cfg).to_hf().to_str()}


def doc_mask(docs: torch.Tensor) -> torch.Tensor:
    """Document indices [B, T] -> bool [B, T, T], True where query i may attend key j: j <= i, same document."""
    T = docs.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=docs.device).tril()
    return (docs.unsqueeze(-1) == docs.unsqueeze(-2)) & causal


class TextEncoder(nn.Module):
    """Token ids [B, T] -> embeddings [B, T, D]; an LM head may tie its weight to `embed.weight`."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        trunc_normal_(self.embed.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"TextEncoder expects integer token ids [B, T], got {tuple(tokens.shape)} {tokens.dtype}")
        return self.embed(tokens)


class TextTransform:
    """A text shard sample -> {'tokens', 'docs'}: int64 tensors of `seq_len + 1` ids and document indices."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        self.length = cfg.seq_len + 1

    def _array(self, sample: dict, key: str) -> torch.Tensor:
        array = np.load(io.BytesIO(sample[key]), allow_pickle=False)
        if array.shape[0] < self.length:
            raise ValueError(f"field {key!r} holds {array.shape[0]} tokens, fewer than seq_len + 1 = {self.length}")
        # Longer stored sequences are cut, so shards packed for a long context also serve shorter ones.
        return torch.from_numpy(array[: self.length].astype(np.int64))

    def __call__(self, sample: dict) -> dict[str, torch.Tensor]:
        return {"tokens": self._array(sample, TOKENS_KEY), "docs": self._array(sample, DOCS_KEY)}


def build(cfg: TextEncoderConfig, dim: int) -> TextEncoder:
    """The token embedding of `cfg` with width `dim`."""
    # The derived size is written back so that the exported config rebuilds the model without the tokenizer file.
    cfg.vocab_size = cfg.vocab_size or load_tokenizer(cfg).vocab_size
    return TextEncoder(cfg.vocab_size, dim)


def make_transform(cfg: TextEncoderConfig, train: bool) -> TextTransform:
    """Per-sample decoding of packed token sequences (the same in training and evaluation)."""
    return TextTransform(cfg)
