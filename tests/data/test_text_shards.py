"""Text shards: packing keeps documents apart and loses nothing; python-docs is deterministic and split by
document; shards round-trip through make_loader and back to text."""

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mmeff.config import DataConfig
from mmeff.data import build_shards, make_loader
from mmeff.data.sources import python_docs
from mmeff.data.text import SPLITS, pack, read_documents, shard_texts, split_of, training_texts, unpack, write_text_shards
from mmeff.encoders.text import ByteTokenizer, TextEncoderConfig, load_tokenizer, make_transform, train_bpe

EOS, PAD = 100, 101
DOCS = [(f"doc{i}", "lorem ipsum " * i + "é✓") for i in range(40)]


def _split_texts(docs, split, fraction=0.2):
    return [text for name, text in docs if split_of(name, fraction, fraction) == split]


@settings(deadline=None)  # the CPUs may be shared
@given(st.lists(st.lists(st.integers(0, 99), max_size=20), max_size=8), st.integers(1, 16))
def test_pack_keeps_every_token_and_the_document_boundaries(docs, seq_len):
    tokens, ids = pack(docs, seq_len, EOS, PAD)
    stream = [t for d in docs for t in [*d, EOS]]
    flat = tokens.reshape(-1).tolist()
    assert tokens.shape[1:] == (seq_len + 1,) and ids.shape == tokens.shape
    assert flat[: len(stream)] == stream and set(flat[len(stream) :]) <= {PAD} and len(flat) - len(stream) <= seq_len
    for row, doc in zip(tokens, ids):
        assert doc[0] == 0
        assert np.array_equal(np.diff(doc.astype(int)), row[:-1] == EOS)  # a new document exactly after each <eos>
    assert [d.tolist() for d in unpack(tokens, EOS)] == docs


def test_read_documents_from_text_and_jsonl(tmp_path):
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": "x"}\n')
    assert list(read_documents(tmp_path)) == [("b.txt", "bee"), ("sub/a.jsonl:1", "one"), ("x", "two")]
    (tmp_path / "bad.jsonl").write_text('{"body": 1}\n')
    with pytest.raises(ValueError, match="'text' field"):
        list(read_documents(tmp_path / "bad.jsonl"))


def test_python_docs_is_deterministic_and_split_by_document(tmp_path):
    options = dict(max_docs=30, seq_len=64, val=0.2, test=0.2)
    counts = [build_shards(None, tmp_path / run, source="python-docs", **options) for run in ("a", "b")]
    assert counts[0] == counts[1] and all(counts[0][s] > 0 for s in SPLITS)
    for name in ("index.json", "train-000000.tar", "tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    docs = list(python_docs.documents(max_docs=30))
    assert len({name for name, _ in docs}) == 30 and docs[0][1].startswith(f"Module {docs[0][0]}")
    for split in SPLITS:  # every document is in exactly one split, whole and in order
        shards = sorted((tmp_path / "a").glob(f"{split}-*.tar"))
        assert list(shard_texts(shards, ByteTokenizer())) == _split_texts(docs, split)


def test_python3_doc_pages(tmp_path, monkeypatch):
    monkeypatch.setattr(python_docs, "PYTHON3_DOC", str(tmp_path / "python3*" / "html" / "_sources"))
    with pytest.raises(FileNotFoundError, match="python3-doc"):
        list(python_docs.documents("python3-doc"))
    pages = tmp_path / "python3.11" / "html" / "_sources" / "library"
    pages.mkdir(parents=True)
    (pages / "json.rst.txt").write_text("json")
    (pages / "ast.rst.txt").write_text("ast")
    assert list(python_docs.documents("python3-doc")) == [("library/ast.rst.txt", "ast"), ("library/json.rst.txt", "json")]


def test_text_shards_through_make_loader_and_back_to_text(tmp_path):
    counts = write_text_shards(DOCS, tmp_path, seq_len=16, val=0.2, test=0.2, maxcount=8)
    cfg = DataConfig(root=str(tmp_path), batch_size=4, num_workers=0)
    batches = list(make_loader(cfg, "val", make_transform(TextEncoderConfig(seq_len=16), train=False), train=False))
    tokens, docs = (torch.cat([b[key] for b in batches]) for key in ("tokens", "docs"))
    tok = ByteTokenizer()
    expected = pack([tok.encode(t) for t in _split_texts(DOCS, "val")], 16, tok.eos_id, tok.pad_id)
    assert tokens.dtype == docs.dtype == torch.int64 and len(tokens) == counts["val"]
    assert np.array_equal(tokens.numpy(), expected[0]) and np.array_equal(docs.numpy(), expected[1])

    short = make_transform(TextEncoderConfig(seq_len=8), train=True)  # a shorter context from the same shards
    batch = next(iter(make_loader(cfg, "train", short, train=True)))
    assert batch["tokens"].shape == batch["docs"].shape == (4, 9)

    config = tmp_path / "run.yaml"
    run = {"data": {"root": str(tmp_path)}, "encoder": {"name": "text"}, "task": {"name": "classify"}}
    config.write_text(yaml.safe_dump(run))
    assert list(training_texts(tmp_path)) == list(training_texts(config)) == _split_texts(DOCS, "train")


def test_bpe_shards_store_their_tokenizer(tmp_path):
    bpe = train_bpe((text for _, text in DOCS), vocab_size=300)
    write_text_shards(DOCS, tmp_path, bpe, seq_len=16, val=0.2, test=0.2)
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode("lorem ipsum") == bpe.encode("lorem ipsum") and len(bpe.encode("lorem ipsum")) < 11
    assert list(shard_texts(sorted(tmp_path.glob("test-*.tar")), loaded)) == _split_texts(DOCS, "test")
