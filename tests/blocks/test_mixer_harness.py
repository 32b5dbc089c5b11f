"""One harness for every registered token mixer: shapes and gradients, causality, decoding, packed documents.

Each mixer needs an entry in OPTIONS (small test options); a mixer registered without one fails
`test_every_mixer_is_covered`, so a new mixer cannot skip these checks.
"""

import pytest
import torch

from mmeff import blocks
from mmeff.blocks import Cache, Layout

# Small options per mixer; "bidirectional": False marks a causal-only mixer.
OPTIONS: dict[str, dict] = {
    "attn": {"heads": 2},
    "sliding": {"heads": 2, "window": 6},
    "longformer": {"heads": 2, "window": 6, "global_tokens": 1},
    "sink": {"heads": 2, "window": 6, "sinks": 2, "bidirectional": False},
    "bigbird": {"heads": 2},
    "dilated": {"heads": 2},
    "block_topk": {"heads": 2, "block": 4, "topk": 1},
    "mla": {"heads": 2},
    "moh": {"heads": 4, "shared_heads": 1, "active_heads": 2},
    "quant_attn": {"heads": 2, "q_block": 4, "k_block": 4},
    "linear_attn": {"heads": 2},
    "retnet": {"heads": 2},
    "gla": {"heads": 2, "chunk_size": 8},
    "deltanet": {"heads": 2, "chunk_size": 8},
    "gated_deltanet": {"heads": 2, "chunk_size": 8},
    "ttt": {"heads": 2, "chunk_size": 8},
    "mamba": {"d_state": 4, "chunk_size": 8},
    "mamba2": {"d_state": 8, "head_dim": 16, "chunk_size": 8},
    "hybrid_heads": {"heads": 2, "ssm_options": {"d_state": 8, "head_dim": 16, "chunk_size": 8}},
}
DIM = 32
TOL = {"atol": 2e-4, "rtol": 2e-4}
# quant_attn's int8 block scales and mean key span neighbouring tokens, later ones included (SageAttention's
# numerics): decoding and a changed later token move earlier outputs by the rounding error only.
QUANT_TOL = {"atol": 5e-2, "rtol": 5e-2}


def _cases(causal_only: bool = False) -> list:
    cases = []
    for name in blocks.names("mixer"):
        bidirectional = OPTIONS.get(name, {}).get("bidirectional", True)
        cases.append(pytest.param(name, True, id=f"{name}-causal"))
        if bidirectional and not causal_only:
            cases.append(pytest.param(name, False, id=f"{name}-bi"))
    return cases


def build(name: str, causal: bool) -> torch.nn.Module:
    if name not in OPTIONS:
        pytest.fail(f"mixer {name!r} is registered but the harness has no OPTIONS for it")
    options = {k: v for k, v in OPTIONS[name].items() if k != "bidirectional"}
    torch.manual_seed(0)
    return blocks.build(name, DIM, causal=causal, **options).eval()


def test_every_mixer_is_covered():
    assert sorted(set(blocks.names("mixer")) - set(OPTIONS)) == []
    assert sorted(set(OPTIONS) - set(blocks.names("mixer"))) == []


@pytest.mark.parametrize("T", [5, 37])
@pytest.mark.parametrize("name, causal", _cases())
def test_forward_backward(name, causal, T):
    mixer = build(name, causal).train()
    x = torch.randn(2, T, DIM, requires_grad=True)
    y = mixer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    grads = [p.grad for p in mixer.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name, causal", _cases(causal_only=True))
def test_causality(name, causal):
    mixer = build(name, causal)
    x = torch.randn(2, 20, DIM)
    later = x.clone()
    later[:, 13:] += torch.randn(2, 7, DIM)
    torch.testing.assert_close(mixer(later)[:, :13], mixer(x)[:, :13], **(QUANT_TOL if name == "quant_attn" else TOL))


@pytest.mark.parametrize("name, causal", _cases(causal_only=True))
def test_decode_equals_forward(name, causal):
    mixer = build(name, causal)
    x = torch.randn(2, 19, DIM)
    full = mixer(x)
    cache = Cache()
    steps = [mixer(x[:, :7], cache)] + [mixer(x[:, i : i + 1], cache) for i in range(7, 12)] + [mixer(x[:, 12:], cache)]
    torch.testing.assert_close(torch.cat(steps, 1), full, **(QUANT_TOL if name == "quant_attn" else TOL))
    assert cache.offset == 19


@pytest.mark.parametrize("name, causal", _cases())
def test_packed_documents_equal_separate(name, causal):
    # Row 0 packs three documents, row 1 holds one; each output must equal that document run alone.
    mixer = build(name, causal)
    lengths = [[9, 4, 11], [24]]
    x = torch.randn(2, 24, DIM)
    docs = torch.tensor([sum(([d] * n for d, n in enumerate(row)), []) for row in lengths])
    out = mixer(x, layout=Layout(docs=docs))
    for b, row in enumerate(lengths):
        start = 0
        for n in row:
            alone = mixer(x[b : b + 1, start : start + n])[0]
            torch.testing.assert_close(out[b, start : start + n], alone, **TOL, msg=lambda m: f"{name} document {b}:{start}+{n}: {m}")
            start += n


@pytest.mark.parametrize("name, causal", [c for c in _cases() if c.values[0] in ("gla", "mamba2", "attn")])
def test_packed_gradients_stay_within_documents(name, causal):
    # The loss of the second document has no gradient on the first document's tokens.
    mixer = build(name, causal)
    x = torch.randn(1, 16, DIM, requires_grad=True)
    docs = torch.tensor([[0] * 6 + [1] * 10])
    mixer(x, layout=Layout(docs=docs))[:, 6:].square().sum().backward()
    assert x.grad[:, :6].abs().max() == 0 and x.grad[:, 6:].abs().max() > 0


def test_docs_with_a_cache_is_an_error():
    for name in ("attn", "gla"):
        with pytest.raises(ValueError, match="docs"):
            build(name, True)(torch.randn(1, 3, DIM), Cache(), Layout(docs=torch.zeros(1, 3, dtype=torch.long)))


def test_global_scan_is_the_noncausal_form():
    # linear_attn with scan: global: every token reads phi(q)^T sum_s phi(k_s) v_s^T / phi(q)^T sum_s phi(k_s).
    import torch.nn.functional as F

    mixer = blocks.build("linear_attn", DIM, causal=False, scan="global", heads=2).eval()
    x = torch.randn(2, 11, DIM)
    q, k, v = (t.unflatten(-1, (2, -1)) for t in mixer.qkv(x).chunk(3, -1))
    q, k = F.elu(q) + 1, F.elu(k) + 1
    num = torch.einsum("bthk,bshk,bshv->bthv", q, k, v)
    den = torch.einsum("bthk,bshk->bth", q, k)[..., None]
    want = mixer.out((num / (den + mixer.eps * 16**0.5)).flatten(-2))  # eps is added after the K**-0.5 scale
    torch.testing.assert_close(mixer(x), want, atol=1e-5, rtol=1e-4)
    docs = torch.tensor([[0] * 4 + [1] * 7, [0] * 11])
    packed = mixer(x, layout=Layout(docs=docs))
    torch.testing.assert_close(packed[0, 4:], mixer(x[:1, 4:])[0], **TOL)
    torch.testing.assert_close(packed[1], mixer(x[1:])[0], **TOL)
    with pytest.raises(Exception, match="global"):
        blocks.build("gla", DIM, causal=False, scan="global")
