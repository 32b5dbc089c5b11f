"""Bidirectional GLA (mmeff.ops.bidirectional_gla, the kernels of mmeff.kernels.bidirectional_gla) at the vision
benchmark's shapes (224 px: 196 tokens; the longest the kernels take: 512), 6 heads of K 32, V 64:

- bf16 against the fp32 definition on the same inputs (GLA along the tokens and along their reverse, mmeff's
  reference recurrence), forward and every gradient: ||bf16 - fp32|| / ||fp32|| < 1e-2; the ViT's gates
  (logsigmoid / 16: the factored scores) and strong ones (spans in the hundreds: the exact kernels);
- fp32 kernels against the same definition: max error <= 1e-4 x max |reference|;
- torch.compile of the op equals the eager op;
- a GLA block with `scan: bi` over a 14 x 14 grid takes the op and equals the scan routes' block.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmeff.ops import bidirectional_gla

pytestmark = pytest.mark.xdist_group("bidirectional_gla")
H, K, V = 6, 32, 64


def _inputs(batch, length, strong, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k = (F.elu(torch.randn(batch, length, H, K, device="cuda", generator=gen)) + 1 for _ in range(2))
    v = torch.randn(batch, length, H, V, device="cuda", generator=gen)
    x = torch.randn(batch, length, H, K, device="cuda", generator=gen)
    g = F.logsigmoid(2 * x) * 4 if strong else F.logsigmoid(x) / 16
    do = torch.randn(batch, length, H, V, device="cuda", generator=gen)
    return (q, k, v, g), do


def _run(fn, inputs, do, dtype):
    leaves = [x.detach().to(dtype).clone().requires_grad_() for x in inputs[:3]] + [inputs[3].clone().requires_grad_()]
    o = fn(*leaves)
    o.backward(do.to(o.dtype))
    return [o.float()] + [x.grad.float() for x in leaves]


@pytest.mark.parametrize("batch,length", [(64, 196), (16, 512)])
@pytest.mark.parametrize("strong", [False, True])
def test_matches_fp32_definition(batch, length, strong):
    inputs, do = _inputs(batch, length, strong)
    want = _run(lambda *x: bidirectional_gla(*x, backend="torch"), inputs, do, torch.float32)
    for dtype, norm_tol, max_tol in ((torch.bfloat16, 1e-2, None), (torch.float32, None, 1e-4)):
        got = _run(lambda *x: bidirectional_gla(*x, backend="triton"), inputs, do, dtype)
        for name, a, b in zip(["o", "dq", "dk", "dv", "dg"], got, want):
            assert torch.isfinite(a).all(), (dtype, name)
            if norm_tol:
                assert ((a - b).norm() / b.norm()).item() < norm_tol, (dtype, name)
            else:
                assert (a - b).abs().max().item() <= max_tol * b.abs().max().item(), (dtype, name)


def test_compiled_matches_eager():
    inputs, do = _inputs(32, 196, False, seed=1)
    eager = _run(lambda *x: bidirectional_gla(*x), inputs, do, torch.bfloat16)
    torch._dynamo.reset()
    compiled = _run(torch.compile(lambda *x: bidirectional_gla(*x), fullgraph=True), inputs, do, torch.bfloat16)
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)


def test_block_takes_the_op(monkeypatch):
    from mmeff import blocks
    from mmeff.blocks.layout import Layout
    from mmeff.blocks.linear import GLA

    torch.manual_seed(0)
    block = blocks.build("gla", 384, causal=False, heads=H).cuda()
    x = torch.randn(8, 196, 384, device="cuda", requires_grad=True)
    grad = torch.randn(8, 196, 384, device="cuda")
    layout = Layout(grid=(1, 14, 14))
    calls = []
    both = GLA.both_routes

    def counted(self, streams, layout):
        out = both(self, streams, layout)
        calls.append(out is not None)
        return out

    results = []
    for routes in (False, True):
        monkeypatch.setattr(GLA, "both_routes", counted if not routes else (lambda self, streams, layout: None))
        with torch.autocast("cuda", torch.bfloat16):
            y = block(x, layout=layout)
        y.backward(grad)
        results.append([y.float(), x.grad.clone()] + [p.grad.clone() for p in block.parameters()])
        block.zero_grad()
        x.grad = None
    assert calls == [True]
    for a, b in zip(*results):
        assert ((a - b).norm() / b.norm()).item() < 2e-2
