"""LinearMixer.attend: the rotated q and k that a recurrence kernel keeps for its backward are made again there from
the stream views q and k (after a short conv they are kept as they are). On the Triton path (interpreted) under bf16
autocast, as the blocks run: outputs and every gradient bit for bit those of keeping them, and a bidirectional RetNet
keeps its two route-stacked copies of the rotated q and k no more."""

import pytest
import torch
from kernel_cases import bytes_made_again

from mmeff import blocks
from mmeff.blocks.layout import Layout

B, T, DIM, HEADS = 2, 16, 64, 4
LAYOUT = Layout(grid=(1, 4, 4))


@pytest.mark.parametrize(
    "kind, options, fewer",
    [
        ("retnet", {}, 2 * 2 * (B * T * DIM * 2)),  # rotated q and k, two routes each, bf16, key width = dim
        ("retnet", {"conv_size": 4}, 0),  # rotated after the conv, whose output nothing else keeps: kept as they are
        ("gla", {}, 0),  # elu + 1 before the routes: nothing new to make
    ],
)
def test_mapped_qk_made_again_in_the_backward(kernels, monkeypatch, kind, options, fewer):
    torch.manual_seed(0)
    mixer = blocks.build(kind, DIM, causal=False, heads=HEADS, **options)
    assert bytes_made_again(monkeypatch, mixer, torch.randn(B, T, DIM), LAYOUT, "mmeff.blocks.linear.recomputed") == fewer
