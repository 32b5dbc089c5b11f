"""The pointwise kernels (mmeff.kernels.pointwise: GLA's log-sigmoid gate, the elu+1 feature map, the delta rule's
scaled sigmoid and Mamba's time step and log decay, through mmeff.ops with a faked GPU) under the Triton interpreter against the reference autograd functions: output and the
gradient of x, fp32 and bf16 inputs (contiguous, a slice read in place, a view copied first), a flat size that is not a multiple of the block.

The reference runs in fp32 on the same (bf16) values. Tolerance: |kernel - reference| <= 1e-6 + 1e-5 |reference| for
an fp32 result (the kernel's log(1 + e^-|x|) against logsigmoid's log1p differs by ~1e-8 absolute); a bf16 result
within one bf16 ulp (2^-7 relative; the interpreter truncates) plus 1e-6, a bf16 gradient of elu + 1 within two (it
reads the bf16 output, as the reference autograd function on bf16 inputs does). (Against a bf16 reference elu + 1 would be
further off: it rounds elu(x) near -1 before adding 1, losing e^x's digits, which the kernel keeps.)
"""

from __future__ import annotations

import importlib

import pytest
import torch

from mmeff.ops import dispatch, features, gates


@pytest.fixture
def fake_gpu(kernels, monkeypatch):
    monkeypatch.setattr(dispatch, "on_cuda", lambda x: True)
    monkeypatch.setattr(importlib.import_module("mmeff.kernels.utils"), "POISON", True)
    return importlib.import_module("mmeff.kernels.pointwise")


MAPS = {
    "log_sigmoid_gate": (lambda x: gates.log_sigmoid_gate(x, 16.0), lambda x: gates._LogSigmoidGate.apply(x, 16.0)),
    "elu_plus_one": (features.FEATURE_MAPS["elu"], features._EluPlusOne.apply),
    "scaled_sigmoid": (lambda x: gates.scaled_sigmoid(x, 2.0), lambda x: 2.0 * torch.sigmoid(x)),
}


# Inputs: contiguous; q and k's slice of a qkv projection [B, T, 3 * 2 * 20] as heads [B, T, 2 * 2, 20] (rows 120
# apart, read in place); a transposed view (no rows view: copied first).
LAYOUTS = {
    "contiguous": ((3, 1000), lambda x: x),
    "slice": ((3, 25, 120), lambda x: x[..., :80].unflatten(-1, (4, 20))),
    "transposed": ((1000, 3), lambda x: x.t()),
}


@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pointwise_maps_match_reference(fake_gpu, monkeypatch, name, dtype, layout):
    calls = []
    monkeypatch.setattr(fake_gpu.Pointwise, "apply", lambda *a, f=fake_gpu.Pointwise.apply: calls.append(1) or f(*a))
    gen = torch.Generator().manual_seed(5)
    shape, view = LAYOUTS[layout]
    x = (torch.randn(*shape, generator=gen) * 6).to(dtype)  # 3,000 or 9,000 elements: the last block masked
    x.view(-1)[:4] = torch.tensor([40.0, -40.0, 0.0, 1e-3])
    fast, reference = MAPS[name]

    def run(fn, leaf):
        leaf = leaf.detach().clone().requires_grad_()
        y = fn(view(leaf))
        dy = torch.linspace(-1, 1, y.numel()).view(y.shape).to(y.dtype)
        return y, torch.autograd.grad(y, leaf, dy)[0]

    got, want = run(fast, x), run(reference, x.float())
    assert calls
    assert got[1].dtype == dtype and got[0].dtype == (dtype if name == "elu_plus_one" else torch.float32)
    for g, w, ulps in zip(got, want, (1, 2)):
        rtol = 1e-5 if g.dtype == torch.float32 else ulps * 2**-7
        assert g.shape == w.shape and ((g.float() - w).abs() <= 1e-6 + rtol * w.abs()).all()


