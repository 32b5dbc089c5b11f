"""GPU parity of mmeff's Triton kernels (mmeff.kernels) with the PyTorch reference at real sizes: every
recurrence kind forward and backward, fixed-length and packed (cu_seqlens), the fused recurrent decode kernel,
the short convolution, the grid convolution, the norms, the rotary embedding and the MoE glue. Skipped without CUDA
(conftest).

Error per tensor (output, final state, every gradient): ||kernel - reference|| / ||reference|| < 1e-4 with
fp32 inputs, < 1e-2 with bf16 inputs. The reference is mmeff's PyTorch path (MMEFF_FORCE_REFERENCE=1,
mode "chunk", itself tested against the step-by-step recurrence on CPU; the step-by-step form itself for
the fused recurrent kernel), run in fp32 on the same (bf16-rounded) inputs. Every check draws fresh random
inputs, and every buffer the kernels allocate starts as NaN, so an element left unwritten fails the check.

Compile cost: Triton compiles each kernel once per (dtype, H, K, V, tile sizes, gate kind); the batch and the
sequence lengths are runtime values. So the checks share one head count and width (HEADS, WIDTH) wherever
the shape itself is not the point, and each (kind, dtype) is one xdist group: one worker compiles its kernels.
"""

from __future__ import annotations

import sys
import zlib
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
from kernel_cases import KINDS, compare, forward_backward, make_inputs, norm_error, wy_made_again  # noqa: E402

from mmeff import ops  # noqa: E402
from mmeff.ops.recurrence import linear_recurrence  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HEADS, WIDTH = 4, 64  # head count and key/value width of the generic checks
pytestmark = pytest.mark.usefixtures("poison")


def cases(kinds, dtypes=DTYPES):
    """(kind, dtype) parameters, each in the xdist group of its kernels."""
    return pytest.mark.parametrize(
        "kind,dtype",
        [pytest.param(k, DTYPES[d], id=f"{k}-{d}", marks=pytest.mark.xdist_group(f"{k}-{d}")) for k in kinds for d in dtypes],
    )


@pytest.fixture
def seed(request) -> int:
    """A different seed for every check."""
    return zlib.crc32(request.node.nodeid.encode())


def reference(monkeypatch, **kwargs):
    """linear_recurrence on mmeff's PyTorch path."""
    with monkeypatch.context() as m:
        m.setenv("MMEFF_FORCE_REFERENCE", "1")
        return linear_recurrence(**kwargs)


def assert_parity(kernels, monkeypatch, inputs, dtype, cu_seqlens=None):
    got = forward_backward(partial(kernels.linear_recurrence_triton, cu_seqlens=cu_seqlens), inputs)
    ref = forward_backward(partial(reference, monkeypatch, cu_seqlens=cu_seqlens), inputs, upcast=True)
    assert got[0].dtype == dtype
    errors = compare(got, ref, norm_error)
    assert all(e < TOL[dtype] for e in errors.values()), errors


@cases(KINDS)
@pytest.mark.parametrize("batch,seqlen", [(2, 1000), (1, 65536)], ids=["B2-T1000", "B1-T65536"])
def test_parity(kernels, monkeypatch, seed, kind, batch, seqlen, dtype):
    inputs = make_inputs(kind, batch, seqlen, HEADS, WIDTH, WIDTH, dtype=dtype, device="cuda", seed=seed)
    assert_parity(kernels, monkeypatch, inputs, dtype)


@cases(["gla"])
@pytest.mark.parametrize("gates", ["mild", "mixed"])
def test_parity_gla_factored(kernels, monkeypatch, seed, gates, kind, dtype):
    # GLA's chunks within the span limit (all with mild gates, the first half with mixed ones) take the
    # factored scores; the strong gates of test_parity keep every chunk on the sub-chunk kernels.
    inputs = make_inputs(kind, 1, 65536, HEADS, WIDTH, WIDTH, dtype=dtype, device="cuda", seed=seed, gates=gates)
    assert_parity(kernels, monkeypatch, inputs, dtype)


@cases(KINDS, ["bf16"])
def test_packed_sequences(kernels, monkeypatch, seed, kind, dtype):
    # Varlen: sequences of 1, 63, 64, 65 steps (last chunk of 1 row, full, one past), an empty one, and long ones.
    lengths = [1, 63, 64, 65, 0, 3000, 1500, 4096]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    inputs = make_inputs(kind, 1, sum(lengths), HEADS, WIDTH, WIDTH, dtype=dtype, device="cuda", seed=seed,
                         num_states=len(lengths))  # fmt: skip
    assert_parity(kernels, monkeypatch, inputs, dtype, cu_seqlens)


