"""Non-causal linear attention (mmeff.ops.global_linear_attention) at the vision benchmark's 2048 px shape in bf16
under autocast against the per-head definition in fp32 on the same inputs, forward and every gradient:
||bf16 - fp32|| / ||fp32|| < 1e-2. Both backends: the fused kernels (mmeff.kernels.noncausal, q, k, v as views of one
qkv projection, as the mixer gives them) and the block-diagonal GEMMs ("torch").
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmeff.ops import global_linear_attention

FEATURES = {"identity": lambda x: x, "elu": lambda x: F.elu(x) + 1}


def _definition(q, k, v, scale, normalize, eps, feature_map):
    q, k = FEATURES[feature_map](q), FEATURES[feature_map](k)
    S = torch.einsum("bthk,bthv->bhkv", k, v)
    o = torch.einsum("bthk,bhkv->bthv", q, S) * scale
    if not normalize:
        return o
    return o / (torch.einsum("bthk,bhk->bth", q, k.sum(1)) * scale + eps).unsqueeze(-1)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("normalize, feature_map", [(False, "identity"), (True, "identity"), (True, "elu")])
def test_bf16_matches_fp32_definition_at_16k_tokens(normalize, feature_map, backend):
    gen = torch.Generator(device="cuda").manual_seed(0)
    B, T, H, D = 4, 16384, 6, 64
    qkv = torch.randn(B, T, 3 * H * D, device="cuda", generator=gen)
    if feature_map == "identity":  # positive q and k, as after elu + 1
        qkv[..., : 2 * H * D] = qkv[..., : 2 * H * D].abs()
    do = torch.randn(B, T, H, D, device="cuda", generator=gen)
    results = []
    for dtype in (torch.bfloat16, torch.float32):
        leaf = qkv.to(dtype).requires_grad_()
        q, k, v = (t.unflatten(-1, (H, D)) for t in leaf.chunk(3, -1))
        with torch.autocast("cuda", torch.bfloat16, enabled=dtype == torch.bfloat16):  # as in training
            if dtype == torch.bfloat16:
                o = global_linear_attention(q, k, v, D**-0.5, None, normalize, 1e-6, feature_map, backend=backend)
            else:
                o = _definition(q, k, v, D**-0.5, normalize, 1e-6, feature_map)
        o.backward(do.to(o.dtype))
        results.append([o, *leaf.grad.chunk(3, -1)])
    errors = [((a.float() - b).norm() / b.norm()).item() for a, b in zip(*results)]
    assert all(e < 1e-2 for e in errors), errors
