"""The MoE glue kernels (mmeff.kernels.moe) under the Triton interpreter against their plain-PyTorch reference
(mmeff.ops.grouped with MMEFF_FORCE_REFERENCE=1): dispatch, weighted combine and SwiGLU, forward and every gradient.

Tolerance: max |a - b| <= 1e-5 * max(1, max |b|) in float32; bfloat16 inputs are compared in float32 with 2e-2
(the kernels accumulate in float32, the reference in bfloat16).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from mmeff.ops import grouped


@pytest.fixture(scope="module")
def moe_kernels(kernels):
    return importlib.import_module("mmeff.kernels.moe")


def _run(fn, inputs):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape).to(out.dtype))
    return [out] + [t.grad for t in leaves if t.requires_grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,k,dim", [(7, 2, 24), (33, 3, 40), (5, 1, 8)])
def test_dispatch_combine_swiglu_match_reference(moe_kernels, monkeypatch, dtype, tokens, k, dim):
    monkeypatch.setattr(importlib.import_module("mmeff.kernels.utils"), "POISON", True)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, dim, generator=gen).to(dtype)
    experts = torch.randint(0, 4, (tokens, k), generator=gen)
    weights = torch.rand(tokens, k, generator=gen).softmax(-1)
    order, inv = grouped.sort_assignments(experts)
    assert torch.equal(order[inv], torch.arange(tokens * k))
    h = torch.randn(tokens * k, 2 * dim, generator=gen).to(dtype)

    def reference(fn):
        monkeypatch.setenv("MMEFF_FORCE_REFERENCE", "1")
        try:
            return fn()
        finally:
            monkeypatch.delenv("MMEFF_FORCE_REFERENCE")

    cases = {
        "dispatch": (lambda a: grouped.dispatch(a, order, inv, k), [x]),
        "combine": (lambda r, w: grouped.combine(r, order, inv, w), [x.repeat_interleave(k, 0)[order] * 0.5, weights]),
        "swiglu": (lambda a: grouped.activate(a, True), [h]),
    }
    # grouped dispatches to the kernels for CUDA tensors only: run the kernel functions directly here
    kernel = {
        "dispatch": lambda a: moe_kernels.Dispatch.apply(a, order, inv, k),
        "combine": lambda r, w: moe_kernels.Combine.apply(r, order, inv, w),
        "swiglu": lambda a: moe_kernels.SwiGLU.apply(a),
    }
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, (ref_fn, inputs) in cases.items():
        expected = reference(lambda: _run(ref_fn, inputs))
        actual = _run(kernel[name], inputs)
        for i, (a, b) in enumerate(zip(actual, expected)):
            assert a.dtype == b.dtype and a.shape == b.shape, (name, i)
            error = (a.float() - b.float()).abs().max().item()
            assert error <= tol * max(1.0, b.float().abs().max().item()), (name, i, error)


def test_gather_reads_non_contiguous_rows(moe_kernels):
    # The kernels index rows at stride D: a strided input (here every other column of a wider buffer) must be
    # made contiguous first, or they read the wrong elements (past the tensor's end for its last rows).
    gen = torch.Generator().manual_seed(0)
    experts = torch.randint(0, 4, (9, 2), generator=gen)
    order, inv = grouped.sort_assignments(experts)
    rows = torch.randn(18, 32, generator=gen)[:, ::2]
    weights = torch.rand(9, 2, generator=gen)
    expected = (weights[..., None] * rows[inv].view(9, 2, -1)).sum(1)
    assert torch.allclose(moe_kernels.Combine.apply(rows, order, inv, weights), expected, atol=1e-6)
    assert torch.allclose(moe_kernels.gather_sum(rows, inv, None, 2), rows[inv].view(9, 2, -1).sum(1), atol=1e-6)


# The dense SwiGLU MLP's activation through mmeff.ops.act_linear with a faked GPU: the kernels (silu_mul and its
# backward, gate and up as two tensors) against the plain composition F.linear(silu(gate) * up, W), output and the
# gradients of gate, up and W. Hidden width 40 (not a power of two), 3 x 7 rows; gate given as a transposed view
# (not contiguous: copied first). Tolerances as above.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_swiglu_matches_the_plain_composition(moe_kernels, monkeypatch, dtype):
    from mmeff.ops import dispatch
    from mmeff.ops.mlp import act_linear

    monkeypatch.setattr(importlib.import_module("mmeff.kernels.utils"), "POISON", True)
    monkeypatch.setattr(dispatch, "on_cuda", lambda x: True)
    gen = torch.Generator().manual_seed(3)
    gate = torch.randn(7, 3, 40, generator=gen).to(dtype).transpose(0, 1)
    up = torch.randn(3, 7, 40, generator=gen).to(dtype)
    weight = torch.randn(16, 40, generator=gen).to(dtype)

    def plain(g, u, w):
        return torch.nn.functional.linear(torch.nn.functional.silu(g) * u, w)

    calls = []
    monkeypatch.setattr(moe_kernels, "silu_mul", lambda *a, f=moe_kernels.silu_mul: calls.append(1) or f(*a))
    actual = _run(lambda g, u, w: act_linear(g, w, None, "swiglu", u), [gate, up, weight])
    assert calls  # the kernel ran (forward and the backward's recompute)
    expected = _run(plain, [gate.float(), up.float(), weight.float()])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip(actual, expected):
        assert got.dtype == dtype and got.shape == want.shape
        assert (got.float() - want).abs().max() <= tol * max(1.0, want.abs().max().item())


def test_dense_swiglu_takes_the_reference_for_float64(moe_kernels, monkeypatch):
    # The kernels compute in fp32: fp64 inputs keep the plain composition's precision.
    from mmeff.ops import dispatch
    from mmeff.ops.mlp import act_linear

    monkeypatch.setattr(dispatch, "on_cuda", lambda x: True)
    monkeypatch.setattr(moe_kernels, "silu_mul", lambda *a: pytest.fail("the fp32 kernel took fp64 inputs"))
    gate, up, weight = (torch.randn(*shape, dtype=torch.float64) for shape in ((4, 8), (4, 8), (3, 8)))
    y = act_linear(gate.requires_grad_(), weight, None, "swiglu", up)
    torch.testing.assert_close(y, torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, weight))