@pytest.mark.parametrize("kind", ["scalar_decay", "gated_delta_rule"])
def test_packed_block_shapes(kernels, monkeypatch, seed, kind):
    # test_blocks_gpu's packed form as the kernels see it: documents of 707, 1, 1340, 2047 and 1 tokens, no initial
    # state, retnet's and gated_deltanet's 4 heads of K 128, V 256. Its 5 x 4 (sequence, head) pairs make the H200's
    # state passes (chunk_h.state_blocks) take 32 x 64 tiles where the key is split (scalar_decay), a build no other
    # check reaches (they take 32 x 16): the block's retnet-packed gradients were off by 5% there; under the delta
    # rule they take 128 x 32 tiles, as gated_deltanet's LM at 4k does.
    lengths = [707, 1, 1340, 2047, 1]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    inputs = make_inputs(kind, 1, sum(lengths), 4, 128, 256, dtype=torch.bfloat16, device="cuda", seed=seed,
                         num_states=len(lengths))  # fmt: skip
    inputs["initial_state"] = None
    assert_parity(kernels, monkeypatch, inputs, torch.bfloat16, cu_seqlens)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dk", [128, 256])  # no xdist group: each case compiles a set of kernels no other case shares
def test_parity_wide_keys(kernels, monkeypatch, seed, kind, dk):
    # V = 32 with K = 128: where Hopper miscompiled the 4-warp WY builds, and the 4- and 8-warp _bwd_dqk builds
    # without a key gate (dq, dv wrong); with K = 256 those read shared memory out of bounds: the H200's
    # "illegal memory access" (compute-sanitizer, tests/gpu/bisect_dqk.py).
    inputs = make_inputs(kind, 1, 3000, HEADS, dk, 32, dtype=torch.bfloat16, device="cuda", seed=seed)
    assert_parity(kernels, monkeypatch, inputs, torch.bfloat16)


# The shapes the mixers hand the kernels in the 12-layer, width-1024 LM of benchmarks/lm_train_speed.py (T = 16k):
# gla (4 heads, K 128, V 256) and with 16 heads (K 32, V 64: where Hopper miscompiled the 4-warp GLA backward),
# mamba2's SSD (32 heads, d_state 128 as K, head_dim 64 as V; fp32, the dtype of an fp32 model), gated_deltanet
# (8 heads, K 128, V 256). Each is its own set of compiles.
MODEL_SHAPES = {
    "gla-4x128x256": ("gla", 4, 128, 256, torch.bfloat16),
    "gla-16x32x64": ("gla", 16, 32, 64, torch.bfloat16),
    "ssd-32x128x64-fp32": ("scalar_decay", 32, 128, 64, torch.float32),
    "gated_delta-8x128x256": ("gated_delta_rule", 8, 128, 256, torch.bfloat16),
    "delta-8x128x256": ("delta_rule", 8, 128, 256, torch.bfloat16),
}


@pytest.mark.parametrize("shape", [pytest.param(s, marks=pytest.mark.xdist_group(s)) for s in MODEL_SHAPES])
def test_parity_model_shapes(kernels, monkeypatch, seed, shape):
    kind, heads, dk, dv, dtype = MODEL_SHAPES[shape]
    gates = "mild" if kind == "gla" else "strong"
    inputs = make_inputs(kind, 1, 16384, heads, dk, dv, dtype=dtype, device="cuda", seed=seed, gates=gates)
    assert_parity(kernels, monkeypatch, inputs, dtype)


@pytest.mark.xdist_group("ssd-32x128x64-bf16-shared")
def test_parity_keys_shared_at_model_shape(kernels, monkeypatch, seed):
    # Mamba-2's SSD as its mixer hands it to the kernels at the LM's size: C and B (q, k) one head shared by all 32;
    # the backward takes 8 of them a program (4 splits: 256 chunks), K 128.
    assert kernels.chunk_o.head_splits(32, 256) == 4 and kernels.chunk_o.GROUP_KEYS >= 128
    inputs = make_inputs("scalar_decay", 1, 16384, 32, 128, 64, dtype=torch.bfloat16, device="cuda", seed=seed)
    inputs["q"], inputs["k"] = (inputs[n][:, :, :1].contiguous() for n in ("q", "k"))
    assert_parity(kernels, monkeypatch, inputs, torch.bfloat16)


@pytest.mark.xdist_group("ssd-12x64x64-bf16-grouped")
def test_parity_heads_sharing_keys_grouped_at_vision_shape(kernels, monkeypatch, seed):
    # The ViT's bidirectional Mamba-2 (benchmarks/vision_speed.py at 224 px): 12 heads of K 64, V 64 share one key
    # head, 196 tokens a sequence. At its 512 sequences the backward takes the 12 heads of a chunk in one program and
    # writes their dq, dk summed; here 64 sequences (256 chunks) take it with 2 splits a group.
    assert kernels.chunk_o.head_splits(12, 256) == 4 and kernels.chunk_o.head_splits(12, 2048) == 1
    monkeypatch.setattr(kernels.chunk_o, "GROUP_PROGRAMS", 512)
    inputs = make_inputs("scalar_decay", 64, 196, 12, 64, 64, dtype=torch.bfloat16, device="cuda", seed=seed)
    inputs["q"], inputs["k"] = (inputs[n][:, :, :1].contiguous() for n in ("q", "k"))
    assert_parity(kernels, monkeypatch, inputs, torch.bfloat16)


