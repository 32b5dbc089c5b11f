"""The bidirectional GLA kernels (mmeff.kernels.bidirectional_gla, through their custom op mmeff::bidirectional_gla)
under the Triton interpreter in float32 against mmeff.ops.bidirectional_gla's "torch" backend (GLA along the tokens
and along their reverse on mmeff's reference recurrence) in float64: output and the gradients of q, k, v and the log
gates.

Tolerance: max |kernel - reference| <= tol * max |reference|, tol 1e-5 where every chunk's gates span less than
utils.span_limit (strength 0.1: the factored scores), 3e-4 where they span hundreds (strength 12 and 60: the exact
kernels). There the fp32 cumsums of the gates are hundreds, and their rounding reaches the decays: mmeff's causal
kernels run twice (the scan routes) measured 5.3e-5 (strength 12) and 1.6e-4 (60) on the gate gradient of the
196-token case, these kernels 5.2e-5 and 1.2e-4.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from mmeff.ops import bidirectional_gla


@pytest.fixture(scope="module")
def fused(kernels):
    from mmeff.ops.custom_ops import bidirectional_gla_op

    return bidirectional_gla_op


def _inputs(batch, seqlen, heads, dk, dv, strength, seed):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, seqlen, heads * (2 * dk + dv), generator=gen)
    g = F.logsigmoid(torch.randn(batch, seqlen, heads, dk, generator=gen) * 2) * strength
    return qkv, g


def _run(fn, qkv, g, heads, dk):
    leaf, gleaf = qkv.detach().clone().requires_grad_(), g.detach().clone().requires_grad_()
    q, k, v = (t.unflatten(-1, (heads, -1)) for t in leaf.split([heads * dk, heads * dk, qkv.shape[-1] - 2 * heads * dk], -1))
    out = fn(F.elu(q) + 1, F.elu(k) + 1, v, gleaf)  # q and k as the mixer gives them: strided views after a map
    out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
    return [out, leaf.grad, gleaf.grad]


# One chunk and a partial one; several chunks with a partial last; widths below the tiles'.
@pytest.mark.parametrize("batch,seqlen,heads,dk,dv", [(2, 40, 2, 16, 16), (1, 196, 3, 32, 24), (2, 130, 1, 20, 40)])
@pytest.mark.parametrize("strength", [0.1, 12.0, 60.0])
def test_kernels_match_reference(fused, monkeypatch, batch, seqlen, heads, dk, dv, strength):
    monkeypatch.setattr(importlib.import_module("mmeff.kernels.utils"), "POISON", True)
    qkv, g = _inputs(batch, seqlen, heads, dk, dv, strength, seed=seqlen + dk)
    spans = -F.pad(g, (0, 0, 0, 0, 0, -seqlen % 64)).unflatten(1, (-1, 64)).sum(2)  # [B, chunks, H, K]
    limit = importlib.import_module("mmeff.kernels.utils").span_limit(torch.float32)
    assert (spans.max() < limit) if strength < 1 else (spans.amax(-1).min() > limit)  # the path the case means
    actual = _run(lambda q, k, v, g: fused(q, k, v, g, 0.3), qkv, g, heads, dk)
    expected = _run(lambda q, k, v, g: bidirectional_gla(q, k, v, g, 0.3, backend="torch"), qkv.double(), g.double(),
                    heads, dk)  # fmt: skip
    tol = 1e-5 if strength < 1 else 3e-4
    for i, (got, want) in enumerate(zip(actual, expected)):
        assert got.shape == want.shape and got.dtype == torch.float32, i
        error = (got.double() - want).abs().max().item() / want.abs().max().item()
        assert error <= tol, (i, error)


def test_block_takes_the_op_and_equals_the_routes(kernels, monkeypatch):
    # A GLA block with `scan: bi` over a 10 x 13 grid on the Triton path (interpreted, the GPU faked): it takes the op
    # (both_routes), whose output and every gradient equal those of the scan routes (the recurrence kernels on the
    # route-stacked batch, both_routes switched off); with a class token (not a plain order) it takes the routes.
    from mmeff import blocks
    from mmeff.blocks.layout import Layout
    from mmeff.blocks.linear import GLA
    from mmeff.ops import dispatch

    monkeypatch.setattr(dispatch, "on_cuda", lambda x: True)
    torch.manual_seed(0)
    block = blocks.build("gla", 32, causal=False, heads=2)
    x = torch.randn(2, 130, 32)
    grad = torch.randn(2, 130, 32)
    calls = []
    both = GLA.both_routes

    def step(layout, routes):
        def counted(self, streams, layout):
            out = None if routes else both(self, streams, layout)
            calls.append(None if routes else out is not None)
            return out

        monkeypatch.setattr(GLA, "both_routes", counted)
        leaf = x.clone().requires_grad_()
        block.zero_grad()
        block(leaf, layout=layout).backward(grad)
        return [leaf.grad] + [p.grad.clone() for p in block.parameters()]

    grid = Layout(grid=(1, 10, 13))
    op, routes = step(grid, False), step(grid, True)
    assert calls == [True, None]
    for a, b in zip(op, routes):
        assert (a - b).abs().max() <= 1e-4 * max(1.0, b.abs().max().item())
    step(Layout(grid=(1, 3, 43), special=1), False)
    assert calls == [True, None]  # a class token first: not the token order's plain reverse, so no both_routes call
