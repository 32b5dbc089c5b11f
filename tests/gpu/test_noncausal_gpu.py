"""Non-causal linear attention (mmeff.ops.global_linear_attention, the block-diagonal GEMMs) at the vision
benchmark's 2048 px shape in bf16 under autocast against the per-head definition in fp32 on the same inputs, forward and every
gradient: ||bf16 - fp32|| / ||fp32|| < 1e-2.
"""

from __future__ import annotations

import pytest
import torch

from mmeff.ops import global_linear_attention


def _definition(q, k, v, scale, normalize, eps):
    S = torch.einsum("bthk,bthv->bhkv", k, v)
    o = torch.einsum("bthk,bhkv->bthv", q, S) * scale
    if not normalize:
        return o
    return o / (torch.einsum("bthk,bhk->bth", q, k.sum(1)) * scale + eps).unsqueeze(-1)


@pytest.mark.parametrize("normalize", [False, True])
def test_bf16_matches_fp32_definition_at_16k_tokens(normalize):
    gen = torch.Generator(device="cuda").manual_seed(0)
    B, T, H, D = 4, 16384, 6, 64
    q, k = (torch.rand(B, T, H, D, device="cuda", generator=gen) for _ in range(2))  # positive, as after elu + 1
    v = torch.randn(B, T, H, D, device="cuda", generator=gen)
    do = torch.randn(B, T, H, D, device="cuda", generator=gen)
    results = []
    for dtype, fn in ((torch.bfloat16, global_linear_attention), (torch.float32, _definition)):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        with torch.autocast("cuda", torch.bfloat16, enabled=dtype == torch.bfloat16):  # as in training: it sums in fp32
            o = fn(*leaves, D**-0.5, normalize=normalize, eps=1e-6)
        o.backward(do.to(o.dtype))
        results.append([o] + [t.grad for t in leaves])
    errors = [((a.float() - b).norm() / b.norm()).item() for a, b in zip(*results)]
    assert all(e < 1e-2 for e in errors), errors