# x [B, T, H] bf16 or fp32, a strided slice (Mamba-2's dt in its in_proj output) or not; H not a power of two; rows
# past one program; values past softplus' threshold (20) and a clamp that bites. Tolerance: fp32 results within
# 1e-6 + 1e-5 |reference| (log(1 + e^x) against log1p; the gradients of A and the bias, sums over the tokens in
# another order, against their largest element), bf16 dx within one bf16 ulp (the interpreter truncates).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("limit,bias", [((0.0, float("inf")), True), ((1e-3, 0.1), True), ((0.0, float("inf")), False)])
@pytest.mark.parametrize("used", ["both", "dt", "log"])
def test_softplus_decay_matches_reference(fake_gpu, monkeypatch, dtype, strided, limit, bias, used):
    calls = []
    monkeypatch.setattr(fake_gpu.Decay, "apply", lambda *a, f=fake_gpu.Decay.apply: calls.append(1) or f(*a))
    gen = torch.Generator().manual_seed(11)
    H = 6
    source = (torch.randn(2, 70, 3 * H, generator=gen) * 8).to(dtype)
    source[0, 0, :3] = torch.tensor([25.0, -30.0, 0.0])
    b = torch.randn(H, generator=gen) if bias else None
    A = -torch.rand(H, generator=gen) * 4 - 0.1

    def run(op):
        leaves = [t.detach().clone().requires_grad_() for t in (source, A) + ((b,) if bias else ())]
        x = leaves[0][..., H : 2 * H] if strided else leaves[0][..., :H].contiguous()
        dt, log_decay = op(x, leaves[2] if bias else None, leaves[1], limit)
        outs = {"both": [dt, log_decay], "dt": [dt], "log": [log_decay]}[used]
        grads = torch.autograd.grad(outs, leaves, [torch.linspace(-1, 1, o.numel()).view(o.shape) for o in outs],
                                    allow_unused=True)  # fmt: skip
        return [dt, log_decay, *grads]

    got = run(gates.softplus_decay)
    monkeypatch.setattr(dispatch, "on_cuda", lambda x: False)
    want = run(gates.softplus_decay)
    assert len(calls) == 1
    for g, w in zip(got, want):
        if w is None:
            assert g is None or not g.abs().any()
            continue
        rtol = 1e-5 if g.dtype == torch.float32 else 2**-7
        # A and the bias sum over the tokens in another order: their error against the largest
        err = (g.float() - w.float()).abs()
        assert g.dtype == w.dtype and g.shape == w.shape
        assert (err <= 1e-6 + rtol * (w.float().abs().max() if w.dim() == 1 else w.float().abs())).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softplus_decay_takes_A_as_its_log(fake_gpu, monkeypatch, dtype):
    # A_log=True (Gated DeltaNet's decay): the kernels make A = -exp(A_log) and its gradient themselves, where the
    # block launched exp and neg forward and their two backwards; values and every gradient as the reference's from
    # A_log (tolerances as above).
    gen = torch.Generator().manual_seed(12)
    x0 = (torch.randn(2, 70, 6, generator=gen) * 8).to(dtype)
    b0, log0 = torch.randn(6, generator=gen), (torch.rand(6, generator=gen) * 16 + 1e-4).log()

    def run():
        x, b, A_log = (t.detach().clone().requires_grad_() for t in (x0, b0, log0))
        dt, log_decay = gates.softplus_decay(x, b, A_log, A_log=True)
        grads = torch.autograd.grad([dt, log_decay], [x, b, A_log], [torch.linspace(-1, 1, dt.numel()).view(dt.shape)] * 2)
        return [dt, log_decay, *grads]

    calls = []
    monkeypatch.setattr(fake_gpu.Decay, "apply", lambda *a, f=fake_gpu.Decay.apply: calls.append(1) or f(*a))
    got = run()
    monkeypatch.setattr(dispatch, "on_cuda", lambda x: False)
    want = run()
    assert len(calls) == 1
    for g, w in zip(got, want):
        rtol = 1e-5 if g.dtype == torch.float32 else 2**-7
        err = (g.float() - w.float()).abs()
        assert g.dtype == w.dtype and g.shape == w.shape
        assert (err <= 1e-6 + rtol * (w.float().abs().max() if w.dim() == 1 else w.float().abs())).all()


@pytest.mark.parametrize("strided", [False, True])
def test_softplus_decay_keeps_only_its_own_inputs(fake_gpu, strided):
    # x a slice of a wider projection (Mamba-2's dt in its in_proj output): the kernel keeps x's own copy, not the
    # projection (the Mamba-2 LM kept 8.3 KiB per token and layer more through the slice). x, the bias and A only.
    from kernel_cases import saved_bytes

    source = torch.randn(2, 70, 96, requires_grad=True)
    x = source[..., 32:64] if strided else source[..., 32:64].detach().clone().requires_grad_()
    bias, A = torch.randn(32, requires_grad=True), -torch.rand(32, requires_grad=True)
    with saved_bytes() as kept:
        dt, log_decay = gates.softplus_decay(x, bias, A)
    assert sum(kept.values()) == (2 * 70 * 32 + 32 + 32) * 4
    (dt.sum() + log_decay.sum()).backward()
    assert source.grad is not None if strided else x.grad is not None


@pytest.mark.parametrize("kind", ["gla", "linear_attn"])
def test_bidirectional_mixer_maps_q_and_k_in_one_launch(fake_gpu, monkeypatch, kind):
    # A bidirectional mixer without a short conv maps q and k (elu + 1) before its scan routes: one launch for both,
    # read in place from the qkv projection; output and every gradient as on the reference path mapping q and k each
    # after the routes (fp32, within 1e-5).
    from mmeff import blocks
    from mmeff.blocks.layout import Layout

    calls = []
    monkeypatch.setattr(fake_gpu.Pointwise, "apply", lambda *a, f=fake_gpu.Pointwise.apply: calls.append(a[1]) or f(*a))
    torch.manual_seed(0)
    mixer = blocks.build(kind, 64, heads=4, causal=False, feature_map="elu")
    x = torch.randn(2, 16, 64)

    def run():
        leaf = x.clone().requires_grad_()
        y = mixer(leaf, layout=Layout(grid=(1, 4, 4)))
        return [y, *torch.autograd.grad(y, [leaf, *mixer.parameters()], torch.linspace(-1, 1, y.numel()).view(y.shape))]

    got = run()
    assert calls.count(fake_gpu.ELU_PLUS_ONE.value) == 1
    monkeypatch.setattr(dispatch, "on_cuda", lambda x: False)
    mixer.features_first = False
    for g, w in zip(got, run()):
        assert g.shape == w.shape and torch.allclose(g, w, rtol=1e-5, atol=1e-5)


