"""mmeff.ops.features' own backwards against autograd of the plain ops: values, gradients, and what they keep."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmeff.ops.features import FEATURE_MAPS

PLAIN = {"elu": lambda x: F.elu(x) + 1.0, "l2": lambda x: F.normalize(x, dim=-1)}


@pytest.mark.parametrize("name", list(PLAIN))
def test_feature_map_matches_the_plain_ops(name):
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    x[0, 0] = 0.0  # l2: a zero row divides by eps, with no projection in the gradient
    x[0, 1] = 1e-14
    x.requires_grad_()
    torch.autograd.gradcheck(FEATURE_MAPS[name], (torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True),))
    seed = torch.randn_like(x)
    got, want = FEATURE_MAPS[name](x), PLAIN[name](x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    (grad,), (expected,) = torch.autograd.grad(got, x, seed), torch.autograd.grad(want, x, seed)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_l2_in_bf16_keeps_its_output_and_the_norms():
    # F.normalize kept its input and intermediates besides; the output (kept by the recurrence anyway) and one norm
    # per row are what the backward reads. Values and gradient within bf16 rounding of the fp32 computation.
    x = torch.randn(4, 6, 64, dtype=torch.bfloat16, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        y = FEATURE_MAPS["l2"](x)
    assert y.dtype == torch.bfloat16 and [tuple(t.shape) for t in kept] == [(4, 6, 64), (4, 6, 1)] and kept[0] is y
    xf = x.detach().float().requires_grad_()
    seed = torch.randn(4, 6, 64)
    want = F.normalize(xf, dim=-1)
    assert torch.allclose(y.float(), want, atol=4e-3)
    (got,) = torch.autograd.grad(y, x, seed.bfloat16())
    assert torch.allclose(got.float(), torch.autograd.grad(want, xf, seed)[0], rtol=2e-2, atol=2e-2)
