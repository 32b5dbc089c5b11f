"""Scan routes (mmeff.blocks.scan.Routes): the batched gathers equal running each route on its own copy.

The order-dependent function is a running sum along T (what a recurrence without decay computes), in float64;
`bi` and `cross` over a grid with a class token, and `bi` over packed documents. Forward and the gradient of
the input must match the per-route reference (flipped / permuted copies, mapped back, averaged) to 1e-12.
"""

from __future__ import annotations

import pytest
import torch

from mmeff.blocks.layout import Layout
from mmeff.blocks.scan import Routes
from mmeff.ops.recompute import saved_storages
from mmeff.ops.varlen import cu_seqlens_from_docs


def running_sum(streams, cu_seqlens):
    """Cumulative sum along T of the first stream times the second, restarting at each document."""
    x = streams[0] * streams[1]
    if cu_seqlens is None:
        return x.cumsum(1)
    flat = x.flatten(0, 1)
    bounds = cu_seqlens.tolist()
    out = torch.cat([flat[a:b].cumsum(0) for a, b in zip(bounds[:-1], bounds[1:])])
    return out.view_as(x)


def per_route(routes: Routes, streams, layout: Layout):
    """The reference: each route on its own permuted copy, its output permuted back, the mean."""
    outs = []
    for route in routes.routes(streams[0].shape[1], layout, streams[0].device):
        if route is None:
            index = torch.arange(streams[0].shape[1])
        elif isinstance(route, str):
            index = torch.arange(streams[0].shape[1] - 1, -1, -1)
        else:
            index = route
        along = [s[:, index] for s in streams]
        cu = None if layout.docs is None else cu_seqlens_from_docs(layout.docs[:, index])
        y = running_sum(along, cu)
        outs.append(y[:, torch.argsort(index)])
    return torch.stack(outs).mean(0)


