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
@pytest.mark.parametrize("gate_view", [False, True], ids=["gate", "gate_view"])
def test_gated_norm_matches_reference(norm_kernels, monkeypatch, rows, groups, width, kind, affine, gate_first, gate_view):
    # The swish gate fused into the kernels: norm(x) * silu(z) and norm(x * silu(z)), output and the gradients
    # of x, z, weight and bias, against mmeff.ops.norm's reference (the same ops unfused). `gate_view`: z is columns
    # of a wider tensor (Mamba-2's z, of its in_proj output), read in place.
    from mmeff.ops.norm import norm

    monkeypatch.setattr(importlib.import_module("mmeff.kernels.utils"), "POISON", True)
    monkeypatch.setattr(norm_kernels, "sm_count", lambda device: 1)
    gen = torch.Generator().manual_seed(rows + width)
    x = torch.randn(rows, groups * width, generator=gen) * 3 + 1
    z = torch.randn(rows, groups * width + (9 if gate_view else 0), generator=gen) * 2
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
        out = fn(ts[0], ts[1][:, : groups * width], *ts[2:])  # with gate_view, columns of z's leaf: rows 9 wider
        out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
        results.append([out, *(t.grad for t in ts)])
    for got, want in zip(*results):
        _close(got, want, 2e-5)


def test_gated_norm_functions_read_any_gate_layout(norm_kernels, monkeypatch):
    # norm_fwd and norm_bwd called directly with a gate z whose rows are not dense (stored column major): they read
    # a dense copy of it, never z's memory through the copy's strides.
    monkeypatch.setattr(importlib.import_module("mmeff.kernels.utils"), "POISON", True)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(37, 48, generator=gen)
    z = torch.randn(48, 37, generator=gen).t()  # [37, 48], strides (1, 37)
    weight, bias = torch.randn(48, generator=gen), torch.randn(48, generator=gen)
    mode = norm_kernels.GATE_AFTER.value
    dy = torch.linspace(-1, 1, x.numel()).view(x.shape)
    y, mean, rstd, _ = norm_kernels.norm_fwd(x, weight, bias, 1e-5, False, 1, torch.float32, z, mode)
    dx, dw, db, dz, _ = norm_kernels.norm_bwd(dy, x, weight, bias, mean, rstd, False, 1, z, mode)
    expected = norm_kernels.norm_fwd(x, weight, bias, 1e-5, False, 1, torch.float32, z.contiguous(), mode)[0]
    want = norm_kernels.norm_bwd(dy, x, weight, bias, mean, rstd, False, 1, z.contiguous(), mode)[:4]
    for got, ref in zip([y, dx, dw, db, dz], [expected, *want]):
        _close(got, ref, 1e-6)


# x [B, T, H, N] as it reaches the l2 feature map: contiguous, or q's slice of a fused conv output (strided rows);
# N not a power of two; one row all zeros (its norm below eps: no projection in the backward, dx = dy / eps).
# fp32: each element of y and dx within 1e-6 * max(1, |reference|) of the reference autograd function (measured ~1e-7). bf16: y within
# one bf16 ulp (2^-7 relative; the interpreter truncates where the reference rounds), and dx within one ulp of the
# reference's backward formula applied to the kernel's own y (a y one ulp apart moves dx further: dy - y <dy, y>
# cancels; against float64 both the kernel's and the reference's dx are off by up to 0.002 at |dx| < 0.6).
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_l2_normalize_matches_reference(norm_kernels, monkeypatch, fused, dtype):
    from mmeff.ops import features

    monkeypatch.setattr(importlib.import_module("mmeff.kernels.utils"), "POISON", True)
    B, T, H, N, eps = 2, 5, 3, 20, 1e-12
    gen = torch.Generator().manual_seed(7)
    first = H * N if fused else 0  # where x starts in its source
    source = torch.randn(B, T, (3 if fused else 1) * H * N, generator=gen) * 2
    source[1, 2, first + N : first + 2 * N] = 0.0  # x[1, 2, 1]
    dy = torch.randn(B, T, H, N, generator=gen).to(dtype)

    def run(fn):
        leaf = source.to(dtype).requires_grad_()
        y = fn(leaf[..., first : first + H * N].unflatten(-1, (H, N)), eps)
        return y, torch.autograd.grad(y, leaf, dy)[0][..., first : first + H * N].unflatten(-1, (H, N))

    (y, dx), (want_y, want_dx) = run(norm_kernels.L2Normalize.apply), run(features._L2Normalize.apply)
    assert y.dtype == dx.dtype == dtype and y.shape == dx.shape == want_y.shape
    assert y[1, 2, 1].abs().max() == 0  # the zero row stays zero
    if dtype == torch.float32:
        for got, want in ((y, want_y), (dx, want_dx)):
            assert ((got - want).abs() <= 1e-6 * want.abs().clamp_min(1.0)).all()  # elementwise: dx / eps is 1e12-sized
        return
    n = source[..., first : first + H * N].unflatten(-1, (H, N)).to(dtype).float().norm(dim=-1, keepdim=True)
    along = torch.where(n > eps, (dy.float() * y.float()).sum(-1, keepdim=True), 0.0)
    own_dx = ((dy.float() - y.float() * along) / n.clamp_min(eps)).to(dtype)
    for got, want in ((y, want_y), (dx, own_dx)):
        assert ((got.float() - want.float()).abs() <= 2**-7 * want.float().abs() + 1e-6).all()