@pytest.mark.parametrize("kind, dk, dv", [("gated_delta_rule", 128, 256), ("delta_rule", 128, 256), ("delta_rule", 128, 32)])
def test_wy_products_made_again(kernels, seed, kind, dk, dv):
    # The backward keeps the delta rule's X alone and makes w and u again from it (a build of _wy_fwd_kernel of its
    # own, BUILD=False): bit for bit the forward's, at the LM's shapes and at K 128, V 32, where Hopper miscompiled.
    inputs = make_inputs(kind, 1, 16384, 8, dk, dv, dtype=torch.bfloat16, device="cuda", seed=seed)
    X, made, again = wy_made_again(kernels, inputs, None, 64)
    assert X.dtype == torch.bfloat16 and all(torch.equal(a, m) for a, m in zip(again, made))


@pytest.mark.xdist_group("recurrent")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
@pytest.mark.parametrize("kind", [*KINDS, "gla_delta"])
def test_fused_recurrent(kernels, monkeypatch, seed, kind, dtype):
    # Decoding-sized packed sequences without gradients: the fused step-by-step kernel.
    monkeypatch.setattr(kernels.ChunkRecurrence, "apply", None)
    lengths = [1, 16, 0, 7, 1]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    inputs = make_inputs("gla" if kind == "gla_delta" else kind, 1, sum(lengths), HEADS, WIDTH, WIDTH, dtype=dtype,
                         device="cuda", seed=seed, num_states=len(lengths))  # fmt: skip
    if kind == "gla_delta":
        inputs["beta"] = torch.rand(1, sum(lengths), HEADS, device="cuda").to(dtype)
    with torch.no_grad():
        o, state = kernels.linear_recurrence_triton(**inputs, scale=0.5, output_final_state=True, cu_seqlens=cu_seqlens)
        up = {n: None if t is None else t.float() for n, t in inputs.items()}
        o_ref, state_ref = reference(monkeypatch, **up, scale=0.5, output_final_state=True, mode="recurrent",
                                     cu_seqlens=cu_seqlens)  # fmt: skip
    errors = {"o": norm_error(o, o_ref), "final_state": norm_error(state, state_ref)}
    assert all(e < TOL[dtype] for e in errors.values()), errors


