"""Packed documents and prefix-LM masking reach every softmax-attention mixer through the backbone."""

import pytest
import torch

from mmeff import blocks
from mmeff.backbone import Backbone
from mmeff.blocks import Layout
from mmeff.config import BackboneConfig

ATTENTION = ["attn", "sliding", "longformer", "mla", "moh", "block_topk"]


@pytest.mark.parametrize("name", ATTENTION)
@pytest.mark.parametrize("engine", ["reference", "flex"])
def test_documents_do_not_see_each_other(name, engine, monkeypatch):
    monkeypatch.setenv("MMEFF_ATTENTION", engine)
    torch.manual_seed(0)
    mixer = blocks.build(name, 32, causal=True).eval()
    x = torch.randn(2, 12, 32)
    docs = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    packed = mixer(x, layout=Layout(docs=docs))
    # Each document equals that document run alone (positions restart in each document).
    torch.testing.assert_close(packed[0, :5], mixer(x[:1, :5])[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[0, 5:], mixer(x[:1, 5:])[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[1], mixer(x[1:])[0], atol=1e-5, rtol=1e-4)
    changed = x.clone()
    changed[0, :5] += 1.0
    torch.testing.assert_close(mixer(changed, layout=Layout(docs=docs))[0, 5:], packed[0, 5:], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["attn", "mla", "sliding"])
def test_prefix_is_bidirectional_and_text_causal(name):
    torch.manual_seed(0)
    mixer = blocks.build(name, 32, causal=True).eval()
    x = torch.randn(1, 10, 32)
    out = mixer(x, layout=Layout(prefix=4))
    later_prefix = x.clone()
    later_prefix[0, 3] += 1.0
    assert not torch.allclose(mixer(later_prefix, layout=Layout(prefix=4))[0, 0], out[0, 0], atol=1e-6)  # prefix sees forward
    later_text = x.clone()
    later_text[0, 8] += 1.0
    torch.testing.assert_close(mixer(later_text, layout=Layout(prefix=4))[0, :8], out[0, :8], atol=1e-6, rtol=1e-5)  # text stays causal


def test_prefix_prefill_then_decode_equals_forward():
    torch.manual_seed(0)
    bb = Backbone(BackboneConfig(dim=32, pattern=["attn", "gla"])).eval()
    x = torch.randn(1, 9, 32)
    full = bb(x, layout=Layout(prefix=4))
    cache = bb.new_cache()
    steps = [bb(x[:, :6], cache=cache, layout=Layout(prefix=4))] + [bb(x[:, i : i + 1], cache=cache) for i in range(6, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


def test_docs_with_cache_is_an_error():
    mixer = blocks.build("attn", 16)
    with pytest.raises(ValueError, match="docs"):
        mixer(torch.randn(1, 3, 16), cache=blocks.Cache(), layout=Layout(docs=torch.zeros(1, 3, dtype=torch.long)))
