"""The gates' projections run in qkv's matmul (mmeff.blocks.linear.LinearMixer.projections) on the Triton path
(interpreted, fp32: the interpreter's bf16 products are not exact): the kernels read their strided slices of the one
projection (the short conv's qkv, Gated DeltaNet's decay input, the delta rule's beta) and the block's output and
every gradient are those of the projections apart."""

import pytest
import torch

from mmeff import blocks


@pytest.mark.parametrize("name,options", [("gated_deltanet", {}), ("gated_deltanet", {"causal": False, "scan": "bi"}),
                                          ("gla", {"causal": False, "scan": "bi"})])  # fmt: skip
def test_side_projections_on_the_triton_path(kernels, monkeypatch, name, options):
    from mmeff.ops import dispatch

    monkeypatch.setattr(dispatch, "on_cuda", lambda x: True)
    torch.manual_seed(0)
    block = blocks.build(name, 32, heads=2, **options)
    x = torch.randn(2, 24, 32)
    side = block.side_linears()
    runs = []
    for apart in (False, True):
        if apart:
            monkeypatch.setattr(block, "projections", lambda x: (block.qkv(x), [m(x) for m in side]))
        block.zero_grad()
        xg = x.clone().requires_grad_()
        y = block(xg)
        y.square().sum().backward()
        runs.append([y, xg.grad, *(p.grad for p in block.parameters())])
    for fused, apart in zip(*runs):  # fp32 rounding: the matmuls sum in another order
        assert ((fused - apart).norm() / apart.norm()).item() < 1e-5
