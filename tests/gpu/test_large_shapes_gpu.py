"""Large shapes on the GPU: T = 128k and tensors past 2**31 elements (int32 element offsets would wrap) through the
recurrence, short-conv and MoE-glue kernels, forward and backward.

Each call holds identical batch elements (or rows), so the last one, whose elements lie past 2**31, must equal the
first bit for bit (the kernels are deterministic, no atomics). Tens of GB each: opt-in, one at a time, not in
the parallel suite:

    MMEFF_LARGE_TESTS=1 python -m pytest -q -p no:cacheprovider tests/gpu/test_large_shapes_gpu.py
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from mmeff import ops
from mmeff.ops import grouped

pytestmark = pytest.mark.skipif(os.environ.get("MMEFF_LARGE_TESTS") != "1", reason="set MMEFF_LARGE_TESTS=1")
T = 2**17  # 128k steps


def _repeated(batch: int, *shape: int, dtype=torch.bfloat16) -> torch.Tensor:
    """`batch` identical copies of one random [1, *shape] tensor, as one contiguous [batch, *shape] tensor."""
    one = torch.randn(1, *shape, device="cuda", dtype=torch.float32).to(dtype)
    return one.expand(batch, *shape).contiguous()


def _same_first_last(*tensors: torch.Tensor) -> None:
    for t in tensors:
        assert torch.isfinite(t[-1].float()).all()
        assert torch.equal(t[-1], t[0]), (tuple(t.shape), (t[-1].float() - t[0].float()).abs().max().item())


@pytest.mark.parametrize("kind", ["scalar_decay", "gated_delta_rule"])
def test_recurrence_past_int32(kind):
    batch, heads, dim = 3, 48, 128  # q: 3 * 128k * 48 * 128 = 2.25 * 2**31 elements
    q, k, v = (_repeated(batch, T, heads, dim) for _ in range(3))
    k = F.normalize(k.float(), dim=-1).to(torch.bfloat16) if kind == "gated_delta_rule" else k
    g = F.logsigmoid(_repeated(batch, T, heads, dtype=torch.float32)) / 16
    beta = torch.sigmoid(_repeated(batch, T, heads, dtype=torch.float32)) if kind == "gated_delta_rule" else None
    leaves = [t.requires_grad_() for t in (q, k, v)]
    o, state = ops.linear_recurrence(*leaves, g, beta, scale=dim**-0.5, output_final_state=True, backend="triton")
    _same_first_last(o, state)
    if kind == "scalar_decay":  # the backward of the other holds too many [T, H, D] fp32 buffers for one GPU
        o.backward(_repeated(batch, T, heads, dim))
        _same_first_last(*(t.grad for t in leaves))


def test_short_conv_past_int32():
    batch, channels = 3, 6144  # 3 * 128k * 6144 = 2.25 * 2**31 elements
    x = _repeated(batch, T, channels).requires_grad_()
    weight = torch.randn(channels, 4, device="cuda").requires_grad_()
    docs = torch.zeros(batch, T, dtype=torch.long, device="cuda")
    docs[:, T // 2 :] = 1
    for d in (None, docs):
        y = ops.causal_conv1d(x, weight, docs=d, backend="triton")
        y.backward(_repeated(batch, T, channels))
        _same_first_last(y, x.grad)
        x.grad = None


def test_moe_glue_past_int32():
    tokens, k, dim = 2**18, 4, 2304  # rows: 2**20 * 2304 = 1.125 * 2**31 elements
    x = _repeated(tokens, dim).requires_grad_()
    experts = torch.arange(tokens * k, device="cuda").view(tokens, k) % 8
    weights = torch.full((tokens, k), 0.25, device="cuda", requires_grad=True)
    order, inv = grouped.sort_assignments(experts)
    rows = grouped.dispatch(x, order, inv, k, backend="triton")
    out = grouped.combine(rows, order, inv, weights, backend="triton")
    out.backward(_repeated(tokens, dim))
    _same_first_last(out, x.grad)
    h = _repeated(tokens * k, 2 * dim).requires_grad_()
    act = grouped.activate(h, gated=True, backend="triton")
    act.backward(_repeated(tokens * k, dim))
    _same_first_last(act, h.grad)
