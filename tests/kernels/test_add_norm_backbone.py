"""The backbone's residual adds made by its norm kernels (`mmeff.ops.add_norm`, the kernels interpreted): every add
but the first layer's input is fused into the norm after it, and the output and every gradient are bit for bit those
of the plain pre-norm stack `x + mixer(norm1(x))`, `x + ffn(norm2(x))` on the same kernels (fp32: the sums and the
norms are the same arithmetic; the GPU test checks bf16 autocast at ViT-S's size)."""

import importlib

import pytest
import torch

from mmeff.backbone import Backbone
from mmeff.ops import dispatch


def _plain(backbone: Backbone, x: torch.Tensor) -> torch.Tensor:
    for layer in backbone.layers:
        x = x + layer.mixer(layer.norm1(x))
        x = x + layer.ffn(layer.norm2(x))
    return backbone.norm(x)


def _grads(fn, backbone: Backbone, x0: torch.Tensor) -> list[torch.Tensor]:
    x = x0.clone().requires_grad_()
    y = fn(x)
    y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape))
    grads = [y.detach(), x.grad, *(p.grad.clone() for p in backbone.parameters())]
    backbone.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("norm,checkpoint", [("layernorm", False), ("rmsnorm", "norm")])
def test_fused_residual_adds_change_nothing(kernels, monkeypatch, norm, checkpoint):
    monkeypatch.setattr(dispatch, "on_cuda", lambda x: True)
    torch.manual_seed(0)
    backbone = Backbone({"dim": 32, "depth": 3, "pattern": ["attn", "gla"], "norm": norm, "checkpoint": checkpoint,
                         "mixers": {"attn": {"heads": 2}, "gla": {"heads": 2}}})  # fmt: skip
    x = torch.randn(2, 8, 32)
    add_norm = importlib.import_module("mmeff.kernels.norm").AddNorm
    fused, calls = add_norm.apply, []
    monkeypatch.setattr(add_norm, "apply", lambda *a: calls.append(1) or fused(*a))
    got = _grads(backbone, backbone, x)
    assert len(calls) == 2 * 3  # norm2 of each layer, norm1 of every layer but the first, the final norm
    want = _grads(lambda t: _plain(backbone, t), backbone, x)
    assert len(calls) == 2 * 3  # the plain stack adds on its own
    for a, b in zip(got, want):
        assert torch.equal(a, b)
