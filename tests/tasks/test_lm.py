"""The lm task: config checks, loss / perplexity / bits per byte, byte table, and fit -> export -> generate / chat / test."""

import io
import math

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from mmeff import config
from mmeff.cli import main
from mmeff.config import ConfigError
from mmeff.data.text import write_text_shards
from mmeff.encoders.text import TOKENIZER_FILE, ByteTokenizer, train_bpe
from mmeff.tasks import build_model, build_task
from mmeff.tasks.lm import host_facts, token_bytes

TOK = ByteTokenizer()
LM = {
    "encoder": {"name": "text", "seq_len": 32},
    "backbone": {"dim": 32, "pattern": ["attn", "gla"], "mixers": {"attn": {"heads": 2}, "gla": {"heads": 2}}},
    "task": {"name": "lm"},
}


def test_config_is_checked_up_front():
    with pytest.raises(ConfigError, match="encoder.name must be 'text'"):
        build_model(config.parse({**LM, "encoder": {"name": "image"}}))
    with pytest.raises(ConfigError, match="backbone.causal must be true"):
        build_model(config.parse({**LM, "backbone": {**LM["backbone"], "causal": False}}))


def test_tied_and_untied_heads():
    tied = build_model(config.parse(LM))
    untied = build_model(config.parse({**LM, "task": {"name": "lm", "tie_embeddings": False}}))
    assert tied.head.weight is tied.encoder.embed.weight
    assert untied.head.weight is not untied.encoder.embed.weight
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters()) == 260 * 32


def test_byte_table_adds_up_to_the_utf8_length():
    text = "héllo wörld: def f(x): return x  # ünïcode"
    bpe = train_bpe([text] * 10, vocab_size=300)
    for tok in (TOK, bpe):
        table = token_bytes(tok, tok.vocab_size + 3)
        assert int(table[tok.encode(text)].sum()) == len(text.encode("utf-8"))
        assert table[tok.eos_id] == 1 and table[tok.pad_id] == table[tok.mask_id] == table[tok.bos_id] == 0
        assert table[tok.vocab_size :].tolist() == [0, 0, 0]
    assert token_bytes(TOK, TOK.vocab_size, eos_bytes=0)[TOK.eos_id] == 0


def test_uniform_logits_give_ln_v_loss_v_perplexity_and_matching_bpb(tmp_path):
    cfg = config.parse({**LM, "task": {"name": "lm", "tie_embeddings": False}, "run_dir": str(tmp_path)})
    model = build_model(cfg)
    torch.nn.init.zeros_(model.head.weight)  # every logit 0: the uniform distribution over V = 260 ids
    # Targets (tokens[1:]): 'b', <eos>, 'é' (two ids of one byte each), then 3 pads that do not count.
    row = [*TOK.encode("ab"), TOK.eos_id, *TOK.encode("é"), TOK.pad_id, TOK.pad_id, TOK.pad_id]
    tokens = torch.tensor([row, row])
    batch = {"tokens": tokens, "docs": torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]] * 2)}
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(build_task(cfg, model), DataLoader([batch], batch_size=None), verbose=False)[0]
    V = 260
    targets, nbytes = 2 * 4, 2 * 4  # 'b' 1 + <eos> 1 (eos_bytes) + 'é' 2, per row
    assert metrics["val/loss"] == pytest.approx(math.log(V), rel=1e-6)
    assert metrics["val/ppl"] == pytest.approx(V, rel=1e-5)
    assert metrics["val/bpb"] == pytest.approx(targets * math.log(V) / (math.log(2) * nbytes), rel=1e-6)


def test_host_facts_give_the_document_bounds_and_targets_before_the_batch_moves():
    row = [*TOK.encode("ab"), TOK.eos_id, *TOK.encode("cd"), TOK.pad_id]
    batch = {"tokens": torch.tensor([row, row]), "docs": torch.tensor([[0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, 1]])}
    facts = host_facts(batch, TOK.pad_id, bounds=True)
    # The model sees docs[:, :-1]: documents of 3, 2 and 2, 3 tokens over the flattened 2 x 5.
    assert facts["bounds"] == (0, 3, 5, 7, 10) and facts["targets"] == 8
    assert "bounds" not in host_facts(batch, TOK.pad_id, bounds=False)
    model = build_model(config.parse(LM)).eval()
    x, docs = batch["tokens"][:, :-1], batch["docs"][:, :-1]
    torch.testing.assert_close(model(x, docs=docs, bounds=facts["bounds"]), model(x, docs=docs), rtol=0, atol=0)


@pytest.fixture(scope="module")
def text_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    docs = [(f"doc{i}", f"def f{i}(x):\n    return x + {i}\n\nclass C{i}:\n    pass\n" * 3) for i in range(60)]
    write_text_shards(docs, root, seq_len=32, val=0.2, test=0.2)
    return root


def test_fit_exports_tokenizer_then_generate_chat_and_test_run_from_the_export(tmp_path, text_shards, capsys, monkeypatch):
    cfg = {
        **LM,
        "name": "tiny_lm",
        "run_dir": str(tmp_path / "runs" / "${name}"),
        "data": {"root": str(text_shards), "batch_size": 8, "num_workers": 0},
        "trainer": {"max_epochs": 1, "max_steps": 12, "accelerator": "cpu", "enable_progress_bar": False, "logger": "csv"},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
    }
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", str(path)]) == 0
    export = tmp_path / "runs" / "tiny_lm" / "export"
    assert (export / TOKENIZER_FILE).is_file()

    capsys.readouterr()
    assert main(["generate", str(export), "--prompt", "def f", "--max-new-tokens", "8", "--seed", "1", "--top-k", "5"]) == 0
    out = capsys.readouterr()
    assert out.out.endswith("\n") and "tokens/s" in out.err and "prefill 5 tokens" in out.err

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nhow are you\n"))
    assert main(["chat", str(export), "--max-new-tokens", "6", "--greedy"]) == 0
    assert len(capsys.readouterr().out.splitlines()) >= 2  # one reply per turn, then EOF ends it

    assert main(["test", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert {line.split(":")[0] for line in lines} >= {"test/loss", "test/ppl", "test/bpb"}
