"""Non-causal linear attention against its O(T^2) definition, normalised or not, packed or not."""

import pytest
import torch

from mmeff.ops import global_linear_attention


def definition(q, k, v, scale, normalize, eps):
    scores = torch.einsum("bthk,bshk->bhts", q, k) * scale  # every token sees every token
    o = torch.einsum("bhts,bshv->bthv", scores, v)
    return o / (scores.sum(-1).transpose(1, 2).unsqueeze(-1) + eps) if normalize else o


@pytest.mark.parametrize("normalize", [False, True])
def test_matches_definition_and_keeps_packed_sequences_apart(normalize):
    torch.manual_seed(0)
    q, k = torch.rand(2, 13, 3, 8), torch.rand(2, 13, 3, 8)  # positive features, as after elu + 1
    v = torch.randn(2, 13, 3, 5)
    got = global_linear_attention(q, k, v, 0.5, normalize=normalize, eps=1e-3)
    torch.testing.assert_close(got, definition(q, k, v, 0.5, normalize, 1e-3))
    cu = torch.tensor([0, 4, 13, 26], dtype=torch.int32)
    flat = [t.flatten(0, 1)[None] for t in (q, k, v)]
    packed = global_linear_attention(*flat, 0.5, cu, normalize, 1e-3)[0]
    for a, b in ((0, 4), (4, 13), (13, 26)):
        alone = definition(*(t[:, a:b] for t in flat), 0.5, normalize, 1e-3)[0]
        torch.testing.assert_close(packed[a:b], alone)
    with pytest.raises(ValueError, match="batch"):
        global_linear_attention(q, k, v, cu_seqlens=cu)


@pytest.mark.parametrize("normalize", [False, True])
def test_gradients_and_what_the_backward_keeps(normalize):
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.rand(2, 7, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 7, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: global_linear_attention(*a, 0.7, normalize=normalize, eps=1e-2), (q, k, v))
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(tuple(t.shape)) or t, lambda t: t):
        global_linear_attention(q, k, v, 0.7, normalize=normalize)
    # q, k, v and the block-diagonal state [B, H*K, H*V] (beside it the summed keys of each head, its 3 columns padded
    # to 8, when normalising), nothing per token besides
    reader = (2, 12, 15 + 8) if normalize else (2, 12, 15)
    assert sorted(kept) == sorted([(2, 7, 3, 4), (2, 7, 3, 4), (2, 7, 3, 5), reader])
