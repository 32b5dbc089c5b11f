"""GroupedNorm.projected: out(norm(y, z)) with the norm's output made again in the backward, on the plain-PyTorch
norm and on the Triton norm kernel (interpreted): one [tokens, width] tensor less kept, outputs and every gradient
bit for bit those of the plain composition, under bf16 autocast as the blocks run. The memory is the kernel's gain: PyTorch's
norm under autocast keeps an fp32 copy of y, so on that path the recipe's y replaces the output, bytes for bytes."""

import pytest
import torch
from torch import nn
from kernel_cases import saved_bytes

from mmeff.blocks.scan import GroupedNorm
from mmeff.ops import dispatch

CASES = [("rms", False, True), ("rms", True, True), ("group", False, True), ("rms", False, False), ("none", False, True)]


def _run(norm: GroupedNorm, out: nn.Linear, y0: torch.Tensor, z0: torch.Tensor | None, projected: bool):
    """(output, gradients of y, z and every parameter, bytes of the storages autograd kept)."""
    y = y0.clone().requires_grad_()
    z = None if z0 is None else z0.clone().requires_grad_()
    with saved_bytes() as kept, torch.autocast("cpu", dtype=torch.bfloat16):
        o = norm.projected(out, y, z) if projected else out(norm(y, z))
    o.float().square().sum().backward()
    params = [*norm.parameters(), *out.parameters()]
    grads = [t.grad.clone() for t in (y, z, *params) if t is not None]
    for p in params:
        p.grad = None
    return o.detach(), grads, sum(kept.values())


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("kind, gate_first, gated", CASES)
def test_projected_norm_keeps_one_tensor_less_and_changes_no_gradient(kernels, monkeypatch, path, kind, gate_first, gated):
    if path == "triton":
        if kind == "none":
            pytest.skip("no norm, no kernel")
        monkeypatch.setattr(dispatch, "on_cuda", lambda x: True)
    gen = torch.Generator().manual_seed(0)
    norm, out = GroupedNorm(64, 4, kind, gate_first=gate_first), nn.Linear(64, 32)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    y0 = torch.randn(2, 16, 64, generator=gen, dtype=torch.bfloat16)
    z0 = torch.randn(2, 16, 64, generator=gen, dtype=torch.bfloat16) if gated else None
    plain, made = (_run(norm, out, y0, z0, projected) for projected in (False, True))
    assert torch.equal(plain[0], made[0])
    assert len(plain[1]) == len(made[1]) and all(torch.equal(a, b) for a, b in zip(plain[1], made[1]))
    if path == "triton":  # the kernel keeps y and z themselves, so the output is all that goes
        assert plain[2] - made[2] == 2 * 16 * 64 * 2  # the bf16 output of the norm, [2, 16, 64]
    else:  # PyTorch's norms under autocast may keep an fp32 copy of y instead of y, which the recipe then keeps
        assert made[2] <= plain[2]


def test_layer_checkpoint_norm_keeps_the_pre_norm_outputs_out(kernels, monkeypatch):
    # backbone.checkpoint: norm, the default, on the kernel path under bf16 autocast: the same output and gradients as
    # checkpoint: false bit for bit, and per layer exactly its two pre-norms' bf16 outputs [tokens, dim] less kept (the
    # norm kernels keep x anyway).
    from mmeff.backbone import Backbone

    monkeypatch.setattr(dispatch, "on_cuda", lambda x: True)
    cfg = {"dim": 64, "pattern": ["gla"], "depth": 2, "mixers": {"gla": {"heads": 2}}, "causal": False}
    x0 = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    runs = {}
    for setting in (False, "norm"):
        torch.manual_seed(0)
        model, x = Backbone({**cfg, "checkpoint": setting} if setting is False else cfg), x0.clone().requires_grad_()
        assert all(layer.checkpoint == setting for layer in model.layers)
        with saved_bytes() as kept, torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.float().square().sum().backward()
        runs[setting] = (y.detach(), [x.grad, *(p.grad for p in model.parameters())], sum(kept.values()))
    (y, grads, plain), (y_made, grads_made, made) = runs[False], runs["norm"]
    assert torch.equal(y, y_made) and all(torch.equal(a, b) for a, b in zip(grads, grads_made))
    assert plain - made == 2 * 2 * x0.numel() * 2  # 2 layers x 2 norms x [2, 16, 64] bf16


@pytest.mark.parametrize("checkpoint", [False, "norm"])
def test_remade_gate_keeps_one_gate_less_a_layer_and_changes_no_gradient(kernels, monkeypatch, checkpoint):
    # remake_gate (RetNet's and Gated DeltaNet's default: their gates are twice the model's width) on the kernel path
    # under bf16 autocast: the gate made again from the block's input in the backward, which keeps the input anyway
    # (or, with checkpoint: norm, makes it again from the residual stream first): bit for bit the same output and
    # gradients, and exactly the layer's bf16 gate [tokens, value width] less kept.
    from mmeff.backbone import Backbone

    monkeypatch.setattr(dispatch, "on_cuda", lambda x: True)
    x0 = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    runs = {}
    for remake in (False, True):
        torch.manual_seed(0)
        mixer = {"heads": 2, "remake_gate": remake, "scan": "bi"}
        cfg = {"dim": 32, "pattern": ["retnet"], "depth": 1, "mixers": {"retnet": mixer}, "causal": False}
        model, x = Backbone({**cfg, "checkpoint": checkpoint}), x0.clone().requires_grad_()
        with saved_bytes() as kept, torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.float().square().sum().backward()
        runs[remake] = (y.detach(), [x.grad, *(p.grad for p in model.parameters())], sum(kept.values()))
    (y, grads, plain), (y_made, grads_made, made) = runs[False], runs[True]
    assert torch.equal(y, y_made) and all(torch.equal(a, b) for a, b in zip(grads, grads_made))
    assert plain - made == 2 * 16 * 64 * 2  # [2, 16, 64] bf16 (values twice the width of 32)
