"""ShortConv.made_again: what saves a view of the conv's output for the backward keeps the conv's input instead, and
the backward makes the output again, once for all the views; outputs and gradients bit for bit those of keeping it."""

import contextlib

import pytest
import torch

from mmeff.blocks import conv as conv_module
from mmeff.blocks.conv import ShortConv


def _step(made_again: bool, monkeypatch: pytest.MonkeyPatch):
    """(output, gradients of x and the conv's parameters, conv passes run, storages autograd kept)."""
    torch.manual_seed(0)
    conv = ShortConv(12, 4)
    x = torch.randn(2, 9, 12, requires_grad=True)
    w = torch.randn(12, requires_grad=True)
    calls = []
    real = conv_module.causal_conv1d
    monkeypatch.setattr(conv_module, "causal_conv1d", lambda *a, **k: calls.append(1) or real(*a, **k))
    kept = set()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.add(t.untyped_storage().data_ptr()) or t, lambda t: t):
        if made_again:
            out, context = conv.made_again(x)
        else:
            out, context = conv(x), contextlib.nullcontext()
        with context:
            a, b = out.split([5, 7], -1)
            y = (a * w[:5]).sum() + b.square().sum() + (out * w).sum()  # three nodes keep views of `out`
    y.backward()
    return y.detach(), [x.grad, w.grad, *(p.grad for p in conv.parameters())], len(calls), kept, out


def test_the_output_is_made_again_once_and_not_kept(monkeypatch):
    y0, grads0, calls0, kept0, out0 = _step(False, monkeypatch)
    y1, grads1, calls1, kept1, out1 = _step(True, monkeypatch)
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(grads0, grads1))
    assert calls0 == 1 and calls1 == 2  # the forward's pass, and one more in the backward for the three views
    assert out0.untyped_storage().data_ptr() in kept0 and out1.untyped_storage().data_ptr() not in kept1


def test_decoding_with_a_cache_keeps_nothing_of_its_own():
    conv = ShortConv(6, 3)
    cache = {}
    with torch.no_grad():
        out, context = conv.made_again(torch.randn(1, 4, 6), cache)
    assert isinstance(context, contextlib.nullcontext) and "conv" in cache
