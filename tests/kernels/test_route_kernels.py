"""The bidirectional route kernels (mmeff.kernels.routes, through mmeff.blocks.scan.Routes with a faked GPU) under
the Triton interpreter against the gather form (the same Routes with the kernels refused).

Streams are slices of one projection's output (read through their strides, as a mixer's q, k, v are), of 45 tokens
(a partial token tile) and 24 or 200 channels (a partial channel block, and two blocks), with and without packed
documents. The order-dependent function is a running sum of the product of two streams, restarting at each document.
The forward runs under the route-saving hooks (`regathered`), so the backward stacks the saved streams again through
the kernels too. Tolerance: fp32 exact (copies, and one sum and one scale by 1/2 in fp32 as the reference's mean);
bf16 within one bf16 ulp (the interpreter truncates to bf16 where the GPU and PyTorch round).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from mmeff.blocks import scan as scan_module
from mmeff.blocks.layout import Layout
from mmeff.blocks.scan import Routes
from mmeff.ops import dispatch


def running_sum(streams, cu_seqlens):
    """Cumulative sum along T of the first stream times the second, restarting at each document."""
    x = streams[0] * streams[1]
    if cu_seqlens is None:
        return x.cumsum(1)
    flat, bounds = x.flatten(0, 1), cu_seqlens.tolist()
    return torch.cat([flat[a:b].cumsum(0) for a, b in zip(bounds[:-1], bounds[1:])]).view_as(x)


DOCS = torch.tensor([[0] * 20 + [1] * 25, [2] * 45])  # packed documents: each reversed on its own


@pytest.fixture
def fake_gpu(kernels, monkeypatch):
    monkeypatch.setattr(dispatch, "on_cuda", lambda x: True)
    monkeypatch.setattr(importlib.import_module("mmeff.kernels.utils"), "POISON", True)
    return importlib.import_module("mmeff.kernels.routes")


def run(streams_of, layout, source):
    """Output and the gradient of `source` of a bi-route running sum over the streams sliced from it."""
    leaf = source.detach().clone().requires_grad_()
    y = Routes(causal=False, scan="bi")(running_sum, streams_of(leaf), layout)
    dy = torch.linspace(-1, 1, y.numel()).view(y.shape).to(y.dtype)
    return y, torch.autograd.grad(y, leaf, dy)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width,docs", [(24, False), (200, False), (24, True)])
def test_bi_route_kernels_match_the_gathers(fake_gpu, monkeypatch, dtype, width, docs):
    calls = []
    for name in ("stack", "merge"):
        monkeypatch.setattr(fake_gpu, name, lambda *a, f=getattr(fake_gpu, name), n=name: calls.append(n) or f(*a))
    gen = torch.Generator().manual_seed(3)
    source = torch.randn(2, 45, 3 * width, generator=gen).to(dtype)
    heads = 2 if width % 2 == 0 else 1

    def streams_of(x):  # q [B, T, H, C/H] and k [B, T, C]: views into x, rows 3C apart
        return [x[..., :width].unflatten(-1, (heads, -1)).flatten(2), x[..., width : 2 * width]]

    layout = Layout(docs=DOCS) if docs else Layout()
    got = run(streams_of, layout, source)
    # Each one launch for both streams: forward, saved again, backward (the output's gradient; the streams')
    assert calls.count("stack") == 1 + 1 + 1 and calls.count("merge") == 1 + 1
    monkeypatch.setattr(scan_module, "_flip_kernels", lambda x, flip: None)
    want = run(streams_of, layout, source)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        if dtype == torch.float32:
            assert torch.equal(g, w)
        else:
            assert ((g.float() - w.float()).abs() <= 2**-7 * w.float().abs() + 1e-6).all()


def test_other_routes_keep_the_gathers(fake_gpu, monkeypatch):
    calls = []
    monkeypatch.setattr(fake_gpu, "stack", lambda *a: calls.append(a))
    streams = [torch.randn(1, 13, 4) for _ in range(2)]
    Routes(causal=False, scan="cross")(running_sum, streams, Layout(grid=(1, 3, 4), special=1))
    Routes(causal=False, scan="bi", order="column")(running_sum, streams, Layout(grid=(1, 3, 4), special=1))
    assert not calls


def test_streams_of_other_widths_and_dtypes_share_one_launch(fake_gpu, monkeypatch):
    # A mixer's streams differ in width and dtype (GLA's bf16 q, k, v beside its fp32 log decays): one stack launch
    # for all of them each way, and every gradient equal to the gathers'.
    calls = []
    for name in ("stack", "merge"):
        monkeypatch.setattr(fake_gpu, name, lambda *a, f=getattr(fake_gpu, name), n=name: calls.append(n) or f(*a))
    gen = torch.Generator().manual_seed(5)
    sources = [torch.randn(2, 45, 3 * 40, generator=gen).bfloat16(), torch.randn(2, 45, 6, generator=gen)]

    def cumsums(streams, cu_seqlens):  # the squares keep the streams for the backward: stacked again there
        return torch.cat([(s * s).float().cumsum(1) for s in streams], -1)

    def run():
        leaves = [s.detach().clone().requires_grad_() for s in sources]
        streams = [leaves[0][..., :40], leaves[0][..., 80:], leaves[1]]  # 40 and 40 bf16 channels, 6 fp32
        y = Routes(causal=False, scan="bi")(cumsums, streams, Layout())
        return [y, *torch.autograd.grad(y, leaves, torch.linspace(-1, 1, y.numel()).view(y.shape))]

    got = run()
    assert calls == ["stack", "merge", "stack", "stack", "merge"]  # forward; the backward: saved again, both merges
    monkeypatch.setattr(scan_module, "_flip_kernels", lambda xs, flip: None)
    want = run()
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        assert ((g.float() - w.float()).abs() <= 2**-7 * w.float().abs() + 1e-6).all()
