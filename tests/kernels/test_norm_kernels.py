"""The norm kernels (mmeff.kernels.norm) under the Triton interpreter against mmeff.ops.norm's reference
(F.layer_norm / F.rms_norm): output and the gradients of x, weight and bias.

Tolerance: max |kernel - reference| <= 1e-5 * max(1, max |reference|) in float32 (measured ~1e-6); a bf16
output within one bf16 rounding (2^-8 relative) of the fp32 reference.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from mmeff.ops.norm import norm_reference


@pytest.fixture(scope="module")
def norm_kernels(kernels):
    return importlib.import_module("mmeff.kernels.norm")


def _run(fn, x, weight, bias):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias) if t is not None]
    out = fn(*leaves, *([None] if bias is None else []))
    out.float().backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
    return [out, *(t.grad for t in leaves)]


def _close(got, want, tol):
    assert got.shape == want.shape
    assert (got.float() - want.float()).abs().max() <= tol * max(1.0, want.abs().max().item())


# Widths not powers of two (masked columns), row counts not multiples of the row tiles, groups.
@pytest.mark.parametrize("rows,groups,width", [(37, 1, 48), (5, 3, 20), (130, 2, 64), (1, 1, 7)])
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("sms", [0, 1])  # the backward on 1 program per group, or on many (partial sums added)
def test_norm_matches_reference(norm_kernels, monkeypatch, rows, groups, width, kind, affine, sms):
    monkeypatch.setattr(importlib.import_module("mmeff.kernels.utils"), "POISON", True)
    monkeypatch.setattr(norm_kernels, "sm_count", lambda device: sms)
    gen = torch.Generator().manual_seed(rows * width)
    x = torch.randn(rows, groups * width, generator=gen) * 3 + 1
    weight = torch.randn(groups * width, generator=gen) if affine else None
    bias = torch.randn(groups * width, generator=gen) if affine and kind == "layer" else None
    rms = kind == "rms"
    actual = _run(lambda *a: norm_kernels.Norm.apply(a[0], a[1] if affine else None, a[-1], 1e-5, rms, groups, torch.float32), x, weight, bias)
    expected = _run(lambda *a: norm_reference(a[0], a[1] if affine else None, a[-1], 1e-5, kind, groups), x, weight, bias)
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert got.dtype == want.dtype
        _close(got, want, 1e-5)


def test_norm_writes_the_dtype_asked(norm_kernels):
    gen = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(9, 40, generator=gen), torch.randn(40, generator=gen), torch.randn(40, generator=gen)
    y = norm_kernels.Norm.apply(x, weight, bias, 1e-6, False, 1, torch.bfloat16)
    assert y.dtype == torch.bfloat16
    _close(y, norm_reference(x, weight, bias, 1e-6, "layer", 1), 2**-7)


@pytest.mark.parametrize(
    "kind,affine,rows,groups,width", [("layer", True, 37, 1, 48), ("rms", True, 130, 2, 64), ("rms", False, 5, 3, 20)]
)
@pytest.mark.parametrize("gate_first", [False, True])
def test_gated_norm_matches_reference(norm_kernels, monkeypatch, rows, groups, width, kind, affine, gate_first):
    # The swish gate fused into the kernels: norm(x) * silu(z) and norm(x * silu(z)), output and the gradients
    # of x, z, weight and bias, against mmeff.ops.norm's reference (the same ops unfused).
    from mmeff.ops.norm import norm

    monkeypatch.setattr(importlib.import_module("mmeff.kernels.utils"), "POISON", True)
    monkeypatch.setattr(norm_kernels, "sm_count", lambda device: 1)
    gen = torch.Generator().manual_seed(rows + width)
    x = torch.randn(rows, groups * width, generator=gen) * 3 + 1
    z = torch.randn(rows, groups * width, generator=gen) * 2
    weight = torch.randn(groups * width, generator=gen) if affine else None
    bias = torch.randn(groups * width, generator=gen) if kind == "layer" else None
    mode = (norm_kernels.GATE_BEFORE if gate_first else norm_kernels.GATE_AFTER).value
    rms = kind == "rms"

    def fused(x, z, w=None, b=None):
        return norm_kernels.Norm.apply(x, w, b, 1e-5, rms, groups, torch.float32, z, mode)

    def reference(x, z, w=None, b=None):
        return norm(x, w, b, 1e-5, kind, groups, backend="torch", gate=z, gate_first=gate_first)

    leaves = [t for t in (x, z, weight, bias) if t is not None]
    results = []
    for fn in (fused, reference):
        ts = [t.detach().clone().requires_grad_() for t in leaves]
        out = fn(*ts)
        out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
        results.append([out, *(t.grad for t in ts)])
    for got, want in zip(*results):
        _close(got, want, 2e-5)
