"""LinearMixer.attend: the mapped q and k (rotated; l2-normalised after a short conv) that a recurrence kernel, and the
l2 map itself, keep for the backward are made again there from the views q and k of the streams or of the short conv's
output (which the backward makes again from the conv's input); so is v's contiguous copy after a short conv. On the
Triton path (interpreted) under bf16 autocast, as the blocks run: outputs and every gradient bit for bit those of
keeping them, and a bidirectional mixer keeps its two route-stacked copies of each no more."""

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
        # One token order, no conv: nothing made again (their recipes would keep the projection's output, as large as
        # they are together; since f05a7a9 q's and k's had, beside v's copy: the RetNet LM's census, 42.79 -> 38.79).
        ("retnet", {"causal": True}, 0),
        ("retnet", {"conv_size": 4}, 2 * 4 * (B * T * DIM * 2)),  # and v's copy, after the conv
        ("gated_deltanet", {}, 2 * 4 * (B * T * DIM * 2)),  # l2-normalised q, k and v's copy (value width 2 dim)
        ("deltanet", {}, 2 * 3 * (B * T * DIM * 2)),  # l2-normalised q, k and v's copy (value width dim)
        ("gla", {}, 0),  # elu + 1 before the routes: nothing new to make
    ],
)
def test_mapped_qk_made_again_in_the_backward(kernels, monkeypatch, kind, options, fewer):
    torch.manual_seed(0)
    mixer = blocks.build(kind, DIM, heads=HEADS, **{"causal": False, **options})
    names = ("mmeff.blocks.linear.recomputed", "mmeff.blocks.linear.recomputed_output")
    assert bytes_made_again(monkeypatch, mixer, torch.randn(B, T, DIM), LAYOUT, *names) == fewer
