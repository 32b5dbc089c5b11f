"""Text shards: documents -> token ids + <eos> -> packed `seq_len + 1` sequences with per-token document indices."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmeff import config
from mmeff.config import ConfigError, RunConfig
from mmeff.data.shards import INDEX, write_shards
from mmeff.encoders.text import DOCS_KEY, TOKENIZER_FILE, TOKENS_KEY, ByteTokenizer, TextEncoderConfig, Tokenizer, load_tokenizer

logger = logging.getLogger("mmeff.data")

TEXT_SUFFIXES = (".txt", ".md", ".rst")
SPLITS = ("train", "val", "test")


def read_documents(src: str | Path) -> Iterator[tuple[str, str]]:
    """(name, text) of each document: a text file is one, a JSONL line `{"text": ...}` one; folders in sorted order."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"no text file or folder at {src}")
    files = sorted(p for p in src.rglob("*") if p.suffix in (*TEXT_SUFFIXES, ".jsonl")) if src.is_dir() else [src]
    for file in files:
        name = file.relative_to(src).as_posix() if src.is_dir() else file.name
        if file.suffix != ".jsonl":
            yield name, file.read_text(encoding="utf-8")
            continue
        with file.open(encoding="utf-8") as lines:
            for n, line in enumerate(lines, 1):
                if line.strip():
                    row = json.loads(line)
                    if "text" not in row:
                        raise ValueError(f"{file}:{n}: a JSONL document needs a 'text' field")
                    yield str(row.get("id", f"{name}:{n}")), row["text"]


def split_of(name: str, val: float = 0.05, test: float = 0.05) -> str:
    """The split of document `name`: a stable hash of the name puts `val` of documents in val, `test` in test."""
    u = int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "big") / 2**64
    return "val" if u < val else "test" if u < val + test else "train"


