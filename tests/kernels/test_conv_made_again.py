"""Mamba-2's short-conv output, which SSD keeps views of (x, B, C) for its backward, kept as the conv's input and made
again there (ShortConv.made_again). On the Triton path (interpreted) under bf16 autocast, as the block runs: output and
every gradient bit for bit those of keeping it, and the block keeps the conv's output no more (one copy per scan
route). (DeltaNet's recurrence keeps a packed copy of v, not a view of the conv's output: nothing to gain there.)"""

import contextlib

import pytest
import torch
from kernel_cases import saved_bytes

from mmeff import blocks
from mmeff.blocks.layout import Layout
from mmeff.ops import dispatch

B, T, DIM = 2, 16, 64


def _run(mixer: torch.nn.Module, x0: torch.Tensor):
    """(output, gradients of x and every parameter, bytes of the storages autograd kept)."""
    x = x0.clone().requires_grad_()
    with saved_bytes() as kept, torch.autocast("cpu", dtype=torch.bfloat16):
        y = mixer(x, layout=Layout(grid=(1, 4, 4)))
    y.float().square().sum().backward()
    grads = [x.grad.clone(), *(p.grad.clone() for p in mixer.parameters())]
    mixer.zero_grad(set_to_none=True)
    return y.detach(), grads, sum(kept.values())


@pytest.mark.parametrize("causal", [True, False])
def test_conv_output_made_again_in_the_backward(kernels, monkeypatch, causal):
    monkeypatch.setattr(dispatch, "on_cuda", lambda x: True)
    torch.manual_seed(0)
    mixer = blocks.build("mamba2", DIM, causal=causal, d_state=16, head_dim=16)
    x0 = torch.randn(B, T, DIM)
    made = _run(mixer, x0)
    monkeypatch.setattr("mmeff.blocks.conv.recomputed", lambda recipes: contextlib.nullcontext())
    kept = _run(mixer, x0)
    assert torch.equal(kept[0], made[0])
    assert all(torch.equal(a, b) for a, b in zip(kept[1], made[1]))
    routes = 1 if causal else 2
    width = 2 * DIM + 2 * 16  # x (expand 2), B and C
    assert kept[2] - made[2] == routes * B * T * width * 2  # the conv's bf16 output, every route's
