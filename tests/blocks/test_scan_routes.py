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
