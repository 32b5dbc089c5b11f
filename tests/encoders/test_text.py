"""Text tokenizers (byte, BPE), their folders and checkpoint files, the embedding, the document mask."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmeff.cli import main
from mmeff.config import ConfigError
from mmeff.encoders.text import (
    SPECIALS,
    ByteTokenizer,
    TextEncoderConfig,
    build,
    doc_mask,
    load_tokenizer,
    tokenizer_files,
    train_bpe,
)

# Ordinary text that also spells out the special tokens, which must still be encoded as text.
TEXT = st.text() | st.lists(st.sampled_from([*SPECIALS, "a", " ", "é", "\n"])).map("".join)
CORPUS = ["the quick brown fox jumps over the lazy dog", "def tokenize(text): return text.split()", "héllo wörld"] * 20


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, vocab_size=300)


@settings(deadline=None)  # the CPUs may be shared
@given(TEXT)
def test_byte_round_trip_without_specials(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert not tok.special_ids & set(ids)
    assert tok.decode(ids) == text


def test_byte_decode_is_robust_and_can_spell_specials():
    tok = ByteTokenizer()
    assert tok.decode([0xFF, ord("h"), 0xE2, 0x82]) == "\ufffdh\ufffd"
    ids = [tok.bos_id, *b"hi", tok.eos_id, tok.mask_id, tok.vocab_size + 5]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special=False) == "<bos>hi<eos><mask>"
    assert (tok.vocab_size, tok.pad_id) == (260, 256)


@settings(max_examples=50, deadline=None)
@given(TEXT)
def test_saved_byte_tokenizer_is_a_hugging_face_file_with_the_same_ids(tmp_path_factory, text):
    folder = tmp_path_factory.mktemp("byte")
    ByteTokenizer().save(folder)
    loaded = load_tokenizer(folder)
    assert loaded.encode(text) == list(text.encode("utf-8"))
    assert (loaded.vocab_size, loaded.eos_id, loaded.mask_id) == (260, 258, 259)


@settings(max_examples=50, deadline=None)
@given(TEXT)
def test_bpe_round_trip_without_specials(bpe, text):
    ids = bpe.encode(text)
    assert not bpe.special_ids & set(ids)
    assert bpe.decode(ids) == text


def test_bpe_learns_merges_and_reloads_from_a_folder(bpe, tmp_path):
    assert 260 < bpe.vocab_size <= 300 and [bpe.pad_id, bpe.bos_id, bpe.eos_id, bpe.mask_id] == [0, 1, 2, 3]
    assert len(bpe.encode("the quick brown fox")) < len("the quick brown fox")
    loaded = load_tokenizer(bpe.save(tmp_path).parent)
    for text in [*CORPUS[:3], "unseen ✓ text"]:
        assert loaded.encode(text) == bpe.encode(text)
    assert bpe.decode([bpe.eos_id, *bpe.encode("x")], skip_special=False) == "<eos>x"


def test_config_tokenizers_and_checkpoint_files(bpe, tmp_path):
    assert isinstance(load_tokenizer(TextEncoderConfig()), ByteTokenizer)
    bpe.save(tmp_path / "tok")
    cfg = TextEncoderConfig(tokenizer="bpe", tokenizer_path=str(tmp_path / "tok"))
    files = tokenizer_files(cfg)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "tokenizer.json").write_text(files["tokenizer.json"])
    assert load_tokenizer(tmp_path / "ckpt").encode("quick fox") == bpe.encode("quick fox")
    with pytest.raises(ConfigError, match="tokenizer_path"):
        load_tokenizer(TextEncoderConfig(tokenizer="bpe"))
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path / "missing")


def test_embedding_size_comes_from_the_tokenizer_and_is_recorded(bpe, tmp_path):
    bpe.save(tmp_path)
    cfg = TextEncoderConfig(tokenizer="bpe", tokenizer_path=str(tmp_path))
    enc = build(cfg, dim=16)
    assert enc.embed.weight.shape == (bpe.vocab_size, 16) and cfg.vocab_size == bpe.vocab_size
    assert enc(torch.tensor([[1, 2, 3]])).shape == (1, 3, 16)
    assert build(TextEncoderConfig(vocab_size=512), dim=8).embed.weight.shape == (512, 8)
    with pytest.raises(ValueError, match="integer token ids"):
        enc(torch.zeros(1, 3, 16))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=12), min_size=1, max_size=3))
def test_doc_mask_is_block_diagonal_causal(rows):
    T = max(len(r) for r in rows)
    docs = torch.tensor([sorted(r + [r[-1]] * (T - len(r))) for r in rows])
    mask = doc_mask(docs)
    assert mask.shape == (len(rows), T, T) and mask.dtype == torch.bool
    for b in range(len(rows)):
        runs = torch.unique_consecutive(docs[b], return_counts=True)[1].tolist()
        expected = torch.block_diag(*[torch.ones(n, n).tril() for n in runs]).bool()
        assert torch.equal(mask[b], expected)


def test_cli_trains_a_tokenizer_from_text(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text("\n".join(CORPUS))
    args = ["tokenizer", "train", str(tmp_path / "corpus.txt"), "--vocab-size", "280", "--out", str(tmp_path / "tok")]
    assert main(args) == 0
    assert "BPE tokenizer written to" in capsys.readouterr().out
    assert load_tokenizer(tmp_path / "tok").vocab_size == 280
