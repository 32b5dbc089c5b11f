"""The pointwise kernels (mmeff.kernels.pointwise: GLA's log-sigmoid gate and the elu+1 feature map, through
mmeff.ops with a faked GPU) under the Triton interpreter against the reference autograd functions: output and the
gradient of x, fp32 and bf16 inputs, a flat size that is not a multiple of the block.

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
}


@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pointwise_maps_match_reference(fake_gpu, monkeypatch, name, dtype):
    calls = []
    monkeypatch.setattr(fake_gpu.Pointwise, "apply", lambda *a, f=fake_gpu.Pointwise.apply: calls.append(1) or f(*a))
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 1000, generator=gen) * 6).to(dtype)  # 3,000 elements: two blocks, the second masked
    x[0, :4] = torch.tensor([40.0, -40.0, 0.0, 1e-3])
    fast, reference = MAPS[name]

    def run(fn, leaf):
        leaf = leaf.detach().clone().requires_grad_()
        y = fn(leaf)
        dy = torch.linspace(-1, 1, y.numel()).view(y.shape).to(y.dtype)
        return y, torch.autograd.grad(y, leaf, dy)[0]

    got, want = run(fast, x), run(reference, x.float())
    assert calls
    assert got[1].dtype == dtype and got[0].dtype == (torch.float32 if name == "log_sigmoid_gate" else dtype)
    for g, w, ulps in zip(got, want, (1, 2)):
        rtol = 1e-5 if g.dtype == torch.float32 else ulps * 2**-7
        assert g.shape == w.shape and ((g.float() - w).abs() <= 1e-6 + rtol * w.abs()).all()