# SSD's per-head maps around its recurrence (mmeff.ops.ssm: v = x dt, out = y + D x): x a slice of a wider tensor (the
# short conv's output, read in place), 3 heads (not a power of two) of 16, 100 tokens (past one program's 64).
# Tolerance: outputs and dx within one ulp of their dtype (bf16: the interpreter truncates where the GPU rounds),
# ddt within 1e-5 relative; dD, a sum over the tokens in another order, within 1e-5 of its largest element.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["scale", "skip"])
def test_ssd_per_head_maps_match_reference(fake_gpu, monkeypatch, dtype, op):
    from mmeff.ops import ssm

    calls = []
    for name in ("HeadScale", "HeadSkip"):
        fn = getattr(fake_gpu, name)
        monkeypatch.setattr(fn, "apply", lambda *a, f=fn.apply: calls.append(1) or f(*a))
    gen = torch.Generator().manual_seed(3)
    H, P = 3, 16
    source = torch.randn(2, 50, 2 * H * P + 8, generator=gen).to(dtype)
    other = {"scale": torch.rand(2, 50, H, generator=gen) + 0.01, "skip": torch.randn(H, generator=gen)}[op]
    y = torch.randn(2, 50, H, P, generator=gen).to(dtype)

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (source, other, y)]
        x = leaves[0][..., 8 : 8 + H * P].unflatten(-1, (H, P))
        out = ssm._scaled(x, leaves[1]) if op == "scale" else ssm._skip_and_gate(leaves[2], x, leaves[1][:, None], None, dtype)
        grads = torch.autograd.grad(out, leaves, torch.linspace(-1, 1, out.numel()).view(out.shape).to(out.dtype),
                                    allow_unused=True)  # fmt: skip
        return [out, *grads]

    got = run()
    monkeypatch.setattr(dispatch, "on_cuda", lambda x: False)
    want = run()
    assert len(calls) == 1
    for g, w in zip(got, want):
        if w is None:
            assert g is None
            continue
        assert g.dtype == w.dtype and g.shape == w.shape
        ulp = 2**-7 if g.dtype == torch.bfloat16 else 1e-5
        scale = w.float().abs().max() if w.dim() == 1 else w.float().abs()  # dD: a sum in another order
        assert ((g.float() - w.float()).abs() <= 1e-6 + ulp * scale).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ssd_skip_leaves_its_dx_to_the_scale(fake_gpu, monkeypatch, dtype):
    # SSD's v = x dt and out = y + D x sharing one link (mmeff.ops.ssm.ssd): the skip's backward makes no dx of its
    # own (autograd held it through the recurrence's backward, waiting for the scale's term); the scale's backward
    # adds D dout to dv dt in its pass. Gradients as the plain ops' within 2 ulps of each one's largest element (the
    # linked dx rounds once where autograd's sum rounds each term), a cumulative sum standing in for the recurrence.
    from mmeff.ops import ssm

    gen = torch.Generator().manual_seed(5)
    H, P = 3, 16
    source = torch.randn(2, 50, H * P + 8, generator=gen).to(dtype)
    dt, D = torch.rand(2, 50, H, generator=gen) + 0.01, torch.randn(H, generator=gen)
    made = []
    original = fake_gpu.empty
    monkeypatch.setattr(fake_gpu, "empty", lambda shape, *a: made.append(tuple(shape)) or original(shape, *a))

    def run(link):
        leaves = [t.detach().clone().requires_grad_() for t in (source, dt, D)]
        x = leaves[0][..., 8:].unflatten(-1, (H, P))
        y = ssm._scaled(x, leaves[1], link).cumsum(1) * 0.5
        out = ssm._skip_and_gate(y, x, leaves[2][:, None], None, dtype, link)
        made.clear()
        grads = torch.autograd.grad(out, leaves, torch.linspace(-1, 1, out.numel()).view(out.shape).to(dtype))
        return [out, *grads], made.count((2, 50, H, P))

    (got, linked), (alone, unlinked) = run({}), run(None)
    assert (linked, unlinked) == (1, 2)  # dx buffers made in the backward
    monkeypatch.setattr(dispatch, "on_cuda", lambda x: False)
    want, _ = run(None)
    for g, a, w in zip(got, alone, want):  # the linked dx rounds once, the others' twice: 2 ulps of the largest
        ulp = 2**-7 if g.dtype == torch.bfloat16 else 1e-5
        assert g.dtype == w.dtype and ((g.float() - w.float()).abs() <= 1e-6 + 2 * ulp * w.float().abs().max()).all()
        assert ((a.float() - w.float()).abs() <= 1e-6 + 2 * ulp * w.float().abs().max()).all()

