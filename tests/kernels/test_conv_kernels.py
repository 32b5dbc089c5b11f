"""The short-convolution kernels (mmeff.kernels.conv) under the Triton interpreter against the F.conv1d
reference (mmeff.ops.conv on CPU): output and the gradients of x, weight and bias.

Tolerance: max |kernel - reference| <= 1e-5 * max(1, max |reference|) in float32 (measured ~1e-7); the weight and
bias gradients, each a sum over all B * T rows in another order than the reference's, 2e-7 * B * T times that (one
fp32 rounding a term; measured up to 1.0e-5 at 195 rows).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from mmeff.ops.conv import causal_conv1d


@pytest.fixture(scope="module")
def conv_kernels(kernels):
    return importlib.import_module("mmeff.kernels.conv")


def _run(fn, x, weight, bias):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias) if t is not None]
    out = fn(*leaves, *([None] if bias is None else []))
    out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
    return [out, *(t.grad for t in leaves)]


# Sequences shorter than the kernel, tiles cut at both ends (T, C not multiples of the 64 x 128 tile), batches.
@pytest.mark.parametrize("batch,seqlen,channels,width", [(2, 70, 130, 4), (1, 3, 24, 4), (3, 65, 8, 2), (1, 9, 5, 1)])
@pytest.mark.parametrize("activation", ["silu", "identity"])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_matches_reference(conv_kernels, monkeypatch, batch, seqlen, channels, width, activation, bias):
    monkeypatch.setattr(importlib.import_module("mmeff.kernels.utils"), "POISON", True)
    gen = torch.Generator().manual_seed(seqlen * channels)
    x = torch.randn(batch, seqlen, channels, generator=gen)
    weight = torch.randn(channels, width, generator=gen) / width
    b = torch.randn(channels, generator=gen) if bias else None
    silu = activation == "silu"
    actual = _run(lambda *a: conv_kernels.CausalConv.apply(*a, silu), x, weight, b)
    expected = _run(lambda *a: causal_conv1d(*a, activation), x, weight, b)
    for i, (got, want) in enumerate(zip(actual, expected)):
        assert got.shape == want.shape and got.dtype == want.dtype, i
        # out and dx, then the weight and bias gradients (sums over the rows)
        terms = 1.0 if i < 2 else max(1.0, 0.02 * batch * seqlen)
        assert (got - want).abs().max() <= 1e-5 * terms * max(1.0, want.abs().max().item()), i


@pytest.mark.parametrize("silu", [True, False])
def test_conv_reads_and_keeps_a_column_view(conv_kernels, monkeypatch, silu):
    # Mamba-2's xBC: channels 3..133 of a wider [B, T, 150] tensor, rows 150 apart, read in place and kept as that
    # view (no copy saved); output and gradients as for a contiguous x.
    monkeypatch.setattr(importlib.import_module("mmeff.kernels.utils"), "POISON", True)
    gen = torch.Generator().manual_seed(11)
    wide = torch.randn(2, 70, 150, generator=gen)
    weight, b = torch.randn(130, 4, generator=gen) / 4, torch.randn(130, generator=gen)
    kept = []

    def conv(x, weight, bias):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            return conv_kernels.CausalConv.apply(x, weight, bias, silu)

    leaf = wide.clone().requires_grad_()
    x = leaf[..., 3:133]
    actual = _run(conv, x.detach(), weight, b)  # a contiguous clone: the same values
    out = conv(x, weight, b)
    out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
    assert any(t.data_ptr() == x.data_ptr() and t.stride() == x.stride() for t in kept[-3:])  # the view, kept
    expected = _run(lambda *a: causal_conv1d(*a, "silu" if silu else "identity"), x.detach(), weight, b)
    for got, want in [(out, expected[0]), (leaf.grad[..., 3:133], expected[1]), *zip(actual, expected)]:
        assert got.shape == want.shape and (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())
    assert not leaf.grad[..., :3].any() and not leaf.grad[..., 133:].any()


def test_conv_functions_read_any_layout(conv_kernels, monkeypatch):
    # causal_conv and its backward called directly on x whose batch and time do not merge into one row stride (time
    # major in memory): they read a dense copy, never x's memory through the copy's strides.
    monkeypatch.setattr(importlib.import_module("mmeff.kernels.utils"), "POISON", True)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(70, 2, 24, generator=gen).transpose(0, 1)  # [2, 70, 24], strides (24, 48, 1)
    weight, b = torch.randn(24, 4, generator=gen) / 4, torch.randn(24, generator=gen)
    dy = torch.linspace(-1, 1, x.numel()).view(x.shape)
    y = conv_kernels.causal_conv(x, weight, b, True, None)
    grads = conv_kernels.causal_conv_backward(dy, x, weight, b, True, None)
    expected = _run(lambda *a: causal_conv1d(*a, "silu"), x.contiguous(), weight, b)
    for got, want in zip([y, *grads], expected):
        assert got.shape == want.shape and (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("width", [4, 2])
def test_conv_with_documents_matches_reference(conv_kernels, monkeypatch, width):
    # Packed documents (`runs`): rows of 70 tokens cut at 1, 33 and 64 (a one-token document, a cut inside a row
    # tile and at a tile edge) in one row, none in the other: taps and dx never cross a boundary.
    from mmeff.ops.conv import causal_conv1d_reference
    from mmeff.ops.varlen import doc_runs

    monkeypatch.setattr(importlib.import_module("mmeff.kernels.utils"), "POISON", True)
    gen = torch.Generator().manual_seed(width)
    docs = torch.zeros(2, 70, dtype=torch.long)
    for cut in (1, 33, 64):
        docs[0, cut:] += 1
    runs = doc_runs(docs)
    x, weight, b = torch.randn(2, 70, 130, generator=gen), torch.randn(130, width, generator=gen), torch.randn(130, generator=gen)
    actual = _run(lambda *a: conv_kernels.CausalConv.apply(*a, True, runs), x, weight, b)
    expected = _run(lambda *a: causal_conv1d_reference(*a, "silu", None, runs), x, weight, b)
    for i, (got, want) in enumerate(zip(actual, expected)):
        assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item()), i