def test_l2_feature_map_takes_the_kernel_on_cuda(norm_kernels, monkeypatch):
    from mmeff.ops import dispatch
    from mmeff.ops.features import FEATURE_MAPS

    calls = []
    monkeypatch.setattr(dispatch, "on_cuda", lambda x: True)
    monkeypatch.setattr(norm_kernels.L2Normalize, "apply", lambda *a: calls.append(a) or a[0])
    FEATURE_MAPS["l2"](torch.randn(2, 3, 4, requires_grad=True))
    assert len(calls) == 1
    monkeypatch.setenv("MMEFF_FORCE_REFERENCE", "1")
    FEATURE_MAPS["l2"](torch.randn(2, 3, 4, requires_grad=True))
    assert len(calls) == 1


# x fp32 (the residual stream) or bf16, r bf16 (a branch under autocast) or fp32; the norm output fp32 or bf16.
@pytest.mark.parametrize("x_dtype,r_dtype,out_dtype", [
    (torch.float32, torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
])  # fmt: skip
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("stream_used", [True, False])
def test_add_norm_matches_add_then_norm(norm_kernels, monkeypatch, x_dtype, r_dtype, out_dtype, kind, stream_used):
    # AddNorm's (x + r, norm(x + r)) and the gradients of x, r, weight and bias against the Norm kernel on x + r made by
    # torch (the stream's gradient summed and cast by autograd): bit for bit, since the fused kernels compute the same
    # sum and the same normalisation. What the kernels cast down from fp32 (r's bf16 gradient; s and the gradients
    # of a bf16 stream) is within one bf16 ulp, and what follows from such an s within two (the interpreter truncates
    # where torch and the GPU round). With `stream_used` False only the norm's output reaches the loss (ds is None).
    monkeypatch.setattr(importlib.import_module("mmeff.kernels.utils"), "POISON", True)
    monkeypatch.setattr(norm_kernels, "sm_count", lambda device: 1)
    rows, width = 37, 48
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(rows, width, generator=gen) * 3 + 1).to(x_dtype)
    r = torch.randn(rows, width, generator=gen).to(r_dtype)
    weight = torch.randn(width, generator=gen)
    bias = torch.randn(width, generator=gen) if kind == "layer" else None
    rms = kind == "rms"
    ds = torch.linspace(-2, 1, rows * width).view(rows, width)
    dy = torch.linspace(-1, 1, rows * width).view(rows, width).to(out_dtype)

    def fused(x, r, w, b):
        return norm_kernels.AddNorm.apply(x, r, w, b, 1e-5, rms, out_dtype)

    def unfused(x, r, w, b):
        s = x + r
        return s, norm_kernels.Norm.apply(s, w, b, 1e-5, rms, 1, out_dtype)

    results = []
    for fn in (fused, unfused):
        leaves = [t.detach().clone().requires_grad_() for t in (x, r, weight, bias) if t is not None]
        s, y = fn(*leaves[:3], leaves[3] if bias is not None else None)
        assert s.dtype == torch.result_type(x, r) and y.dtype == out_dtype
        torch.autograd.backward([s, y] if stream_used else [y], [ds.to(s.dtype), dy] if stream_used else [dy])
        results.append([s, y, *(t.grad for t in leaves)])
    for i, (got, want) in enumerate(zip(*results)):
        assert got.dtype == want.dtype
        if x_dtype != torch.float32:
            _close(got, want, 2**-6)
        elif i == 3 and r_dtype != x_dtype:
            _close(got, want, 2**-7)
        else:
            assert torch.equal(got, want)


def test_add_norm_op_matches_reference(norm_kernels):
    # mmeff.ops.add_norm on the kernel path (CUDA stood in by the interpreter) against its reference, under autocast.
    from mmeff.ops import dispatch
    from mmeff.ops.norm import add_norm

    gen = torch.Generator().manual_seed(5)
    x, r = torch.randn(2, 9, 40, generator=gen), torch.randn(2, 9, 40, generator=gen).bfloat16()
    weight, bias = torch.randn(40, generator=gen), torch.randn(40, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s_ref, y_ref = add_norm(x, r, weight, bias, 1e-6, "layer", backend="torch")
        original = dispatch.on_cuda
        dispatch.on_cuda = lambda t: True
        try:
            s, y = add_norm(x, r, weight, bias, 1e-6, "layer", backend="triton")
        finally:
            dispatch.on_cuda = original
    assert s.dtype == s_ref.dtype == torch.float32 and y.dtype == y_ref.dtype == torch.bfloat16
    assert torch.equal(s, s_ref)
    _close(y, y_ref, 2**-7)
    with pytest.raises(ValueError, match=r"the residual \(2, 9\) must have the shape of x \(2, 9, 40\)"):
        add_norm(x, r[..., 0], weight, bias)
