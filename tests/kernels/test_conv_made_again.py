"""The short conv's output of Mamba-2 (SSD keeps views of it: x, B, C), of Mamba (x_proj and the selective scan keep
it) and of the delta-rule mixers (the recipes of their mapped q, k and v's copy read views of it: tests/kernels/
test_mapped_qk.py), kept as the conv's input and made again in the backward (ShortConv.made_again). On the Triton path
(interpreted) under bf16 autocast, as the blocks run: output and every gradient bit for bit those of keeping it, and the
block keeps the conv's output no more (one copy per scan route)."""

import pytest
import torch
from kernel_cases import bytes_made_again

from mmeff import blocks
from mmeff.backbone import Backbone
from mmeff.config import BackboneConfig
from mmeff.blocks.layout import Layout

B, T = 2, 16
LAYOUT = Layout(grid=(1, 4, 4))


class Mixing(torch.nn.Module):
    """A mixer over 8 x 8 token grids."""

    def __init__(self, mixer: torch.nn.Module) -> None:
        super().__init__()
        self.mixer = mixer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixer(x, layout=Layout(grid=(1, 8, 8)))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "kind, options, dim, width",
    [
        ("mamba2", {"d_state": 16, "head_dim": 16}, 64, 2 * 64 + 2 * 16),  # x (expand 2), B and C, which SSD keeps
        # x (expand 2), which x_proj and the selective scan keep; width 16: its scan runs a head per channel, and
        # each is a program of every interpreted kernel (at width 64 the case took 90 s of the suite)
        ("mamba", {"d_state": 8}, 16, 2 * 16),
        ("gated_deltanet", {"heads": 4}, 64, 4 * 64),  # q, k (key width dim) and v (value width 2 dim)
    ],
)
def test_conv_output_made_again_in_the_backward(kernels, monkeypatch, causal, kind, options, dim, width):
    if kind == "mamba" and not causal:  # 24.5 s of CI's 2 cores; its two routes are ScanMixer's, as mamba2's here
        pytest.skip("mamba's bidirectional case: the routes are tested through mamba2 and gated_deltanet")
    torch.manual_seed(0)
    mixer = blocks.build(kind, dim, causal=causal, **options)
    fewer = bytes_made_again(monkeypatch, mixer, torch.randn(B, T, dim), LAYOUT, "mmeff.blocks.conv.recomputed")
    assert fewer == (1 if causal else 2) * B * T * width * 2  # the conv's bf16 output, every route's



def test_compiled_causal_mixer_keeps_no_more_than_eager(kernels, monkeypatch):
    # Compiled, a causal mixer (no scan routes, whose region holds the bidirectional ones) ran outside any
    # compiled_recomputing region, and the partitioner kept what eager mode makes again in the backward: the compiled
    # gated_deltanet LM kept 43.4 KiB per token and layer against 35.4 eager (benchmarks/saved_memory.py --lm
    # --compiled; 8 KiB, its short conv's [T, 4096] bf16 output). Counted after an eager step, which imports the
    # kernels (as dispatch.preload_kernels does on a GPU): the bytes kept for two rows less those for one (the weights
    # left out). Without the region the compiled layer kept 199,936 bytes a row against eager's 183,040.
    from mmeff.ops import dispatch
    from mmeff.ops.recompute import kept_when_compiled, saved_storages

    monkeypatch.setattr(dispatch, "on_cuda", lambda x: True)
    torch.manual_seed(0)
    config = BackboneConfig(dim=64, depth=1, pattern=["gated_deltanet"], mixers={"gated_deltanet": {"heads": 4}})
    model = Backbone(config)
    eager, compiled = [], []
    for n in (1, 2):
        x = torch.randn(n, 64, 64)
        with saved_storages() as found, torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        eager.append(sum(t.untyped_storage().nbytes() for t in found.values()))
        y.float().sum().backward()
        kept = kept_when_compiled(model, x, autocast=torch.bfloat16)
        compiled.append(sum(t.numel() * t.element_size() for t in kept))
    assert compiled[1] - compiled[0] <= eager[1] - eager[0], (eager, compiled)


@pytest.mark.parametrize(
    "kind, options, width",
    [("gated_deltanet", {"heads": 4}, 4 * 64), ("mamba2", {"d_state": 16, "head_dim": 16}, 2 * 64 + 2 * 16)],
)
def test_the_regathered_conv_input_is_not_held_through_the_recurrences_backward(kernels, census, monkeypatch, kind,
                                                                                 options, width):
    # A bidirectional scan's short conv reads its input route-stacked, a copy the backward gathers again from the
    # source stream (mmeff.blocks.scan.regathered), and reads twice: in the recipe of the conv's output, before the
    # recurrence's backward, and in the conv's own backward, after it. Gathered once and held between the two, the copy
    # sat through the recurrence's backward, where the step peaks; gathered for each read (`PerRead`), the backward's
    # peak beyond what the forward keeps is lower by about that copy (B * 2 routes * T * width bf16 bytes).
    from mmeff.blocks import scan as scan_module
    from mmeff.ops import dispatch

    monkeypatch.setattr(dispatch, "on_cuda", lambda x: True)
    torch.manual_seed(0)
    mixer = blocks.build(kind, 64, causal=False, scan="bi", **options)
    model = Mixing(mixer)
    x = torch.randn(B, 64, 64, generator=torch.Generator().manual_seed(0))
    model(x).sum().backward()  # the kernels imported, as dispatch.preload_kernels has them on a GPU
    transient = [census.step_peak(model, x) - census.live(model, x)]
    monkeypatch.setattr(scan_module, "PerRead", lambda make: make)  # gathered once, held until its last read
    transient.append(census.step_peak(model, x) - census.live(model, x))
    copy = B * 2 * 64 * width * 2
    assert transient[1] - transient[0] >= 0.9 * copy, (transient, copy)