def _op_calls(seqlen: int, dtype: torch.dtype, seed: int) -> dict:
    """Each linear-family op of mmeff.ops as (call, inputs) on CUDA."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, fn=lambda x: x, time_series: bool = True) -> torch.Tensor:
        x = fn(torch.randn(*shape, generator=gen)).cuda()
        return x.to(dtype) if time_series else x

    B, T, H, D = 2, seqlen, HEADS, WIDTH
    qkv = {"q": randn(B, T, H, D), "k": randn(B, T, H, D, fn=lambda x: F.normalize(x, dim=-1)), "v": randn(B, T, H, D)}
    beta = randn(B, T, H, fn=torch.sigmoid)
    head_gate = randn(B, T, H, fn=lambda x: F.logsigmoid(x + 3), time_series=False)
    key_gate = randn(B, T, H, D, fn=lambda x: F.logsigmoid(x + 3))
    retention_decay = randn(H, fn=lambda x: F.logsigmoid(x + 3), time_series=False)
    scan = {"u": randn(B, 32, T), "delta": randn(B, 32, T), "A": -randn(32, 16, fn=torch.exp, time_series=False),
            "B": randn(B, 16, T), "C": randn(B, 16, T), "D": randn(32, time_series=False)}  # fmt: skip
    return {
        "linear_attention": (ops.linear_attention, qkv),
        "retention": (ops.retention, {**qkv, "log_decay": retention_decay}),
        "gated_linear_attention": (ops.gated_linear_attention, {**qkv, "log_g": key_gate}),
        "delta_rule": (ops.delta_rule, {**qkv, "beta": beta}),
        "gated_delta_rule": (ops.gated_delta_rule, {**qkv, "log_g": head_gate, "beta": beta}),
        "ssd": (
            partial(ops.ssd, dt_softplus=True, backend="triton"),
            {"x": randn(B, T, H, D), "dt": randn(B, T, H), "A": -randn(H, fn=torch.exp, time_series=False),
             "B": randn(B, T, 1, D), "C": randn(B, T, 1, D), "D": randn(H, time_series=False)},
        ),
        "selective_scan": (partial(ops.selective_scan, delta_softplus=True, backend="triton"), scan),
    }  # fmt: skip


# op -> the kernel kind it runs (its xdist group with the dtype: it reuses that group's compiles)
OP_KINDS = {"linear_attention": "linear_attention", "retention": "scalar_decay", "gated_linear_attention": "gla",
            "delta_rule": "delta_rule", "gated_delta_rule": "gated_delta_rule", "ssd": "scalar_decay",
            "selective_scan": "gla"}  # fmt: skip


@pytest.mark.parametrize(
    "op,dtype",
    [pytest.param(o, DTYPES[d], id=f"{o}-{d}", marks=pytest.mark.xdist_group(f"{k}-{d}")) for o, k in OP_KINDS.items()
     for d in DTYPES],
)  # fmt: skip
def test_ops_dispatch(kernels, monkeypatch, seed, op, dtype):
    # The ops pick the kernels on CUDA in mode "chunk" and agree with MMEFF_FORCE_REFERENCE=1.
    fn, inputs = _op_calls(777, dtype, seed)[op]
    calls = []
    original = kernels.linear_recurrence_triton
    monkeypatch.setattr(kernels, "linear_recurrence_triton", lambda *a, **kw: calls.append(1) or original(*a, **kw))

    def run(force_reference: bool):
        leaves = {n: t.detach().clone().requires_grad_(t.is_floating_point()) for n, t in inputs.items()}
        with monkeypatch.context() as m:
            if force_reference:
                m.setenv("MMEFF_FORCE_REFERENCE", "1")
            out = fn(**leaves)
        out = out[0] if isinstance(out, tuple) else out
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).cuda()
        grads = torch.autograd.grad((out.float() * weights).sum(), list(leaves.values()))
        return out, dict(zip(leaves, grads))

    out, grads = run(False)
    assert calls, "the Triton kernels did not run"
    calls.clear()
    out_ref, grads_ref = run(True)
    assert not calls, "MMEFF_FORCE_REFERENCE=1 still ran the Triton kernels"
    errors = {"out": norm_error(out, out_ref), **{f"d{n}": norm_error(grads[n], grads_ref[n]) for n in grads}}
    assert all(e < TOL[dtype] for e in errors.values()), errors


def check_conv(fast, reference, tensors, dy, dtype) -> None:
    """fast(*tensors) as given against reference(*tensors) upcast to fp32 (cuDNN's TF32 off): output and the
    gradients of every tensor, each within TOL[dtype] in norm."""

    def run(fn, upcast):
        leaves = [(t.float() if upcast else t).detach().clone().requires_grad_() for t in tensors]
        y = fn(*leaves)
        return [y, *torch.autograd.grad(y, leaves, dy.to(y.dtype))]

    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        expected = run(reference, upcast=True)
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
    actual = run(fast, upcast=False)
    assert actual[0].dtype == dtype
    errors = {n: norm_error(a.float(), e) for n, a, e in zip(["y", "dx", "dweight", "dbias"], actual, expected)}
    assert all(e < TOL[dtype] for e in errors.values()), errors


@pytest.mark.xdist_group("conv")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
def test_short_conv(kernels, seed, dtype):
    # mmeff.ops.conv's kernel (silu, bias) against F.conv1d in fp32 on the same inputs: the LM's gated_deltanet
    # width at T = 16k in bf16, and partial tiles with a batch in fp32.
    from mmeff.ops.conv import causal_conv1d, causal_conv1d_reference

    shape = (1, 16384, 4096) if dtype == torch.bfloat16 else (2, 1000, 300)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(*shape, device="cuda", generator=gen).to(dtype)
    weight = torch.randn(shape[-1], 4, device="cuda", generator=gen) / 2
    bias = torch.randn(shape[-1], device="cuda", generator=gen)
    dy = torch.randn(shape, device="cuda", generator=gen)
    check_conv(causal_conv1d, lambda *a: causal_conv1d_reference(*a, "silu"), (x, weight, bias), dy, dtype)


@pytest.mark.xdist_group("conv2d")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
def test_grid_conv(kernels, seed, dtype):
    # mmeff.ops.conv's depthwise grid conv (local_conv) against F.conv2d in fp32 on the same inputs: the 2048 px
    # ViT-S shape (4 x 128 x 128 tokens, 384 channels, v a slice of the fused qkv projection) in bf16, and a grid
    # that cuts the token tiles in fp32.
    from mmeff.ops.conv import depthwise_conv2d, depthwise_conv2d_reference

    (batch, height, width, channels) = (4, 128, 128, 384) if dtype == torch.bfloat16 else (3, 13, 21, 100)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(batch, height * width, 3 * channels, device="cuda", generator=gen).to(dtype)
    weight = torch.randn(channels, 3, 3, device="cuda", generator=gen) / 3
    bias = torch.randn(channels, device="cuda", generator=gen)
    dy = torch.randn(batch, height * width, channels, device="cuda", generator=gen)

    def on_v(conv):  # the conv of v, the last `channels` of qkv (the gradient reaches qkv)
        return lambda qkv, w, b: conv(qkv[..., -channels:], w, b, (height, width))

    check_conv(on_v(depthwise_conv2d), on_v(depthwise_conv2d_reference), (qkv, weight, bias), dy, dtype)


@pytest.mark.xdist_group("norm")
@pytest.mark.parametrize(
    "kind,rows,groups,width,dtype",
    [
        ("layer", 65536, 1, 384, torch.float32),  # ViT-S's norms on its fp32 residual stream, 256 images at 224 px
        ("rms", 16384, 1, 1024, torch.bfloat16),  # the LM's
        ("rms", 65536, 6, 64, torch.bfloat16),  # a linear mixer's per-head norm (6 heads of 64)
        ("layer", 4099, 1, 5000, torch.float32),  # a width past one warp's tile, rows not a multiple of the tile
    ],
)
def test_norm(kernels, seed, kind, rows, groups, width, dtype):
    # mmeff.ops.norm's kernels under bf16 autocast (bf16 output) against the fp32 reference on the same inputs.
    from mmeff.ops.norm import norm, norm_reference

    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(rows, groups * width, device="cuda", generator=gen) * 2 + 0.5).to(dtype)
    weight = torch.randn(groups * width, device="cuda", generator=gen)
    bias = torch.randn(groups * width, device="cuda", generator=gen) if kind == "layer" else None
    dy = torch.randn(rows, groups * width, device="cuda", generator=gen).to(torch.bfloat16)

    def run(fn, upcast):
        leaves = [(t.float() if upcast else t).detach().clone().requires_grad_() for t in (x, weight, bias) if t is not None]
        y = fn(*leaves)
        return [y, *torch.autograd.grad(y, leaves, dy.to(y.dtype))]

    def fast(x, weight, bias=None):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return norm(x, weight, bias, 1e-6, kind, groups)

    expected = run(lambda x, w, b=None: norm_reference(x, w, b, 1e-6, kind, groups), upcast=True)
    actual = run(fast, upcast=False)
    assert actual[0].dtype == torch.bfloat16 and actual[1].dtype == dtype
    errors = {n: norm_error(a.float(), e) for n, a, e in zip(["y", "dx", "dweight", "dbias"], actual, expected)}
    assert all(e < TOL[torch.bfloat16] for e in errors.values()), errors


@pytest.mark.xdist_group("norm")
@pytest.mark.parametrize("gate_first,groups,width", [(False, 6, 64), (True, 1, 768)])
def test_gated_norm(kernels, seed, gate_first, groups, width):
    # The swish gate fused into the norm kernels under bf16 autocast: GLA's per-head output norm (6 heads of 64,
    # norm(y) * silu(z)) and Mamba-2's gated RMSNorm (width 768, norm(y * silu(z))), 65,536 tokens (a ViT-S step
    # at 224 px), against the fp32 reference on the same inputs: output and the gradients of y, z and the weight.
    from mmeff.ops.norm import norm

    gen = torch.Generator(device="cuda").manual_seed(seed)
    y, z = (torch.randn(65536, groups * width, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(2))
    weight = torch.randn(groups * width, device="cuda", generator=gen)
    dout = torch.randn(65536, groups * width, device="cuda", generator=gen).to(torch.bfloat16)

    def run(backend, upcast):
        leaves = [(t.float() if upcast else t).detach().clone().requires_grad_() for t in (y, z, weight)]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=not upcast):
            out = norm(leaves[0], leaves[2], None, 1e-5, "rms", groups, backend, gate=leaves[1], gate_first=gate_first)
        return [out, *torch.autograd.grad(out, leaves, dout.to(out.dtype))]

    expected = run("torch", upcast=True)
    actual = run("triton", upcast=False)
    assert actual[0].dtype == torch.bfloat16
    errors = {n: norm_error(a.float(), e) for n, a, e in zip(["out", "dy", "dz", "dweight"], actual, expected)}
    assert all(e < TOL[torch.bfloat16] for e in errors.values()), errors


@pytest.mark.xdist_group("norm")
@pytest.mark.parametrize("kind,rows,width", [("layer", 65536, 384), ("rms", 16384, 1024)])  # ViT-S at 224 px; the LM
def test_add_norm(kernels, seed, kind, rows, width):
    # A pre-norm layer's residual add fused into its norm under bf16 autocast (mmeff.ops.add_norm: the fp32 stream
    # plus a bf16 branch) against torch's add then the norm kernel, the stream carrying a gradient of its own past the
    # norm: the sum, the norm and the weight and bias gradients bit for bit (measured); dx within 1e-6 of its largest
    # element (the fused kernel adds the stream's gradient in an FMA on the H200: 4.8e-7 off at most against 7.1),
    # the branch's bf16 gradient within one bf16 ulp (2^-7 relative) where that sum rounds the other way.
    from mmeff.ops.norm import add_norm, norm

    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(rows, width, device="cuda", generator=gen) * 2 + 0.5
    r = torch.randn(rows, width, device="cuda", generator=gen).to(torch.bfloat16)
    weight = torch.randn(width, device="cuda", generator=gen)
    bias = torch.randn(width, device="cuda", generator=gen) if kind == "layer" else None
    ds = torch.randn(rows, width, device="cuda", generator=gen)
    dy = torch.randn(rows, width, device="cuda", generator=gen).to(torch.bfloat16)

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x, r, weight, bias) if t is not None]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            s, y = fn(*leaves[:3], leaves[3] if bias is not None else None)
        return [s, y, *torch.autograd.grad([s, y], leaves, [ds, dy])]

    def unfused(x, r, w, b):
        s = x + r
        return s, norm(s, w, b, 1e-6, kind, backend="triton")

    actual = run(lambda x, r, w, b: add_norm(x, r, w, b, 1e-6, kind, "triton"))
    expected = run(unfused)
    assert [t.dtype for t in actual[:4]] == [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16]
    for name, a, e in zip(["s", "y", "dx", "dr", "dweight", "dbias"], actual, expected):
        if name in ("s", "y"):
            assert torch.equal(a, e), name
        else:
            rtol = 2**-7 if a.dtype == torch.bfloat16 else 1e-6
            assert ((a.float() - e.float()).abs() <= rtol * e.float().abs() + 1e-6 * e.float().abs().max()).all(), name


@pytest.mark.xdist_group("rope")
@pytest.mark.parametrize(
    "shape,fused",
    [
        ((32, 4096, 6, 64), True),  # RetNet-bi's q at 1024 px: a slice of a route-gathered q, k, v stream
        ((4, 4096, 16, 64), False),
    ],
)
def test_rope(kernels, seed, shape, fused):
    # mmeff.ops.rope's kernel against its reference (both compute in fp32) on the same bf16 inputs, output and the
    # gradient of x: each element within one bf16 ulp (the kernel may fuse a product into an FMA).
    from mmeff.ops.rope import apply_rope, rope_angles

    B, T, H, D = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    source = torch.randn(B, T, (3 if fused else 1) * H * D, device="cuda", generator=gen).to(torch.bfloat16)
    dy = torch.randn(shape, device="cuda", generator=gen).to(torch.bfloat16)
    cos, sin = rope_angles(torch.arange(T, device="cuda"), D)

    def run(backend):
        leaf = source.detach().clone().requires_grad_()
        y = apply_rope(leaf[..., : H * D].unflatten(-1, (H, D)), cos, sin, backend=backend)
        return [y, *torch.autograd.grad(y, leaf, dy)]

    for name, got, want in zip(["y", "dx"], run("triton"), run("torch")):
        assert got.dtype == torch.bfloat16
        assert ((got.float() - want.float()).abs() <= 2**-7 * want.float().abs() + 1e-6).all(), name


@pytest.mark.xdist_group("rope")
@pytest.mark.parametrize(
    "shape,fused",
    [
        ((4, 4096, 8, 128), True),  # the gated_deltanet LM's q: a slice of the short conv's fused q, k, v output
        ((32, 4096, 6, 64), False),  # gated_deltanet-bi's k at 1024 px
    ],
)
def test_l2_normalize(kernels, seed, shape, fused):
    # The l2 feature map's kernels (mmeff.kernels.norm.L2Normalize) against the reference autograd function on the
    # same bf16 inputs, both computing in fp32: y within one bf16 ulp, dx within one ulp of the reference formula on
    # the kernel's own y (a y one ulp apart moves dx by more: dy - y <dy, y> cancels).
    from mmeff.kernels.norm import L2Normalize
    from mmeff.ops.features import _L2Normalize

    B, T, H, D = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    source = torch.randn(B, T, (3 if fused else 1) * H * D, device="cuda", generator=gen).to(torch.bfloat16)
    dy = torch.randn(shape, device="cuda", generator=gen).to(torch.bfloat16)
    x = source[..., : H * D].unflatten(-1, (H, D))
    y = L2Normalize.apply(x.detach().requires_grad_(), 1e-12)
    leaf = x.detach().requires_grad_()
    (dx,) = torch.autograd.grad(L2Normalize.apply(leaf, 1e-12), leaf, dy)
    want_y = _L2Normalize.apply(x.detach().requires_grad_(), 1e-12)
    along = (dy.float() * y.float()).sum(-1, keepdim=True)
    own_dx = ((dy.float() - y.float() * along) / x.float().norm(dim=-1, keepdim=True)).to(torch.bfloat16)
    for name, got, want in (("y", y, want_y), ("dx", dx, own_dx)):
        assert got.dtype == torch.bfloat16
        assert ((got.float() - want.float()).abs() <= 2**-7 * want.float().abs() + 1e-6).all(), name


@pytest.mark.xdist_group("rope")
@pytest.mark.parametrize(
    "name,shape",
    [("log_sigmoid_gate", (4, 4096, 512)), ("elu_plus_one", (512, 196, 1152)), ("scaled_sigmoid", (4, 4096, 8))],
)
def test_pointwise(kernels, seed, name, shape):
    # mmeff.kernels.pointwise at the GLA LM's gate size, gla-bi's q and k at 224 px (read in place from the qkv
    # projection's output as 12 heads of 64) and the delta rule LM's beta, on bf16 inputs, against the reference
    # autograd functions in fp32 on the same values: an fp32 result within 1e-6 + 1e-5 relative, a bf16 one within one
    # ulp (two for elu + 1's gradient, which reads the bf16 output).
    from mmeff.ops import features, gates

    fast, reference = {
        "log_sigmoid_gate": (lambda x: gates.log_sigmoid_gate(x, 16.0), lambda x: gates._LogSigmoidGate.apply(x, 16.0)),
        "elu_plus_one": (features.FEATURE_MAPS["elu"], features._EluPlusOne.apply),
        "scaled_sigmoid": (gates.scaled_sigmoid, torch.sigmoid),
    }[name]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(shape, device="cuda", generator=gen) * 4).to(torch.bfloat16)

    view = (lambda t: t[..., :768].unflatten(-1, (12, 64))) if name == "elu_plus_one" else (lambda t: t)

    def run(fn, leaf):
        leaf = leaf.detach().clone().requires_grad_()
        y = fn(view(leaf))
        dy = torch.randn(y.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
        return y, torch.autograd.grad(y, leaf, dy.to(torch.bfloat16).to(y.dtype))[0]  # the same values both runs

    for got, want, ulps in zip(run(fast, x), run(reference, x.float()), (1, 2)):
        rtol = 1e-5 if got.dtype == torch.float32 else ulps * 2**-7
        assert ((got.float() - want).abs() <= 1e-6 + rtol * want.abs()).all(), name


@pytest.mark.xdist_group("rope")
@pytest.mark.parametrize("limit", [(0.0, float("inf")), (1e-3, 0.1)])
def test_softplus_decay(kernels, monkeypatch, seed, limit):
    # Mamba's time step and log decay (mmeff.kernels.pointwise.Decay) at the Mamba-2 LM's size (16k tokens, 32
    # heads; dt a strided slice of the bf16 in_proj output) against the plain ops on the same values, with both outputs'
    # gradients: fp32 results within 1e-6 + 1e-5 relative (A's and the bias' sums against their largest), bf16 dx
    # within one ulp.
    from mmeff.ops import dispatch, gates

    gen = torch.Generator(device="cuda").manual_seed(seed)
    source = (torch.randn(4, 4096, 96, device="cuda", generator=gen) * 4).to(torch.bfloat16)
    bias = torch.randn(32, device="cuda", generator=gen)
    A = -torch.rand(32, device="cuda", generator=gen) * 16

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (source, bias, A)]
        dt, log_decay = gates.softplus_decay(leaves[0][..., 32:64], leaves[1], leaves[2], limit)
        grads = [torch.randn(dt.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(i)) for i in (1, 2)]
        return [dt, log_decay, *torch.autograd.grad([dt, log_decay], leaves, grads)]

    got = run()
    monkeypatch.setattr(dispatch, "on_cuda", lambda x: False)
    for g, w in zip(got, run()):
        rtol = 1e-5 if g.dtype == torch.float32 else 2**-7
        scale = w.float().abs().max() if w.dim() == 1 else w.float().abs()
        assert ((g.float() - w.float()).abs() <= 1e-6 + rtol * scale).all()


@pytest.mark.xdist_group("rope")
@pytest.mark.parametrize("op", ["scale", "skip"])
def test_ssd_per_head_maps(kernels, monkeypatch, seed, op):
    # SSD's v = x dt and out = y + D x (mmeff.kernels.pointwise.HeadScale / HeadSkip) at the Mamba-2 LM's size (16k
    # tokens, 32 heads of 64; x a slice of the bf16 short-conv output [.., 2304]) against the plain ops on the same
    # values: bf16 results within one ulp (v bit for bit: one product, rounded as torch rounds; the skip's y + D x may
    # fuse into one FMA); the fp32 sums, ddt (over a head's 64 products) and dD (over the tokens), in another order:
    # within 1e-5 of the tensor's largest element (relative to each element, ddt's cancellations failed on an H100).
    from mmeff.ops import dispatch, ssm

    gen = torch.Generator(device="cuda").manual_seed(seed)
    source = torch.randn(4, 4096, 2304, device="cuda", generator=gen).to(torch.bfloat16)
    other = torch.rand(4, 4096, 32, device="cuda", generator=gen) if op == "scale" else torch.randn(32, device="cuda", generator=gen)
    y = torch.randn(4, 4096, 32, 64, device="cuda", generator=gen).to(torch.bfloat16)

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (source, other, y)]
        x = leaves[0][..., :2048].unflatten(-1, (32, 64))
        out = ssm._scaled(x, leaves[1]) if op == "scale" else ssm._skip_and_gate(leaves[2], x, leaves[1][:, None], None, x.dtype)
        dout = torch.randn(out.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)).to(out.dtype)
        return [out, *torch.autograd.grad(out, leaves, dout, allow_unused=True)]

    got = run()
    monkeypatch.setattr(dispatch, "on_cuda", lambda x: False)
    want = run()
    if op == "scale":  # v is made again in the backward (mmeff.ops.recompute): bit for bit as the plain ops
        assert torch.equal(got[0], want[0])
    for g, w in zip(got, want):
        if w is None:
            assert g is None
            continue
        rtol = 1e-5 if g.dtype == torch.float32 else 2**-7
        scale = w.float().abs().max() if g.dtype == torch.float32 else w.float().abs()
        assert ((g.float() - w.float()).abs() <= 1e-6 + rtol * scale).all()


@pytest.mark.xdist_group("rope")
def test_ssd_skip_leaves_its_dx_to_the_scale(kernels, monkeypatch, seed):
    # The two maps of one x linked as mmeff.ops.ssm.ssd links them (the skip's dx added in the scale's backward), at
    # the size above, a cumulative sum standing in for the recurrence between them: gradients within 2 bf16 ulps of
    # each one's largest element of the plain ops' (the linked dx rounds once, autograd's sum of two terms twice).
    from mmeff.ops import dispatch, ssm

    gen = torch.Generator(device="cuda").manual_seed(seed)
    source = torch.randn(4, 4096, 2304, device="cuda", generator=gen).to(torch.bfloat16)
    dt, D = torch.rand(4, 4096, 32, device="cuda", generator=gen), torch.randn(32, device="cuda", generator=gen)

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (source, dt, D)]
        x = leaves[0][..., :2048].unflatten(-1, (32, 64))
        link: dict = {}
        y = ssm._scaled(x, leaves[1], link).cumsum(1) * 0.01
        out = ssm._skip_and_gate(y, x, leaves[2][:, None], None, x.dtype, link)
        dout = torch.randn(out.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)).to(out.dtype)
        return [out, *torch.autograd.grad(out, leaves, dout)]

    got = run()
    monkeypatch.setattr(dispatch, "on_cuda", lambda x: False)
    for g, w in zip(got, run()):
        rtol = 1e-5 if g.dtype == torch.float32 else 2 * 2**-7
        assert ((g.float() - w.float()).abs() <= 1e-6 + rtol * w.float().abs().max()).all()


@pytest.mark.xdist_group("rope")
def test_bi_route_kernels(kernels, monkeypatch, seed):
    # mmeff.kernels.routes through Routes(scan="bi") at gla-bi's size at 224 px (256 images of 196 tokens; q a [6, 64]
    # slice of a wider projection, g a [384] one) against the gather form on the same bf16 values: forward and the
    # gradient of the projection, the saved streams stacked again in the backward. Copies and a mean of two: within one
    # bf16 ulp.
    from mmeff.blocks import scan as scan_module
    from mmeff.blocks.layout import Layout

    gen = torch.Generator(device="cuda").manual_seed(seed)
    source = torch.randn(256, 196, 4 * 384, device="cuda", generator=gen).to(torch.bfloat16)

    def run(leaf):
        leaf = leaf.detach().clone().requires_grad_()
        q, g = leaf[..., :384].unflatten(-1, (6, 64)), leaf[..., 384:768]
        mix = lambda s, cu: s[0].flatten(2).float().cumsum(1).to(s[0].dtype) * s[1]  # noqa: E731
        y = scan_module.Routes(causal=False, scan="bi")(mix, [q, g], Layout())
        dy = torch.randn(y.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
        return y, torch.autograd.grad(y, leaf, dy.to(y.dtype))[0]

    got = run(source)
    monkeypatch.setattr(scan_module, "_flip_kernels", lambda xs, flip: None)
    for g, w in zip(got, run(source)):
        assert ((g.float() - w.float()).abs() <= 2**-7 * w.float().abs() + 1e-6).all()


@pytest.mark.xdist_group("moe")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
def test_moe_glue(kernels, monkeypatch, seed, dtype):
    # Dispatch, weighted combine and SwiGLU (mmeff.kernels.moe) at an LM layer's size - 16k tokens, top-2 of
    # 8 experts, width 1024 (not a power of two: 2816 hidden) - against their PyTorch reference, forward and
    # every gradient, computed in fp32 on the same inputs.
    from mmeff.kernels import moe
    from mmeff.ops import grouped
    from mmeff.ops.mlp import act_linear

    def swiglu_mlp(gate, up, weight):
        return act_linear(gate, weight, None, "swiglu", up)

    tokens, k, dim, hidden = 16384, 2, 1024, 2816
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, dim, device="cuda", generator=gen).to(dtype)
    experts = torch.randint(0, 8, (tokens, k), device="cuda", generator=gen)
    weights = torch.rand(tokens, k, device="cuda", generator=gen).softmax(-1)
    order, inv = grouped.sort_assignments(experts)
    rows = torch.randn(tokens * k, dim, device="cuda", generator=gen).to(dtype)
    h = torch.randn(tokens * k, 2 * hidden, device="cuda", generator=gen).to(dtype)
    checks = {
        "dispatch": (lambda a: moe.Dispatch.apply(a, order, inv, k), lambda a: grouped.dispatch(a, order, inv, k), [x]),
        "combine": (lambda r, w: moe.Combine.apply(r, order, inv, w), lambda r, w: grouped.combine(r, order, inv, w),
                    [rows, weights]),
        "swiglu": (moe.SwiGLU.apply, lambda a: grouped.activate(a, True), [h]),
        # the dense SwiGLU MLP's activation + down projection (its kernels: gate and up as two tensors)
        "dense_swiglu": (swiglu_mlp, swiglu_mlp, [h[:tokens, :hidden], h[:tokens, hidden:], h[-dim:, :hidden] / hidden**0.5]),
    }  # fmt: skip

    def run(fn, inputs, upcast):
        leaves = [(t.float() if upcast else t).detach().clone().requires_grad_() for t in inputs]
        out = fn(*leaves)
        grad = torch.randn(out.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
        return [out, *torch.autograd.grad(out, leaves, grad.to(out.dtype))]

    errors = {}
    for name, (kernel, ref, inputs) in checks.items():
        actual = run(kernel, inputs, upcast=False)
        with monkeypatch.context() as m:
            m.setenv("MMEFF_FORCE_REFERENCE", "1")
            expected = run(ref, inputs, upcast=True)
        assert actual[0].dtype == dtype, name
        errors |= {f"{name}[{i}]": norm_error(a.float(), e) for i, (a, e) in enumerate(zip(actual, expected))}
    assert all(e < TOL[dtype] for e in errors.values()), errors


@cases(["scalar_decay", "gated_delta_rule"], ["bf16"])
def test_long_sequence(kernels, monkeypatch, seed, kind, dtype):
    # T = 128k in one sequence, forward and backward, against the reference (the kinds whose fp32 reference stays
    # small at that length). Tensors past 2**31 elements: test_large_shapes_gpu.py (opt-in, tens of GB).
    inputs = make_inputs(kind, 1, 131072, HEADS, WIDTH, WIDTH, dtype=dtype, device="cuda", seed=seed)
    assert_parity(kernels, monkeypatch, inputs, dtype)
