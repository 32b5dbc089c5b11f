"""Linear-attention and SSM mixers: training path, decoding with a fixed-size cache, bidirectional scans, hybrid heads."""

import pytest
import torch

from mmeff import blocks, ops
from mmeff.backbone import Backbone
from mmeff.blocks import Layout
from mmeff.blocks.scan import GroupedNorm, ScanMixer
from mmeff.config import BackboneConfig, ConfigError
from mmeff.ops.recompute import saved_storages

SCANNED = [n for n in blocks.names("mixer") if issubclass(blocks.entry(n).cls, ScanMixer)]
MIXERS = SCANNED + ["hybrid_heads"]
# Small state sizes keep the tests fast; every other option is the block's default.
SMALL = {"mamba2": {"d_state": 16, "head_dim": 16}, "hybrid_heads": {"ssm_options": {"d_state": 16, "head_dim": 16}}}


def make(name: str, dim: int = 32, **options) -> torch.nn.Module:
    return blocks.build(name, dim, **{**SMALL.get(name, {}), **options})


def test_registered():
    expected = {"linear_attn", "retnet", "gla", "deltanet", "gated_deltanet", "ttt", "mamba", "mamba2"}
    assert expected <= set(SCANNED)
    for name in MIXERS:
        summary = blocks.entry(name).summary
        assert summary and "20" in summary, f"{name}: docstring must name its paper"


