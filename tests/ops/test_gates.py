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


def test_softplus_decay_is_mambas_time_step_and_log_decay():
    # (clamp(softplus(x + b)), A * that) in fp32, the clamp only where softplus could leave the limits; gradients of x,
    # b and A by autograd through the plain ops (gradcheck in fp64); A and b must be [H] of x.
    import pytest

    from mmeff.ops import softplus_decay

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64) * 4
    b, A = torch.randn(3, generator=gen, dtype=torch.float64), -torch.rand(3, generator=gen, dtype=torch.float64)
    dt, log_decay = softplus_decay(x.bfloat16(), b.float(), A.float(), (1e-3, 0.5))
    expected = F.softplus(x.bfloat16().float() + b.float()).clamp(1e-3, 0.5)
    assert dt.dtype == log_decay.dtype == torch.float32
    assert torch.equal(dt, expected) and torch.equal(log_decay, expected * A.float())
    for limit in ((0.0, float("inf")), (1e-3, 0.5)):
        inputs = tuple(t.clone().requires_grad_() for t in (x, b, A))
        torch.autograd.gradcheck(lambda x, b, A: softplus_decay(x, b, A, limit), inputs)
    with pytest.raises(ValueError, match=r"A \(4,\) and bias \(3,\) must be \[H\] of x \(2, 5, 3\)"):
        softplus_decay(x, b, torch.ones(4))
