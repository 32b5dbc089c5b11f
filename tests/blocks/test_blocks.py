"""Channel mixers and norms build and run forward and backward at two sizes (token mixers: test_mixer_harness.py)."""

import pytest
import torch

from mmeff import blocks
from mmeff.backbone import Backbone, expand_pattern
from mmeff.config import BackboneConfig


@pytest.mark.parametrize("name", blocks.names("ffn") + blocks.names("norm"))
@pytest.mark.parametrize("dim, T", [(32, 5), (64, 33)])
def test_forward_backward(name, dim, T):
    torch.manual_seed(0)
    kind = blocks.entry(name).kind
    block = blocks.build(name, dim)
    x = torch.randn(2, T, dim, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    trained = [p for p in block.parameters() if p.requires_grad]
    assert trained and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained), kind


@pytest.mark.parametrize("name", ["attn", "sliding", "gla", "mamba2"])
def test_block_compiles(name):
    # torch.compile traces each block (dynamo + AOT autograd; "aot_eager" skips inductor's code generation):
    # the outputs and input gradients match the eager block.
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = blocks.build(name, 32)
    x = torch.randn(2, 16, 32, requires_grad=True)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=False)
    y, y_ref = compiled(x), block(x)
    (grad,), (grad_ref,) = torch.autograd.grad(y.sum(), x), torch.autograd.grad(y_ref.sum(), x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(grad, grad_ref)


@pytest.mark.parametrize("options", [{"heads": 4}, {"heads": 4, "kv_heads": 1}, {"heads": 4, "kv_heads": 2, "qk_norm": True}])
def test_attention_decode_equals_forward(options):
    torch.manual_seed(0)
    layer = blocks.build("attn", 32, **options).eval()
    x = torch.randn(2, 11, 32)
    full = layer(x)
    cache = blocks.Cache()
    steps = [layer(x[:, :4], cache)] + [layer(x[:, i : i + 1], cache) for i in range(4, 8)] + [layer(x[:, 8:], cache)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.offset == 11 and cache["k"].shape[2] == 11


def test_attention_causality():
    layer = blocks.build("attn", 32, causal=True)
    bi = blocks.build("attn", 32, causal=False)
    x = torch.randn(1, 8, 32)
    x2 = x.clone()
    x2[:, -1] += 1
    assert torch.allclose(layer(x)[:, :-1], layer(x2)[:, :-1], atol=1e-6)
    assert not torch.allclose(bi(x)[:, :-1], bi(x2)[:, :-1], atol=1e-6)


def test_pattern_expansion_and_backbone_cache():
    assert expand_pattern(["attn*2", "mlp"]) == ["attn", "attn", "mlp"]
    assert expand_pattern(["a", "b"], depth=5) == ["a", "b", "a", "b", "a"]
    bb = Backbone(BackboneConfig(dim=32, pattern=["attn"], depth=3, mixers={"attn": {"heads": 2}})).eval()
    x = torch.randn(2, 9, 32)
    cache = bb.new_cache()
    out = torch.cat([bb(x[:, :5], cache), bb(x[:, 5:6], cache), bb(x[:, 6:], cache)], 1)
    torch.testing.assert_close(out, bb(x), atol=1e-5, rtol=1e-5)


def test_alias_mixer_with_type():
    bb = Backbone(BackboneConfig(dim=32, pattern=["local", "attn"], mixers={"local": {"type": "attn", "heads": 8}}))
    assert bb.layers[0].mixer.heads == 8 and bb.layers[1].mixer.heads == 4


def test_backbone_rejects_wrong_width():
    bb = Backbone(BackboneConfig(dim=32))
    with pytest.raises(ValueError, match=r"tokens \[B, T, 32\], got \(2, 4, 16\)"):
        bb(torch.randn(2, 4, 16))


def test_ssm_backend_option(monkeypatch):
    # `backend` reaches mmeff.ops, and a bad one fails when the block is built.
    from mmeff import ops
    from mmeff.config import ConfigError

    seen = []
    for op in ("ssd", "selective_scan"):
        original = getattr(ops, op)
        monkeypatch.setattr(ops, op, lambda *a, _f=original, **kw: seen.append(kw["backend"]) or _f(*a, **kw))
    x = torch.randn(1, 9, 32)
    for name in ("mamba", "mamba2"):
        assert blocks.build(name, 32, backend="torch")(x).shape == x.shape
        with pytest.raises(ConfigError, match="backend must be"):
            blocks.build(name, 32, backend="cuda")
    assert seen == ["torch", "torch"]
