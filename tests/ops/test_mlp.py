"""`ops.act_linear`: the MLP's activation + output projection with the activation's output recomputed in the backward.

Tolerances: fp32 against the plain composition 1e-5 (the same math in another order); bf16 autocast against the
plain composition under the same autocast 2e-2 relative (bf16 rounding of the recomputed activation), and exactly
the reference where the reference is chosen.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmeff import ops
from mmeff.blocks import build


def _inputs(kind: str, bias: bool, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 7, 24, generator=g, dtype=dtype, requires_grad=True)
    up = torch.randn(2, 7, 24, generator=g, dtype=dtype, requires_grad=True) if kind == "swiglu" else None
    w = torch.randn(12, 24, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(12, generator=g, dtype=dtype, requires_grad=True) if bias else None
    return a, up, w, b


def _plain(a, up, w, b, kind):
    return F.linear(F.gelu(a) if kind == "gelu" else F.silu(a) * up, w, b)


def _grads(fn, inputs, dy):
    for t in inputs:
        if t is not None:
            t.grad = None
    y = fn()
    y.backward(dy)
    return y, [None if t is None else t.grad.clone() for t in inputs]


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
def test_act_linear_matches_the_plain_composition(kind, bias, autocast):
    a, up, w, b = _inputs(kind, bias)
    inputs = (a, up, w, b)
    dy = torch.randn(2, 7, 12, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        a_in, up_in = (a.bfloat16(), None if up is None else up.bfloat16()) if autocast else (a, up)  # as fc1's output
        y, grads = _grads(lambda: ops.act_linear(a_in, w, b, kind, up_in), inputs, dy)
        y_ref, grads_ref = _grads(lambda: _plain(a_in, up_in, w, b, kind), inputs, dy)
    assert y.dtype == y_ref.dtype
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_ref, **tol)
    for name, g, r in zip(("a", "up", "weight", "bias"), grads, grads_ref):
        assert (g is None) == (r is None), name
        if g is not None:
            assert g.dtype == r.dtype, name
            torch.testing.assert_close(g, r, **tol, msg=name)


@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
def test_act_linear_keeps_the_activation_input_only(kind):
    # The plain composition keeps the activation's output (and SiLU(g) besides the product for swiglu) for the
    # projection's weight gradient; act_linear keeps a (and up) and the weight only.
    a, up, w, b = _inputs(kind, True)

    def kept(fn) -> int:
        saved = {}
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.setdefault(t.untyped_storage().data_ptr(), t.nbytes) and t, lambda t: t):
            fn()
        return sum(saved.values())

    activation = a.nbytes
    ours, plain = kept(lambda: ops.act_linear(a, w, b, kind, up)), kept(lambda: _plain(a, up, w, b, kind))
    assert ours == sum(t.nbytes for t in (a, up, w) if t is not None)
    assert plain - ours >= activation * (1 if kind == "gelu" else 2)


def test_act_linear_takes_the_reference_where_nothing_is_recorded_or_it_is_forced(monkeypatch):
    a, up, w, b = _inputs("gelu", True)
    with torch.no_grad():
        y = ops.act_linear(a, w, b)
    assert y.grad_fn is None and torch.equal(y, _plain(a, None, w, b, "gelu"))
    assert "ActLinear" in type(ops.act_linear(a, w, b).grad_fn).__name__
    assert "ActLinear" not in type(ops.act_linear(a, w, b, recompute=False).grad_fn).__name__
    monkeypatch.setenv("MMEFF_FORCE_REFERENCE", "1")
    assert "ActLinear" not in type(ops.act_linear(a, w, b).grad_fn).__name__


def test_act_linear_names_bad_arguments():
    a, up, w, b = _inputs("swiglu", True)
    with pytest.raises(ValueError, match="kind must be"):
        ops.act_linear(a, w, b, "relu")
    with pytest.raises(ValueError, match="'swiglu' takes an `up`"):
        ops.act_linear(a, w, b, "swiglu")
    with pytest.raises(ValueError, match="'gelu' takes no `up`"):
        ops.act_linear(a, w, b, "gelu", up)
    with pytest.raises(ValueError, match=r"up \(2, 7, 5\) must have the shape"):
        ops.act_linear(a, w, b, "swiglu", up[..., :5])


@pytest.mark.parametrize("name", ["mlp", "swiglu"])
def test_ffn_blocks_keep_their_gradients_and_lora_wraps_still_run(name):
    # The blocks route through act_linear; a wrapped projection (LoRA's LoraLinear) runs as itself.
    from mmeff.lora import LoraLinear

    torch.manual_seed(0)
    block = build(name, 16)
    x = torch.randn(2, 5, 16, requires_grad=True)
    proj = "fc2" if name == "mlp" else "down"
    linear = getattr(block, proj)
    kind = "gelu" if name == "mlp" else "swiglu"
    first = block.fc1(x) if name == "mlp" else block.gate(x)
    want = _plain(first, None if name == "mlp" else block.up(x), linear.weight, linear.bias, kind)
    got = block(x)
    torch.testing.assert_close(got, want)
    setattr(block, proj, LoraLinear(linear, rank=2, alpha=4.0))
    torch.nn.init.ones_(getattr(block, proj).lora_B)  # a non-zero update: the adapter must reach the output
    assert not torch.allclose(block(x), want)
    block(x).sum().backward()
    assert getattr(block, proj).lora_B.grad is not None


def test_the_backward_holds_one_hidden_wide_tensor_beyond_what_the_forward_keeps(census):
    # The recomputed GELU output, its gradient and the input's gradient ([tokens, hidden] each) were alive at once:
    # 2.88 such tensors beyond what the forward keeps (the peak of a ViT-S step with mmeff attention). Now the output
    # goes before its gradient is made and the input's gradient is written over that: 1.00 (benchmarks/saved_memory.py's
    # count of every storage's lifetime; the weights are small beside 4,096 tokens x 128).
    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.w = torch.nn.Linear(16, 128), torch.nn.Parameter(torch.randn(16, 128) * 0.1)

        def forward(self, x):
            return ops.act_linear(self.fc1(x), self.w)

    model, x = Mlp(), torch.randn(4096, 16)
    transient = census.step_peak(model, x) - census.live(model, x)
    assert transient / (4096 * 128 * 2) <= 1.1  # bf16 under the census's autocast