@pytest.mark.parametrize("name", MIXERS)
@pytest.mark.parametrize("dim, T, causal", [(32, 1, True), (64, 37, True), (32, 1, False), (32, 37, False)])
def test_forward_backward(name, dim, T, causal):
    torch.manual_seed(0)
    block = make(name, dim, causal=causal)
    x = torch.randn(2, T, dim, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    grads = [p.grad for p in block.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def _decode(block: torch.nn.Module, x: torch.Tensor, cache: blocks.Cache, sizes: list[int]) -> list[torch.Tensor]:
    outs, start = [], 0
    for size in sizes:
        outs.append(block(x[:, start : start + size], cache))
        start += size
    return outs


@pytest.mark.parametrize("name", MIXERS)
def test_decode_equals_forward(name):
    torch.manual_seed(0)
    # chunk_size 4 makes the 5-token prefill span two chunks
    options = {"chunk_size": 4} if name in SCANNED else {"ssm_options": {**SMALL[name]["ssm_options"], "chunk_size": 4}}
    block = make(name, **options).eval()
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        full = block(x)
        cache = blocks.Cache()
        steps = _decode(block, x, cache, [5, 1, 1, 1, 1, 3])
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
    assert cache.offset == 12


@pytest.mark.parametrize("name", SCANNED)
def test_cache_is_fixed_size(name):
    torch.manual_seed(0)
    block = make(name).eval()
    x = torch.randn(2, 10, 32)
    cache = blocks.Cache()
    with torch.no_grad():
        block(x[:, :5], cache)
        size, keys = cache.nbytes(), set(cache)
        assert "state" in keys and size > 0
        for t in range(5, 10):
            block(x[:, t : t + 1], cache)
            assert cache.nbytes() == size and set(cache) == keys


@pytest.mark.parametrize("name", MIXERS)
def test_causality_and_bidirectional(name):
    torch.manual_seed(0)
    x = torch.randn(2, 9, 32)
    x2 = x.clone()
    x2[:, -1] += 1.0
    causal, bi = make(name, causal=True).eval(), make(name, causal=False).eval()
    with torch.no_grad():
        assert torch.allclose(causal(x)[:, :-1], causal(x2)[:, :-1], atol=1e-6)
        y, y2 = bi(x), bi(x2)
    assert y.shape == x.shape
    assert not torch.allclose(y[:, 0], y2[:, 0], atol=1e-6), "bidirectional output at 0 must see later tokens"


@pytest.mark.parametrize("name", SCANNED + ["hybrid_heads"])
def test_cross_scan_with_class_token(name):
    torch.manual_seed(0)
    layout = Layout(grid=(1, 3, 4), special=1)  # what the image encoder gives for a class token and a 3x4 grid
    block = make(name, causal=False, scan="cross").eval()
    x = torch.randn(2, 13, 32, requires_grad=True)
    y = block(x, layout=layout)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y[:, 0].sum().backward()  # the class token reads every image token
    assert (x.grad[:, 1:].abs().sum(-1) > 0).all()
    with pytest.raises(ValueError, match="grid"):
        block(torch.randn(2, 13, 32))  # no grid in the layout


def test_routes_map_back_to_token_order():
    """Each route's outputs return to their token: a cumulative sum along the route, checked by hand."""
    from mmeff.blocks.scan import Routes

    x = torch.randn(1, 7, 1)  # one class token + a 2x3 grid
    cumsum = lambda s, cu_seqlens: s[0].cumsum(1)  # noqa: E731
    body = x[:, 1:, 0].view(2, 3)
    raster, column = body.reshape(-1), body.t().reshape(-1)
    cls = x[0, 0, 0]

    def route(seq: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        out = torch.empty(7)
        c = torch.cat([seq, cls[None]]).cumsum(0)
        out[1 + order], out[0] = c[:-1], c[-1]
        return out

    r = torch.arange(6)
    c = r.view(2, 3).t().reshape(-1)
    expect = {
        "forward": route(raster, r),
        "bi": (route(raster, r) + route(raster.flip(0), r.flip(0))) / 2,
        "cross": (route(raster, r) + route(column, c) + route(raster.flip(0), r.flip(0)) + route(column.flip(0), c.flip(0))) / 4,
    }
    for scan, want in expect.items():
        got = Routes(False, scan)(cumsum, [x], Layout(grid=(1, 2, 3), special=1))
        torch.testing.assert_close(got[0, :, 0], want)
    assert Routes(True).is_identity and Routes(True).routes(5, Layout(), x.device) == [None]


def test_scan_option_errors():
    with pytest.raises(ConfigError, match="causal"):
        blocks.build("gla", 32, causal=True, scan="bi")
    with pytest.raises(ValueError, match="grid"):
        blocks.build("mamba", 32, causal=False, scan="cross")(torch.randn(1, 4, 32))
    with pytest.raises(ConfigError, match="unknown option not_an_option"):
        blocks.build("deltanet", 32, not_an_option=1)
    bi = blocks.build("gla", 32, causal=False)
    with pytest.raises(ValueError, match="causal=true"):
        bi(torch.randn(1, 3, 32), blocks.Cache())


def test_column_order_and_forward_only_scan():
    torch.manual_seed(0)
    x = torch.randn(1, 6, 32)
    block = blocks.build("gla", 32, causal=False, scan="forward", order="column").eval()
    fwd = lambda x: block(x, layout=Layout(grid=(1, 2, 3)))  # noqa: E731
    # column-major: token 3 (row 1, col 0) is read 2nd, so it reaches token 1 (row 0, col 1), read 3rd
    x2 = x.clone()
    x2[:, 3] += 1.0
    with torch.no_grad():
        assert not torch.allclose(fwd(x)[:, 1], fwd(x2)[:, 1])
        assert torch.allclose(fwd(x)[:, 0], fwd(x2)[:, 0])


def test_hybrid_backbone_decodes():
    torch.manual_seed(0)
    cfg = BackboneConfig(dim=32, pattern=["gla", "mamba2", "attn"], mixers={"mamba2": {"d_state": 16, "head_dim": 16}})
    bb = Backbone(cfg).eval()
    x = torch.randn(2, 9, 32)
    cache = bb.new_cache()
    with torch.no_grad():
        out = torch.cat([bb(x[:, :5], cache), bb(x[:, 5:6], cache), bb(x[:, 6:], cache)], 1)
        torch.testing.assert_close(out, bb(x), atol=1e-4, rtol=1e-4)


def test_ttt_step_is_a_gradient_step():
    """TTT-Linear's update W - lr * grad 1/2 ||W^T k - v||^2 is the delta rule with beta = lr."""
    torch.manual_seed(0)
    W = torch.randn(1, 1, 8, 4, requires_grad=True)
    k = torch.nn.functional.normalize(torch.randn(1, 1, 1, 8), dim=-1)
    v, lr = torch.randn(1, 1, 1, 4), torch.tensor([[[0.3]]])
    loss = 0.5 * ((W[0, 0].t() @ k[0, 0, 0] - v[0, 0, 0]) ** 2).sum()
    (grad,) = torch.autograd.grad(loss, W)
    _, state = ops.delta_rule(k, k, v, lr, initial_state=W.detach(), output_final_state=True, mode="recurrent")
    torch.testing.assert_close(state, W.detach() - 0.3 * grad)


@pytest.mark.parametrize("kind", ["rms", "group"])
@pytest.mark.parametrize("gate_first", [False, True])
def test_grouped_norm_matches_its_definition(kind, gate_first):
    # Per group of channels: (y - mean if group) / sqrt(mean of squares + eps), then the per-channel affine and the
    # silu(z) gate before (Mamba-2) or after (GLA, RetNet) the norm.
    torch.manual_seed(0)
    norm = GroupedNorm(12, 3, kind, gate_first=gate_first, eps=1e-3)
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_()
    y, z = torch.randn(2, 5, 12) * 3 + 1, torch.randn(2, 5, 12)
    g = (y * torch.nn.functional.silu(z) if gate_first else y).unflatten(-1, (3, 4))
    if kind == "group":
        g = g - g.mean(-1, keepdim=True)
    want = (g / (g.square().mean(-1, keepdim=True) + 1e-3).sqrt()).flatten(-2) * norm.weight
    want = want + (norm.bias if kind == "group" else 0)
    want = want if gate_first else want * torch.nn.functional.silu(z)
    torch.testing.assert_close(norm(y, z), want)


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet", "linear_attn"])
def test_recurrence_runs_in_the_values_dtype(name, monkeypatch):
    # CUDA autocast computes F.normalize (the l2 feature map) in fp32 while v stays bf16; the recurrence must
    # still get bf16 q and k, or it runs its slow fp32 kernels. The fp32 feature map imitates that here.
    block = make(name, 64).to(torch.bfloat16)
    monkeypatch.setattr(block, "feature", lambda x: torch.nn.functional.normalize(x.float(), dim=-1))
    seen = []
    recur = block.recur

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return recur(q, k, v, *args, **kwargs)

    monkeypatch.setattr(block, "recur", spy)
    block(torch.randn(2, 5, 64, dtype=torch.bfloat16))
    assert seen == [(torch.bfloat16,) * 3]


def _kept_bytes(block: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for the backward of block(x)."""
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    with saved_storages() as kept:
        y = block(x)  # held to the end of the block: its graph keeps what is counted
    return sum(t.untyped_storage().nbytes() for ptr, t in kept.items() if ptr not in params)


def test_global_linear_attention_keeps_no_more_than_softmax_attention():
    # Per token (the difference of two batch sizes): the non-causal linear_attn keeps its q, k, v (one qkv buffer)
    # and the [H, K, V] state; before its feature maps were recomputed and the op had its own backward, it kept
    # 4 KiB more per token than attention in the vision benchmark's ViT.
    torch.manual_seed(0)
    dim, T = 64, 48
    linear = make("linear_attn", dim, causal=False, scan="global", heads=4)
    softmax = make("attn", dim, causal=False, heads=4, rope=False)
    per_token = {}
    for name, block in (("linear", linear), ("softmax", softmax)):
        small, large = (_kept_bytes(block, torch.randn(b, T, dim, requires_grad=True)) for b in (2, 4))
        per_token[name] = (large - small) / (2 * T)
    assert per_token["linear"] <= per_token["softmax"], per_token


@pytest.mark.parametrize("options", [{"causal": True}, {"causal": False, "scan": "bi"}])
def test_remade_gate_is_not_kept_and_gives_the_same_gradients(options):
    # remake_gate (RetNet's default): the swish gate, [tokens, value width], is made again in the backward from the
    # block's input, which the projections keep anyway: the gate's storage is not kept, the gradients are the same.
    dim, T = 32, 24
    grads = {}
    for remake in (False, True):
        torch.manual_seed(0)
        block = make("retnet", dim, heads=2, remake_gate=remake, **options)
        gates = []
        block.gate.register_forward_hook(lambda module, args, out: gates.append(out))
        stored = []  # the storages themselves: a saved tensor freed later would free its address for another one
        x = torch.randn(2, T, dim, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: stored.append(t.untyped_storage()) or t, lambda t: t):
            y = block(x)
        kept = {storage.data_ptr() for storage in stored}
        assert (gates[0].untyped_storage().data_ptr() in kept) is not remake
        assert x.untyped_storage().data_ptr() in kept  # the projections' input, which the gate is made again from
        y.square().sum().backward()
        grads[remake] = [x.grad, *(p.grad for p in block.parameters())]
    assert all(torch.equal(a, b) for a, b in zip(grads[False], grads[True]))


@pytest.mark.parametrize("name,remake", [("gated_deltanet", True), ("retnet", False)])
def test_the_gate_projections_backward_runs_before_the_recurrences(name, remake):
    # The output gate is projected after the scan, so autograd (latest-made ready node first) runs its projection's
    # backward right after the output norm's: the gate's gradient is not held through the recurrence's backward.
    # Seen in the order the weight gradients arrive: the gate's before the short conv's and the decay / beta
    # projections', which only the recurrence's backward reaches.
    block = make(name, 32, heads=2, causal=False, scan="bi", remake_gate=remake, conv_size=4)
    order = []
    for pname, param in block.named_parameters():
        param.register_post_accumulate_grad_hook(lambda p, pname=pname: order.append(pname))
    block(torch.randn(2, 24, 32, requires_grad=True)).square().sum().backward()
    after = [n for n in order if n.startswith(("conv.", "alpha.", "beta."))]
    assert after and all(order.index("gate.weight") < order.index(n) for n in after), order


def test_compiled_remade_gate_is_not_kept_and_gives_the_same_gradients():
    # Compiled, the partitioner kept the gate (a matmul's output the norm's backward reads) although eager mode makes
    # it again: it is now made inside the norm's region, so torch.compile keeps B x T x value width fewer elements.
    from mmeff.ops.recompute import kept_when_compiled

    dim, T = 32, 24
    kept, grads = {}, {}
    for remake in (False, True):
        torch.manual_seed(0)
        block = make("retnet", dim, heads=2, remake_gate=remake, causal=False, scan="bi")
        x = torch.randn(2, T, dim, requires_grad=True)
        kept[remake] = sum(t.numel() for t in kept_when_compiled(block, x))
        grads[remake] = [x.grad, *(p.grad for p in block.parameters())]
        eager = torch.autograd.grad(block(x).float().square().mean(), [x, *block.parameters()])
        for got, want in zip(grads[remake], eager):
            torch.testing.assert_close(got, want)
    assert kept[False] - kept[True] == 2 * T * block.value_dim, kept


def test_elu_feature_map_matches_autograd_of_elu_plus_one():
    from mmeff.blocks.linear import FEATURE_MAPS

    x = torch.cat([torch.randn(200, dtype=torch.float64) * 3, torch.tensor([0.0, -0.0, 1e-9, -1e-9], dtype=torch.float64)])
    dy = torch.randn_like(x)
    leaves = [x.clone().requires_grad_() for _ in range(2)]
    y, want = FEATURE_MAPS["elu"](leaves[0]), torch.nn.functional.elu(leaves[1]) + 1
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    (grad,), (want_grad,) = torch.autograd.grad(y, leaves[0], dy), torch.autograd.grad(want, leaves[1], dy)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)


# elu+1 features (linear_attn's, and bidirectional gla's default): written as F.elu(x) + 1 the compiled backward failed
# at run time, its traced elu_backward having other strides than the eager kernel's (a view after it failed).
# The bidirectional rows of benchmarks/vision_speed.py too (a sweep of every registered mixer, causal and bidirectional,
# matched eager the same way: too slow for the suite).
@pytest.mark.parametrize(
    "name, options",
    [("gla", {"causal": False, "scan": "bi"}), ("linear_attn", {"causal": True})]
    + [(m, {"causal": False, "scan": "bi"}) for m in ("retnet", "gated_deltanet", "mamba2")]
    + [("linear_attn", {"causal": False, "scan": "global", "local_conv": 3})],
)
def test_compiled_mixer_matches_eager(name, options):
    # torch.compile (AOT autograd, no Inductor build: fast) of a block forward and backward on the CPU path.
    torch.manual_seed(0)
    block = make(name, 32, **options)
    x = torch.randn(2, 24, 32)
    layout = Layout(grid=(1, 4, 6)) if "local_conv" in options else None
    grads = []
    torch._dynamo.reset()  # a fresh trace: a recompilation of the same code would trace dynamic shapes
    for run in (block, torch.compile(block, backend="aot_eager", dynamic=False)):
        leaf = x.clone().requires_grad_()
        y = run(leaf, layout=layout)
        y.square().sum().backward()
        grads.append((y.detach(), leaf.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-4, atol=1e-5)


# grid (2, 2, 5): two frames of 2 x 5 tokens, each convolved on its own (no tap reads the other frame)
@pytest.mark.parametrize("grid", [(1, 4, 5), (2, 2, 5)])
@pytest.mark.parametrize("name, options", [("linear_attn", {"scan": "global"}), ("gla", {"scan": "bi", "conv_size": 4})])
def test_local_conv_adds_a_depthwise_conv_of_v_over_the_grid_only(name, options, grid):
    torch.manual_seed(0)
    dim, special, after = 32, 1, 2
    mixer = make(name, dim, causal=False, heads=2, local_conv=3, **options)
    x = torch.randn(2, special + 20 + after, dim)
    layout = Layout(special=special, grid=grid)
    y = mixer(x, layout=layout)
    conv, mixer.local_conv = mixer.local_conv, None
    plain = mixer(x, layout=layout)
    mixer.local_conv = conv
    assert torch.equal(y[:, :special], plain[:, :special]) and torch.equal(y[:, special + 20 :], plain[:, special + 20 :])
    # by hand: v of the grid tokens as the projection gives it (before any short conv), a [4, 5] image per channel
    streams, _ = mixer.project(x)
    v = streams[0][..., -mixer.value_dim :] if mixer.conv is not None else streams[2]
    image = v[:, special : special + 20].reshape(2 * grid[0], *grid[1:], -1).permute(0, 3, 1, 2)
    near = torch.nn.functional.conv2d(image, conv.weight, conv.bias, padding=1, groups=mixer.value_dim)
    near = near.permute(0, 2, 3, 1).reshape(2, 20, -1)
    if name == "linear_attn":  # no output norm or gate: the term passes the output projection alone
        torch.testing.assert_close(y[:, special : special + 20] - plain[:, special : special + 20], near @ mixer.out.weight.T)
    y.sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_local_conv_is_refused_where_it_would_leak_or_has_no_grid():
    with pytest.raises(ValueError, match="local_conv"):
        make("linear_attn", causal=True, local_conv=3)
    with pytest.raises(ValueError, match="local_conv"):
        make("linear_attn", causal=False, scan="global", local_conv=4)
    mixer = make("linear_attn", causal=False, scan="global", local_conv=3)
    with pytest.raises(ValueError, match="local_conv needs the token grid"):
        mixer(torch.randn(1, 6, 32))


@pytest.mark.parametrize("name,options", [("gla", {}), ("gla", {"causal": False, "scan": "bi"}), ("deltanet", {}),
                                          ("gated_deltanet", {}), ("ttt", {})])  # fmt: skip
def test_side_projections_run_in_the_qkv_matmul(name, options, monkeypatch):
    # The gates' projections of the block's input (GLA's decay, the delta rule's beta, Gated DeltaNet's alpha) run as
    # one matmul with qkv: the block's output and every gradient as with the projections apart, parameters unchanged.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Matmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func.__name__.split(".")[0] in ("mm", "addmm", "bmm")
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    block = make(name, 32, heads=2, **options)
    side = block.side_linears()
    names = {"gla": ["decay.0"], "deltanet": ["beta"], "gated_deltanet": ["alpha", "beta"], "ttt": ["beta"]}[name]
    assert side == [block.get_submodule(n) for n in names]  # the modules (and parameter names) of before
    x = torch.randn(2, 24, 32)
    with Matmuls() as counted:
        block.projections(x)
    assert counted.count == 1
    with Matmuls() as counted, torch.no_grad():  # inference (decoding): the projections apart, no weight copy
        block.projections(x)
    assert counted.count == 1 + len(side)
    runs, kept = [], []
    for apart in (False, True):
        if apart:
            monkeypatch.setattr(block, "projections", lambda x: (block.qkv(x), [m(x) for m in side]))
        block.zero_grad()
        xg = x.clone().requires_grad_()
        with saved_storages() as saved:
            y = block(xg)
        kept.append(sum(t.untyped_storage().nbytes() for t in saved.values()))
        del saved  # its tensors, found through weak references, let go before the backward frees them
        y.square().sum().backward()
        runs.append([y, xg.grad, *(p.grad for p in block.parameters())])
    for fused, apart in zip(*runs):  # fp32 rounding: the matmuls sum in another order
        assert ((fused - apart).norm() / apart.norm()).item() < 1e-5
    # Kept for the backward: at most the side projections' few columns more (the whole projection where a view of it
    # is kept), not the projection itself where the mixer keeps no view of it otherwise (GLA's elu feature map).
    assert kept[0] <= kept[1] + x.shape[0] * x.shape[1] * sum(m.out_features for m in side) * 4, kept


def test_side_projections_stay_apart_under_a_lora_adapter():
    # A LoRA adapter on qkv (or a bias) is not a plain bias-free nn.Linear: qkv keeps its own call, adapter included.
    from mmeff import lora

    torch.manual_seed(0)
    block = make("gated_deltanet", 32, heads=2)
    lora.apply(block, {"targets": ["qkv"], "rank": 2})
    torch.nn.init.normal_(block.qkv.lora_B)
    x = torch.randn(2, 8, 32)
    qkv, side = block.projections(x)
    torch.testing.assert_close(qkv, block.qkv(x))
    torch.testing.assert_close(side[0], block.alpha(x))
