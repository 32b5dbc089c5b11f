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



@pytest.mark.parametrize("per_read", [1, 0])
def test_a_short_convs_route_copy_is_not_held_through_the_recurrences_backward(kernels, monkeypatch, per_read):
    # A short conv's route-stacked input is read twice in the backward: by the recipe of the conv's output (made again
    # when the recurrence's backward reads it) and by the conv's own backward, after the recurrence's. Gathered once
    # and held between the two (per_read 0), it sat through the recurrence's backward, where the step peaks
    # (gated_deltanet-bi: benchmarks/saved_memory.py --peak); a mixer with a conv gathers it for each read (per_read 1).
    # The conv kernel (interpreted) keeps its input as it is, as on a GPU (F.conv1d keeps a padded copy of its own).
    import weakref

    from mmeff.blocks import scan as scan_module
    from mmeff.blocks.conv import ShortConv
    from mmeff.blocks.scan import Routes
    from mmeff.ops import dispatch

    monkeypatch.setattr(dispatch, "on_cuda", lambda x: True)

    source = torch.randn(2, 13, 6, dtype=torch.float32, requires_grad=True)
    regathered, held = [], []
    stack = scan_module._stack

    def recorded(xs, order, routes, *args, **kwargs):
        ys = stack(xs, order, routes, *args, **kwargs)
        if xs[0] is source and torch.is_grad_enabled() is False and backward_started:  # the backward's gathers of it
            regathered.extend(weakref.ref(y) for y in ys)
        return ys

    class Recurrence(torch.autograd.Function):  # keeps the conv's output, as the recurrence kernels do
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.cumsum(1)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors  # the conv's output made again: its input gathered again
            held.append([r for r in regathered if r() is not None])
            return g.flip(1).cumsum(1).flip(1) + 0 * x

    monkeypatch.setattr(scan_module, "_stack", recorded)
    conv = ShortConv(6, 4)

    def mix(streams, cu_seqlens):
        out, kept_as_input = conv.made_again(streams[0])
        with kept_as_input:
            return Recurrence.apply(out)

    backward_started = False
    out = Routes(causal=False, scan="bi")(mix, [source], Layout(grid=(1, 3, 4), special=1), per_read=per_read)
    backward_started = True
    out.square().sum().backward()
    assert len(regathered) == (2 if per_read else 1)  # for the recipe and for the conv's backward, or once
    assert len(held[0]) == (0 if per_read else 1)
    assert torch.isfinite(source.grad).all()


@pytest.mark.parametrize(
    "kind, options, per_read",
    [("gated_deltanet", {"heads": 4}, 1), ("mamba2", {"d_state": 16, "head_dim": 16}, 1), ("gla", {"heads": 4}, 0)],
)
def test_scan_mixers_gather_their_short_convs_input_for_each_read(monkeypatch, kind, options, per_read):
    # Mixers with a short conv (on their first stream) have its route copy gathered for each read; gla has none.
    from mmeff.blocks.scan import Routes

    calls = []
    route = Routes.__call__

    def recorded(self, *args, **kwargs):
        calls.append(kwargs.get("per_read", 0))
        return route(self, *args, **kwargs)

    monkeypatch.setattr(Routes, "__call__", recorded)
    blocks.build(kind, 64, causal=False, **options)(torch.randn(B, T, 64), layout=LAYOUT)
    assert calls == [per_read]


@pytest.mark.parametrize(
    "kind, options", [("gated_deltanet", {"heads": 4}), ("mamba2", {"d_state": 16, "head_dim": 16})]
)
def test_a_short_convs_route_copy_under_activation_checkpointing(kernels, monkeypatch, kind, options):
    # Gathered for each read, the copy's source is unpacked once for all reads: activation checkpointing's hooks
    # (backbone.checkpoint) refuse a second unpack ("Unpack is being triggered for a tensor that was already unpacked
    # once"). Gradients through a checkpointed bidirectional block equal those without (fp32, conv kernel interpreted).
    from torch.utils.checkpoint import checkpoint

    from mmeff.ops import dispatch

    monkeypatch.setattr(dispatch, "on_cuda", lambda x: True)
    torch.manual_seed(0)
    mixer = blocks.build(kind, 64, causal=False, **options)
    x = torch.randn(B, T, 64, requires_grad=True)
    grads = []
    for checkpointed in (True, False):
        y = checkpoint(mixer, x, None, LAYOUT, use_reentrant=False) if checkpointed else mixer(x, layout=LAYOUT)
        grads.append(torch.autograd.grad(y.square().sum(), [x, *mixer.parameters()]))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
