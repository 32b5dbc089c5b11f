"""mmeff -> Hugging Face: an attn LM as a Llama folder that transformers loads with the same logits."""

import pytest
import torch

from mmeff import checkpoint, config
from mmeff.cli import main
from mmeff.tasks import build_model

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


def _lm(tmp_path, attn: dict, tie: bool, ffn_bias: bool = False, pattern=("attn",)):
    torch.manual_seed(0)
    cfg = config.parse(
        {
            "encoder": {"name": "text", "seq_len": 64},
            "backbone": {
                "dim": 32, "pattern": list(pattern), "depth": 2, "norm_eps": 1e-5, "mixers": {p: attn for p in pattern},
                "ffn_options": {"bias": ffn_bias},
            },
            "task": {"name": "lm", "tie_embeddings": tie},
        }
    )
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # norm weights away from 1, biases away from 0
    return checkpoint.export(model, cfg, tmp_path / "mm"), model


@pytest.mark.parametrize("tie,bias", [(True, False), (False, True)])
def test_to_hf_loads_in_transformers_with_equal_logits(tmp_path, tie, bias):
    src, model = _lm(tmp_path, {"heads": 4, "kv_heads": 2, "rope_base": 500.0, "bias": bias}, tie, ffn_bias=bias)
    assert main(["convert", "to-hf", str(src), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, 256, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-5, rtol=1e-4)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer("def f").input_ids == list(b"def f") and tokenizer.eos_token == "<eos>"


def test_to_hf_names_what_llama_cannot_hold(tmp_path, capsys):
    src, _ = _lm(tmp_path, {"heads": 2}, True, pattern=("gla",))
    assert main(["convert", "to-hf", str(src), str(tmp_path / "hf")]) == 2
    assert "Llama has softmax attention (attn) only" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
