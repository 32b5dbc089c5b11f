"""The fused non-causal linear-attention kernels (mmeff.kernels.noncausal, through their custom op
mmeff::global_linear_attention) under the Triton interpreter against the PyTorch path of mmeff.ops.noncausal (itself
tested against the O(T^2) definition in tests/ops/test_noncausal.py): output and the gradients of q, k and v.

Tolerance: max |kernel - reference| <= 1e-4 * max(1, max |reference|) in float32.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from mmeff.ops import global_linear_attention


@pytest.fixture(scope="module")
def fused(kernels):
    from mmeff.ops.custom_ops import global_linear_attention_op

    return global_linear_attention_op


def _run(fn, qkv, widths, heads):
    leaf = qkv.detach().clone().requires_grad_()
    q, k, v = (t.unflatten(-1, (heads, -1)) for t in leaf.split(widths, -1))  # strided views, as the mixers give them
    out = fn(q, k, v)
    out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
    return [out, leaf.grad]


# Sequences shorter than a token tile, several tiles split over state programs (T 130 over 4 heads: 3 stretches, the
# last of 2 tokens), head widths that are not powers of two.
@pytest.mark.parametrize("batch,seqlen,heads,dk,dv", [(2, 70, 3, 16, 32), (1, 5, 1, 16, 16), (2, 130, 2, 20, 24)])
@pytest.mark.parametrize("feature_map", ["identity", "elu", "relu"])
@pytest.mark.parametrize("normalize", [True, False])
def test_fused_matches_reference(fused, monkeypatch, batch, seqlen, heads, dk, dv, feature_map, normalize):
    monkeypatch.setattr(importlib.import_module("mmeff.kernels.utils"), "POISON", True)
    gen = torch.Generator().manual_seed(seqlen * heads + dk)
    widths = [heads * dk, heads * dk, heads * dv]
    qkv = torch.randn(batch, seqlen, sum(widths), generator=gen)
    if normalize and feature_map == "identity":  # a normaliser near zero would amplify any rounding
        qkv[..., : 2 * heads * dk] = qkv[..., : 2 * heads * dk].abs()
    options = dict(scale=0.3, normalize=normalize, eps=1e-2)
    actual = _run(lambda q, k, v: fused(q, k, v, feature_map=feature_map, **options), qkv, widths, heads)
    expected = _run(lambda q, k, v: global_linear_attention(q, k, v, feature_map=feature_map, backend="torch", **options),
                    qkv, widths, heads)  # fmt: skip
    for i, (got, want) in enumerate(zip(actual, expected)):
        assert got.shape == want.shape and got.dtype == want.dtype, i
        assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item()), i
