"""mmeff.ops.gates against autograd's own ops: values, gradients (fp64 and bf16 inputs), and what the backward keeps."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmeff.ops import log_sigmoid_gate


def test_log_sigmoid_gate_matches_autograd():
    x = (torch.randn(3, 50, dtype=torch.float64) * 8).requires_grad_()  # tails too: e^-x underflows past |x| ~ 37
    torch.autograd.gradcheck(lambda t: log_sigmoid_gate(t, 16.0), (x,))
    seed = torch.randn(3, 50, dtype=torch.float64)
    want = torch.autograd.grad(F.logsigmoid(x) / 16.0, x, seed)[0]
    got = torch.autograd.grad(log_sigmoid_gate(x, 16.0), x, seed)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


def test_log_sigmoid_gate_in_bf16_keeps_only_its_output():
    # The input's fp32 copy and logsigmoid's buffer are not kept: the fp32 output (which the recurrence keeps anyway)
    # is all the backward reads. Gradient in the input's dtype, within bf16 rounding of the fp32 reference.
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        y = log_sigmoid_gate(x, 16.0)
    assert y.dtype == torch.float32 and len(kept) == 1 and kept[0] is y
    seed = torch.randn(4, 64)
    (got,) = torch.autograd.grad(y, x, seed)
    xf = x.detach().float().requires_grad_()
    (want,) = torch.autograd.grad(F.logsigmoid(xf) / 16.0, xf, seed)
    assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), want, rtol=1e-2, atol=1e-4)
    with torch.no_grad():
        assert torch.equal(log_sigmoid_gate(x, 16.0), F.logsigmoid(x.float()) / 16.0)