def pack(
    docs: Sequence[Sequence[int]], seq_len: int, eos_id: int, pad_id: int, dtype: Any = np.int64
) -> tuple[np.ndarray, np.ndarray]:
    """Documents, each + <eos>, cut into rows of `seq_len + 1`, the last padded: (tokens, docs), both [N, seq_len + 1].

    `docs` numbers the documents of each row from 0 (a document carried over from the previous row is 0);
    the padding is one more document of its own.
    """
    width = seq_len + 1
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    body = np.concatenate([np.asarray(d, dtype=dtype) for d in docs]) if len(docs) else np.zeros(0, dtype)
    stream = np.insert(body, np.cumsum(lengths), eos_id)
    rows = -(-len(stream) // width)
    tokens = np.full(rows * width, pad_id, dtype=dtype)
    tokens[: len(stream)] = stream
    doc = np.full(rows * width, len(docs), dtype=np.int64)
    doc[: len(stream)] = np.repeat(np.arange(len(docs)), lengths + 1)
    doc = doc.reshape(rows, width)
    return tokens.reshape(rows, width), (doc - doc[:, :1]).astype(np.uint16)


def unpack(rows: Iterable[np.ndarray], eos_id: int) -> Iterator[np.ndarray]:
    """The documents (ids without their <eos>) of packed rows in order; trailing padding is dropped."""
    pending: list[np.ndarray] = []
    for row in rows:
        start = 0
        for end in np.flatnonzero(row == eos_id):
            yield np.concatenate([*pending, row[start:end]])
            pending, start = [], end + 1
        pending.append(row[start:])


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_text_shards(
    documents: Iterable[tuple[str, str]],
    out_dir: str | Path,
    tokenizer: Tokenizer | None = None,
    seq_len: int = 256,
    val: float = 0.05,
    test: float = 0.05,
    maxcount: int = 1000,
) -> dict[str, int]:
    """Tokenize, split by document name, pack and write `tokens.npy` / `docs.npy` samples (+ tokenizer.json)."""
    tokenizer = tokenizer or ByteTokenizer()
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    texts: dict[str, list[str]] = {s: [] for s in SPLITS}
    for name, text in documents:
        texts[split_of(name, val, test)].append(text)
    empty = [s for s in SPLITS if not texts[s]]
    if empty:
        raise ValueError(f"no documents in split(s) {', '.join(empty)}: give more documents or larger val/test fractions")
    packed = {
        s: pack(tokenizer.encode_batch(texts[s]), seq_len, tokenizer.eos_id, tokenizer.pad_id, dtype) for s in SPLITS
    }
    tokens = {s: int((packed[s][0] != tokenizer.pad_id).sum()) for s in SPLITS}
    out_dir = Path(out_dir)
    tokenizer.save(out_dir)
    meta = {
        "seq_len": seq_len,
        "tokenizer": _record(tokenizer),
        "vocab_size": tokenizer.vocab_size,
        "tokens": tokens,
        "documents": {s: len(texts[s]) for s in SPLITS},
    }
    for split, (rows, ids) in packed.items():
        samples = ({"__key__": f"{i:07d}", TOKENS_KEY: _npy(t), DOCS_KEY: _npy(d)} for i, (t, d) in enumerate(zip(rows, ids)))
        write_shards(samples, out_dir, split, maxcount=maxcount, meta=meta, total=len(rows))
    logger.info("tokens per split: %s", " ".join(f"{s}={n}" for s, n in tokens.items()))
    return {s: len(packed[s][0]) for s in SPLITS}


def _record(tokenizer: Tokenizer) -> dict[str, str]:
    """What `index.json` records of the tokenizer that wrote the shards (a saved byte tokenizer is still 'byte')."""
    sha = tokenizer.fingerprint
    return {"name": "byte" if sha == ByteTokenizer().fingerprint else "bpe", "sha256": sha}


def check_shard_tokenizer(cfg: RunConfig) -> None:
    """Raise a ConfigError when the text shards of `cfg.data.root` were written with another tokenizer than
    `cfg.encoder`'s: the model would learn ids that do not mean what its tokenizer reads."""
    enc = cfg.encoder
    if not isinstance(enc, TextEncoderConfig):
        return
    root = Path(cfg.data.root)
    index = json.loads((root / INDEX).read_text()) if (root / INDEX).is_file() else {}
    written = index.get("meta", {}).get("tokenizer")
    if written is None and (root / TOKENIZER_FILE).is_file():  # shards from before the index recorded it
        written = _record(load_tokenizer(root))
    own = _record(load_tokenizer(enc))
    source = cfg.data.source or "text -o src=YOUR_TEXT"
    rewrite = f"mmeff shards --source {source}" + (f" -o tokenizer={enc.tokenizer_path}" if own["name"] != "byte" else "") + f" {root}"
    if written is None:
        if not index and cfg.data.source and own["name"] != "byte":
            raise ConfigError(
                f"data.root {root} has no shards yet, and data.source {cfg.data.source!r} would write them with the byte "
                f"tokenizer while encoder.tokenizer is {own['name']!r}; write them with it first: {rewrite}"
            )
        return
    if written["sha256"] != own["sha256"]:
        raise ConfigError(
            f"{root}: its shards were written with the {written['name']} tokenizer (sha256 {written['sha256'][:12]}), but "
            f"encoder.tokenizer is {own['name']}"
            + (f" from {enc.tokenizer_path}" if enc.tokenizer_path and own["name"] != "byte" else "")
            + f" (sha256 {own['sha256'][:12]}); rewrite the shards with the encoder's tokenizer: {rewrite}"
            + " (or set encoder.tokenizer to the shards' tokenizer)"
        )


def shard_texts(shards: Iterable[str | Path], tokenizer: Tokenizer) -> Iterator[str]:
    """The documents of text shards written in order by `write_text_shards`, decoded with `tokenizer`."""

    def rows() -> Iterator[np.ndarray]:
        for shard in shards:
            with tarfile.open(shard) as tar:
                for member in tar:
                    if member.name.endswith(f".{TOKENS_KEY}"):
                        yield np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)

    return (tokenizer.decode(doc.tolist()) for doc in unpack(rows(), tokenizer.eos_id))


def training_texts(src: str | Path) -> Iterator[str]:
    """Text to learn a tokenizer from: the train shards of a run config or of a shard folder, or text/JSONL files."""
    from mmeff.data.pipeline import find_shards  # imports Lightning: only for shard folders

    path = Path(src)
    if path.suffix in (".yaml", ".yml"):
        data = config.load(path).data
    elif path.is_dir() and any(path.glob("*.tar")):
        data = config.DataConfig(root=str(path))
    else:
        return (text for _, text in read_documents(path))
    return shard_texts(find_shards(data, "train"), load_tokenizer(data.root))