@pytest.mark.parametrize(
    "scan,layout",
    [
        ("bi", Layout(grid=(1, 3, 4), special=1)),
        ("cross", Layout(grid=(1, 3, 4), special=1)),
        ("bi", Layout(docs=torch.tensor([[0] * 5 + [1] * 8, [2] * 13]))),
    ],
    ids=["bi-grid", "cross-grid", "bi-docs"],
)
def test_routes_match_per_route_copies(scan, layout):
    gen = torch.Generator().manual_seed(0)
    streams = [torch.randn(2, 13, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    routes = Routes(causal=False, scan=scan)
    got = routes(running_sum, streams, layout)
    want = per_route(routes, streams, layout)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    seed = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(got, streams, seed)
    expected = torch.autograd.grad(want, streams, seed)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)


def test_a_grid_given_as_a_list_plans_like_a_tuple():
    streams = [torch.randn(1, 13, 2, dtype=torch.float64) for _ in range(2)]
    routes = Routes(causal=False, scan="cross")
    got = routes(running_sum, streams, Layout(grid=[1, 3, 4], special=1))
    torch.testing.assert_close(got, per_route(routes, streams, Layout(grid=(1, 3, 4), special=1)), rtol=0, atol=1e-12)


def kept_storages(fn):
    """The storages the backward of `fn()` keeps (a saved-tensor hook outside the routes' own), and fn's output."""
    with saved_storages() as kept:
        out = fn()
    return kept, out


@pytest.mark.parametrize("scan", ["bi", "cross"])
def test_the_backward_keeps_the_source_streams_not_their_route_copies(scan):
    layout = Layout(grid=(1, 3, 4), special=1)
    streams = [torch.randn(2, 13, 3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    kept, out = kept_storages(lambda: Routes(causal=False, scan=scan)(running_sum, streams, layout))
    # running_sum's product keeps both of its (stacked) inputs: what reaches the outer hook is each source (and
    # the routes' index tensors)
    values = sorted(ptr for ptr, t in kept.items() if t.is_floating_point())
    assert values == sorted(s.untyped_storage().data_ptr() for s in streams)
    grads = torch.autograd.grad(out, streams, torch.ones_like(out))
    expected = torch.autograd.grad(per_route(Routes(causal=False, scan=scan), streams, layout), streams, torch.ones_like(out))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)


@pytest.mark.parametrize("scan", ["bi", "cross"])
def test_the_route_copies_are_freed_after_the_forward(monkeypatch, scan):
    # Autograd keeps the pack hook with each tensor it packed until the backward; the hook's table of stacked
    # streams kept every layer's route copies alive through the whole step (gla-bi ViT at 1024 px on the H200:
    # 3.8 of its 17.2 GiB peak).
    import gc
    import weakref

    from mmeff.blocks import scan as scan_module

    copies = []
    stack = scan_module._stack

    def recorded(xs, order, routes, *args, **kwargs):
        ys = stack(xs, order, routes, *args, **kwargs)
        copies.extend(weakref.ref(y) for y in ys)
        return ys

    monkeypatch.setattr(scan_module, "_stack", recorded)
    streams = [torch.randn(2, 13, 3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    out = Routes(causal=False, scan=scan)(running_sum, streams, Layout(grid=(1, 3, 4), special=1))
    gc.collect()
    assert len(copies) == 2 and not [c for c in copies if c() is not None]
    grads = torch.autograd.grad(out, streams, torch.ones_like(out))  # regathered from the sources
    assert all(g.shape == s.shape for g, s in zip(grads, streams))


def test_a_source_stream_changed_in_place_after_the_forward_is_refused():
    streams = [torch.randn(2, 13, 3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    sources = [s * 1.0 for s in streams]
    out = Routes(causal=False, scan="bi")(running_sum, sources, Layout())
    with torch.no_grad():
        sources[0].mul_(2.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()


def test_routes_under_activation_checkpointing_keep_their_gradients():
    from torch.utils.checkpoint import checkpoint

    layout = Layout(grid=(1, 3, 4), special=1)
    streams = [torch.randn(2, 13, 3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    routes = Routes(causal=False, scan="cross")
    plain = routes(running_sum, streams, layout)
    recomputed = checkpoint(lambda *s: routes(running_sum, list(s), layout), *streams, use_reentrant=False)
    torch.testing.assert_close(recomputed, plain, rtol=0, atol=0)
    seed = torch.randn_like(plain)
    for g, e in zip(torch.autograd.grad(recomputed, streams, seed), torch.autograd.grad(plain, streams, seed)):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)


def test_a_bidirectional_mamba2_keeps_no_view_of_its_in_projection():
    # The scan keeps its streams' sources for the backward: views of in_proj's output would keep all of it, z too,
    # which the gated norm keeps a copy of (1.5 KiB per token and layer of a mamba2-bi ViT-S, saved_memory.py).
    from mmeff import blocks

    torch.manual_seed(0)
    block = blocks.build("mamba2", 32, causal=False, d_state=8, head_dim=16)
    projected = []
    block.in_proj.register_forward_hook(lambda module, args, out: projected.append(out))  # held: no address reuse
    saved = set()

    def pack(t):
        saved.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = block(torch.randn(2, 16, 32, requires_grad=True), layout=Layout(grid=(1, 4, 4)))
    assert projected and projected[0].untyped_storage().data_ptr() not in saved
    y.sum().backward()


@pytest.mark.parametrize("scan", ["bi", "cross"])
def test_routes_in_groups_of_sequences_match_per_route_copies(monkeypatch, scan):
    # scan_tokens caps the route-stacked tokens of one call: 5 sequences of 13 tokens under a cap of 60 run as groups
    # of 2 (bi: 2 routes) or 1 (cross: 4 routes), each through its own routes.
    from mmeff.blocks import scan as scan_module

    calls = []
    stacked = scan_module.Routes._stacked
    monkeypatch.setattr(scan_module.Routes, "_stacked", lambda self, fn, xs, *a: calls.append(len(xs[0])) or stacked(self, fn, xs, *a))
    layout = Layout(grid=(1, 3, 4), special=1)
    gen = torch.Generator().manual_seed(0)
    streams = [torch.randn(5, 13, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    routes = Routes(causal=False, scan=scan, max_tokens=60)
    got = routes(running_sum, streams, layout)
    assert calls == ([2, 2, 1] if scan == "bi" else [1] * 5)
    want = per_route(routes, streams, layout)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    seed = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    for g, e in zip(torch.autograd.grad(got, streams, seed), torch.autograd.grad(want, streams, seed)):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)


def test_packed_documents_run_their_routes_in_one_group():
    # Packed rows share their documents' bounds (cu_seqlens over the whole batch): they are not split.
    routes = Routes(causal=False, scan="bi", max_tokens=1)
    layout = Layout(docs=torch.tensor([[0] * 5 + [1] * 8, [2] * 13]))
    streams = [torch.randn(2, 13, 3, dtype=torch.float64) for _ in range(2)]
    torch.testing.assert_close(routes(running_sum, streams, layout), per_route(routes, streams, layout), rtol=0, atol=1e-12)


@pytest.mark.parametrize("tokens", [0, -4, 512.0, "32k", True])
def test_scan_tokens_must_be_positive(tokens):
    with pytest.raises(ValueError, match="scan_tokens must be a positive number"):
        Routes(causal=False, scan="bi", max_tokens=tokens)


@pytest.mark.parametrize("name", ["gated_deltanet", "mamba2"])
def test_a_block_scanning_in_groups_has_its_gradients_and_a_smaller_backward(census, name):
    # A bidirectional block with `scan_tokens` at half its route-stacked tokens: outputs and every gradient as one
    # group's (plain-PyTorch path, fp32, 1e-5 of the largest value), and its backward's peak beyond what the forward
    # keeps (benchmarks/saved_memory.py's count) at most 0.6x one group's (measured: 0.45x gated_deltanet, 0.49x mamba2).
    from mmeff import blocks

    class Block(torch.nn.Module):
        def __init__(self, scan_tokens):
            super().__init__()
            options = {"d_state": 16, "head_dim": 16} if name == "mamba2" else {"heads": 2}
            self.block = blocks.build(name, 64, causal=False, scan="bi", scan_tokens=scan_tokens, **options)

        def forward(self, x):
            return self.block(x, layout=Layout(grid=(1, 8, 8)))

    x = torch.randn(8, 64, 64, generator=torch.Generator().manual_seed(0))
    results, transient = [], []
    for scan_tokens in (None, 8 * 2 * 64 // 2):
        torch.manual_seed(0)
        model = Block(scan_tokens)
        leaf = x.clone().requires_grad_()
        model(leaf).square().sum().backward()
        results.append([leaf.grad, *(p.grad for p in model.parameters())])
        transient.append(census.step_peak(model, x) - census.live(model, x))
    for got, want in zip(*results):
        assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())
    assert transient[1] <= 0.6 * transient[0], transient


def test_a_bad_scan_tokens_in_a_config_names_its_key():
    from mmeff import blocks
    from mmeff.config import ConfigError

    with pytest.raises(ConfigError, match=r"backbone\.mixers\.gla.*scan_tokens must be a positive number"):
        blocks.build("gla", 32, "backbone.mixers.gla", causal=False, scan_tokens="32k")
