"""Sparse attention mixers: forward/backward, decode == forward, bounded caches, selection, engine parity."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mmeff import blocks
from mmeff.backbone import Backbone
from mmeff.blocks.sparse import BlockTopK
from mmeff.config import BackboneConfig

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

SPARSE = {
    "sliding": {"window": 6},
    "dilated": {"window": [4, None], "dilation": [1, 3]},
    "longformer": {"window": 6, "global_tokens": 2},
    "bigbird": {"window": 4, "global_tokens": 1, "block": 4, "random_blocks": 2},
    "block_topk": {"block": 4, "topk": 2},
    "block_topk_shared": {"block": 4, "topk": 2, "query_block": 8},
    "sink": {"sinks": 2, "window": 6},
}
BIDIRECTIONAL = {n: o for n, o in SPARSE.items() if n != "sink"}


CASES = [pytest.param(n, True, id=f"{n}-causal") for n in sorted(SPARSE)] + [
    pytest.param(n, False, id=f"{n}-bidir") for n in sorted(BIDIRECTIONAL)
]


def build(name: str, causal: bool = True, dim: int = 32, heads: int = 4, **extra) -> torch.nn.Module:
    options = {**SPARSE[name], **extra}
    return blocks.build(name.removesuffix("_shared"), dim, causal=causal, heads=heads, **options)


@pytest.mark.parametrize("name, causal", CASES)
def test_forward_backward(name, causal):
    torch.manual_seed(0)
    layer = build(name, causal)
    x = torch.randn(2, 23, 32, requires_grad=True)
    y = layer(x)
    y.square().mean().backward()
    assert y.shape == x.shape and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in layer.parameters())


def decode(layer: torch.nn.Module, x: torch.Tensor, prefill: int, chunk_at: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """Prefill, then one token a step (and one multi-token chunk at `chunk_at`); outputs and cache bytes per step."""
    cache, sizes = blocks.Cache(), []
    outs = [layer(x[:, :prefill], cache)]
    t = prefill
    while t < x.shape[1]:
        step = 9 if t == chunk_at else 1
        outs.append(layer(x[:, t : t + step], cache))
        sizes.append(cache.nbytes())
        t += step
    assert cache.offset == x.shape[1]
    return torch.cat(outs, 1), sizes


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_decode_equals_forward(name):
    torch.manual_seed(0)
    layer = build(name).eval()
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        out, _ = decode(layer, x, prefill=5, chunk_at=20)  # the 9-token chunk overruns the window of 6
        torch.testing.assert_close(out, layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, held", [("sliding", 6), ("sink", 2 + 6), ("longformer", 2 + 6)])
def test_cache_is_bounded(name, held):
    torch.manual_seed(0)
    layer = build(name).eval()
    x = torch.randn(1, 60, 32)
    with torch.no_grad():
        out, sizes = decode(layer, x, prefill=3)
        torch.testing.assert_close(out, layer(x), atol=1e-5, rtol=1e-5)
    per_token = 2 * layer.kv_heads * layer.head_dim * 4  # k and v, fp32
    assert max(sizes) == held * per_token and sizes[-1] == held * per_token
    assert sizes.index(max(sizes)) == held - 3 - 1  # full once `held` tokens were seen, then constant


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_causal(name):
    torch.manual_seed(0)
    layer = build(name)
    x = torch.randn(1, 30, 32)
    y = x.clone()
    y[:, 17:] += torch.randn(1, 13, 32)
    torch.testing.assert_close(layer(x)[:, :17], layer(y)[:, :17], atol=1e-6, rtol=1e-6)


def test_sliding_window_is_local_both_ways():
    torch.manual_seed(0)
    layer = build("sliding", causal=False)  # centred: sees 3 positions on either side
    x = torch.randn(1, 30, 32)
    y = x.clone()
    y[:, 20] += 1.0
    moved = (layer(x) - layer(y)).abs().amax(-1)[0]
    assert (moved[17:24] > 0).all() and (moved[:17] == 0).all() and (moved[24:] == 0).all()


def test_sink_runs_attn_weights_and_matches_it_while_the_window_spans_the_sequence():
    torch.manual_seed(0)
    attn = blocks.build("attn", 32, heads=4)
    sink = build("sink")
    sink.load_state_dict(attn.state_dict())
    x = torch.randn(2, 20, 32)
    torch.testing.assert_close(sink(x[:, :8]), attn(x[:, :8]), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(sink(x)[:, 8:], attn(x)[:, 8:], atol=1e-3)


def test_a_full_attention_backbone_streams_with_sinks_in_bounded_memory():
    torch.manual_seed(0)
    cfg = BackboneConfig(dim=32, pattern=["attn"], depth=2, mixers={"attn": {"heads": 4}})
    streaming = Backbone(replace(cfg, pattern=["sink"], mixers={"sink": {"heads": 4, "sinks": 2, "window": 6}})).eval()
    streaming.load_state_dict(Backbone(cfg).state_dict())  # strict: the same weights
    x = torch.randn(1, 40, 32)
    cache = streaming.new_cache()
    with torch.no_grad():
        out = torch.cat([streaming(x[:, t : t + 1], cache) for t in range(40)], 1)
        torch.testing.assert_close(out, streaming(x), atol=1e-5, rtol=1e-5)
    assert [c.nbytes() for c in cache] == [8 * 2 * 32 * 4] * 2  # 2 sinks + 6 recent tokens of k and v, fp32


def test_sliding_with_a_spanning_window_is_attn():
    torch.manual_seed(0)
    attn = blocks.build("attn", 32, heads=4)
    for causal in (True, False):
        sliding = blocks.build("sliding", 32, heads=4, window=64, causal=causal)
        attn.causal = causal
        sliding.load_state_dict(attn.state_dict())
        x = torch.randn(2, 20, 32)
        torch.testing.assert_close(sliding(x), attn(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_block_topk_selects_its_own_block_and_topk_others(causal):
    torch.manual_seed(0)
    layer: BlockTopK = build("block_topk", causal)
    q, k = torch.randn(2, 4, 37, 8), torch.randn(2, 4, 37, 8)
    pos = torch.arange(37)
    chosen = layer.select(layer.gates(q, 0), k, 0, 37)  # [B, H, T, blocks]
    own = pos // layer.block
    assert chosen[..., torch.arange(37), own].all()
    competitors = own if causal else torch.full_like(own, chosen.shape[-1] - 1)
    expected = (1 + competitors.clamp(max=layer.topk)).expand(2, 4, 37)
    if causal:
        expected = expected + (chosen.shape[-1] - 1 - own)  # the later blocks count as own; the causal mask hides them
    assert torch.equal(chosen.sum(-1), expected)


@pytest.mark.parametrize("causal", [True, False])
def test_block_topk_query_groups_share_one_selection(causal):
    # Groups of 8 queries over blocks of 4: each group sees the blocks it spans and topk of the others,
    # chosen by its first query (causal) or its mean query (bidirectional).
    torch.manual_seed(0)
    layer: BlockTopK = build("block_topk", causal, query_block=8)
    q, k = torch.randn(2, 4, 37, 8), torch.randn(2, 4, 37, 8)
    gates = layer.gates(q, 0)
    assert gates.shape == (2, 4, 5, 8)
    expected_gate = q[:, :, ::8] if causal else torch.stack([q[:, :, i : i + 8].mean(2) for i in range(0, 37, 8)], 2)
    torch.testing.assert_close(gates, expected_gate)
    chosen = layer.select(gates, k, 0, 37)
    for row in range(5):
        spanned = torch.arange(chosen.shape[-1])
        spanned = (spanned >= 2 * row) if causal else (spanned >= 2 * row) & (spanned <= min(2 * row + 1, 9))
        assert chosen[:, :, row, spanned].all()
        others = int((~spanned & (torch.arange(chosen.shape[-1]) < 2 * row if causal else ~spanned)).sum())
        assert torch.equal(chosen[:, :, row, ~spanned].sum(-1), torch.full((2, 4), min(layer.topk, others)))


def test_block_topk_picks_the_block_holding_the_matching_key():
    layer: BlockTopK = blocks.build("block_topk", 8, heads=1, block=4, topk=1)
    k = torch.randn(1, 1, 32, 8) * 0.1
    k[0, 0, 9] = 5 * torch.ones(8)  # block 2 stands out for a query along ones
    q = torch.ones(1, 1, 1, 8)
    chosen = layer.select(q, k, 31, 1)
    assert chosen[0, 0, 0].nonzero().flatten().tolist() == [2, 7]


def test_options_are_checked():
    with pytest.raises(ValueError, match="query_block is a number"):
        blocks.build("block_topk", 32, query_block=True)
    with pytest.raises(ValueError, match="sink is a causal"):
        blocks.build("sink", 32, causal=False)
    with pytest.raises(ValueError, match="window must be >= 1"):
        blocks.build("sliding", 32, window=0)


@pytest.mark.parametrize("name, causal", [c for c in CASES if c.values[0] in ("bigbird", "block_topk", "block_topk_shared", "dilated")])
def test_flex_engine_matches_reference(name, causal, monkeypatch):
    """FlexAttention (eager on CPU) and the dense reference agree on the mixers with tables, selections or per-head masks.

    (Eager FlexAttention applies the mask predicate everywhere; block-mask coverage is tested in tests/ops/test_masks.py.)
    """
    torch.manual_seed(0)
    layer = build(name, causal)
    x = torch.randn(2, 130, 32, requires_grad=True)
    results = []
    for engine in ("reference", "flex"):
        monkeypatch.setenv("MMEFF_ATTENTION", engine)
        x.grad = None
        y = layer(x)
        y.square().mean().backward()
        results.append((y, x.grad))
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=1e-5)


CUDA_CASES = [c for c in CASES if c.values[1] or c.values[0] in ("longformer", "block_topk_shared")]  # each compiles its own kernels


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name, causal", CUDA_CASES)
def test_cuda_flex_matches_reference(name, causal, monkeypatch):
    """Compiled FlexAttention on CUDA (bf16, lengths off the 128 tile) against the dense reference."""
    torch.manual_seed(0)
    options = SPARSE[name]
    larger = {key: value for key, value in (("window", 100), ("block", 64)) if key in options}
    layer = build(name, causal, dim=512, heads=8, **larger).cuda().bfloat16()
    x = torch.randn(2, 700, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    results = []
    for engine in ("reference", "auto"):
        monkeypatch.setenv("MMEFF_ATTENTION", engine)
        x.grad = None
        y = layer(x)
        y.float().square().mean().backward()
        results.append((y.float(), x.grad.float()))
    for flexed, reference in zip(*results):  # bf16: compare relative L2 errors
        assert float((flexed - reference).norm() / reference.norm()) < 2e-2
