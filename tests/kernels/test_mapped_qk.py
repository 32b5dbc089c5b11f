"""LinearMixer.attend: the rotated q and k that a recurrence kernel keeps for its backward are made again there from
the stream views q and k (after a short conv they are kept as they are). On the Triton path (interpreted) under bf16
autocast, as the blocks run: outputs and every gradient bit for bit those of keeping them, and a bidirectional RetNet
keeps its two route-stacked copies of the rotated q and k no more."""

import contextlib

import pytest
import torch
from kernel_cases import saved_bytes

from mmeff import blocks
from mmeff.blocks.layout import Layout
from mmeff.ops import dispatch

B, T, DIM, HEADS = 2, 16, 64, 4


def _run(mixer: torch.nn.Module, x0: torch.Tensor):
    """(output, gradients of x and every parameter, bytes of the storages autograd kept)."""
    x = x0.clone().requires_grad_()
    with saved_bytes() as kept, torch.autocast("cpu", dtype=torch.bfloat16):
        y = mixer(x, layout=Layout(grid=(1, 4, 4)))
    y.float().square().sum().backward()
    grads = [x.grad.clone(), *(p.grad.clone() for p in mixer.parameters())]
    mixer.zero_grad(set_to_none=True)
    return y.detach(), grads, sum(kept.values())


@pytest.mark.parametrize(
    "kind, options, fewer",
    [
        ("retnet", {}, 2 * 2 * (B * T * DIM * 2)),  # rotated q and k, two routes each, bf16, key width = dim
        ("retnet", {"conv_size": 4}, 0),  # rotated after the conv, whose output nothing else keeps: kept as they are
        ("gla", {}, 0),  # elu + 1 before the routes: nothing new to make
    ],
)
def test_mapped_qk_made_again_in_the_backward(kernels, monkeypatch, kind, options, fewer):
    monkeypatch.setattr(dispatch, "on_cuda", lambda x: True)
    torch.manual_seed(0)
    mixer = blocks.build(kind, DIM, causal=False, heads=HEADS, **options)
    x0 = torch.randn(B, T, DIM)
    made = _run(mixer, x0)
    monkeypatch.setattr("mmeff.blocks.linear.recomputed", lambda recipes: contextlib.nullcontext())
    kept = _run(mixer, x0)
    assert torch.equal(kept[0], made[0])
    assert all(torch.equal(a, b) for a, b in zip(kept[1], made[1]))
    assert kept[2] - made[2] == fewer
