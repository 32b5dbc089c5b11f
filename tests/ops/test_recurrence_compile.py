"""The chunked PyTorch recurrence under torch.compile with dynamic shapes (a recompilation at a second length)."""

import os

import pytest
import torch

from mmeff import ops


# The symbolic-shape trace takes about a minute on 2 CPU cores: outside the default suite's time budget.
@pytest.mark.skipif(os.environ.get("MMEFF_LARGE_TESTS") != "1", reason="set MMEFF_LARGE_TESTS=1")
def test_dynamic_shape_compiled_gla_matches_eager_at_two_lengths():
    # q, k, v sliced from one projection and transposed inside, as the mixers give them. The chunks were zero-padded
    # with F.pad, whose traced form (symbolic pad) is contiguous while the eager kernel keeps the transposed strides;
    # the einsum views recorded after it failed at run time.
    heads, dk, dv = 2, 4, 8

    def gla(qkv: torch.Tensor, log_g: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (heads, -1)) for t in qkv.split([heads * dk, heads * dk, heads * dv], -1))
        return ops.gated_linear_attention(q, k, v, log_g.unflatten(-1, (heads, -1)), backend="torch")[0]

    torch.manual_seed(0)
    torch._dynamo.reset()
    compiled = torch.compile(gla, backend="aot_eager", dynamic=True)
    for length in (24, 40):
        qkv = torch.randn(2, length, heads * (2 * dk + dv))
        log_g = -torch.rand(2, length, heads * dk)
        results = []
        for run in (gla, compiled):
            leaves = [qkv.clone().requires_grad_(), log_g.clone().requires_grad_()]
            y = run(*leaves)
            y.square().sum().backward()
            results.append([y.detach(), *(leaf.grad for leaf in leaves)])
        for got, want in zip(results[1], results[0]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
