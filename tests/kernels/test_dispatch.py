"""Dispatch and packed sequences around the kernels, on CPU: the reference's cu_seqlens support, Triton kept
out of CPU-only imports, the interpreter fixture leaving no trace for the rest of the suite, and packed
documents through the ops' Triton backend (interpreted, with a faked GPU).

Tolerance of the reference comparisons: max |a - b| <= 1e-4 * max(1, max |b|) (fp32).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import compare, forward_backward, interpreted_kernels, make_inputs, max_error

from mmeff import ops
from mmeff.ops import dispatch
from mmeff.ops.recurrence import linear_recurrence


@pytest.mark.parametrize("kind", ["gla", "gated_delta_rule"])
def test_packed_reference(kind):
    # chunk == recurrent on packed sequences (one empty), and no sequence sees another one's inputs.
    cu_seqlens = torch.tensor([0, 7, 7, 40, 45], dtype=torch.int32)
    inputs = make_inputs(kind, 1, 45, 2, 8, 4, seed=6, num_states=4)
    chunk = forward_backward(linear_recurrence, inputs, mode="chunk", chunk_size=16, cu_seqlens=cu_seqlens)
    recurrent = forward_backward(linear_recurrence, inputs, mode="recurrent", cu_seqlens=cu_seqlens)
    errors = compare(chunk, recurrent, max_error)
    assert all(e <= 1e-4 for e in errors.values()), errors
    assert chunk[1].shape == (4, 2, 8, 4)
    assert torch.equal(chunk[1][1], inputs["initial_state"][1])  # the empty sequence keeps its state

    changed = dict(inputs, v=inputs["v"].clone())
    changed["v"][:, 7:] += 1.0
    o, _ = linear_recurrence(**changed, scale=0.5, mode="chunk", cu_seqlens=cu_seqlens)
    assert torch.equal(o[:, :7], chunk[0][:, :7])

    with pytest.raises(ValueError, match="cu_seqlens"):
        linear_recurrence(torch.randn(2, 4, 1, 2), *[torch.randn(2, 4, 1, 2)] * 2, cu_seqlens=cu_seqlens)


def test_cpu_imports_leave_triton_alone():
    code = (
        "import sys, torch, mmeff, mmeff.ops, mmeff.blocks\n"
        "x = torch.randn(1, 5, 2, 4)\n"
        "mmeff.ops.gated_delta_rule(x, x, x, torch.zeros(1, 5, 2), torch.ones(1, 5, 2))\n"
        "assert 'triton' not in sys.modules and 'mmeff.kernels' not in sys.modules, 'triton imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cuda_machines_preload_the_kernels():
    # torch.compile cannot trace an import: where CUDA is present, importing mmeff.ops imports every kernel module
    # the ops reach by name, before any model is compiled (before, a compiled gla-bi ViT broke its graph in every
    # layer, at the kernels' first import).
    code = (
        "import sys, torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "import mmeff.ops\n"
        "from mmeff.ops.dispatch import KERNEL_MODULES\n"
        "missing = [m for m in KERNEL_MODULES if 'mmeff.kernels' + (m and '.' + m) not in sys.modules]\n"
        "assert not missing, missing\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MMEFF_FORCE_REFERENCE"}  # which would import nothing
    subprocess.run([sys.executable, "-c", code], check=True, env={**env, "OMP_NUM_THREADS": "1"})


def test_interpreter_leaves_no_trace():
    import triton
    import triton.language as tl

    saved = dict(vars(tl))
    env = os.environ.get("TRITON_INTERPRET")
    with interpreted_kernels() as kernels:
        q = torch.randn(1, 5, 1, 16)
        o, _ = kernels.linear_recurrence_triton(q, q, q)
        assert torch.allclose(o, linear_recurrence(q, q, q, mode="recurrent")[0], atol=1e-5)
        assert sys.modules["triton"] is not triton
    assert os.environ.get("TRITON_INTERPRET") == env
    assert sys.modules["triton"] is triton and not any(n.startswith("mmeff.kernels") for n in sys.modules)
    assert dict(vars(tl)) == saved


def test_gla_backward_skips_miscompiled_configs():
    # 4-warp builds of the GLA backward give wrong dq/dk on an H100 with 16-bit inputs (kernels_notes.md).
    from mmeff.kernels.chunk_o import _sm90_safe_configs
    from mmeff.kernels.utils import KEY_GATE, SCALAR_GATE, warps

    configs = warps(42, 82, 22)
    bf16, fp32 = ({"q": torch.empty(1, dtype=dt)} for dt in (torch.bfloat16, torch.float32))
    launch = dict(DELTA=False, BV=64, K=32)
    assert [c.num_warps for c in _sm90_safe_configs(configs, bf16, GATE=KEY_GATE.value, **launch)] == [8, 2]
    assert _sm90_safe_configs(configs, fp32, GATE=KEY_GATE.value, **launch) == configs
    assert _sm90_safe_configs(configs, bf16, GATE=SCALAR_GATE.value, **launch) == configs


def test_wy_kernels_skip_miscompiled_configs():
    # 4-warp builds of both delta-rule WY kernels are wrong (or fail in ptxas) on an H100 (kernels_notes.md).
    from mmeff.kernels import chunk_delta

    for kernel in (chunk_delta._wy_fwd_kernel, chunk_delta._wy_bwd_kernel):
        configs = kernel.fn.configs  # the autotuner's
        assert configs and all(c.num_warps != 4 for c in configs)


# Packed documents through the ops with a faked GPU: the dispatcher sends backend="triton" to the interpreted
# kernels, which must equal the PyTorch path (packed == separate documents is tests/ops/test_varlen.py's).
LENGTHS = [5, 17, 1, 9]
CU = torch.tensor([0, 5, 22, 23, 32], dtype=torch.int32)


@pytest.fixture
def fake_gpu(kernels, monkeypatch):
    monkeypatch.setattr(dispatch, "on_cuda", lambda x: True)
    monkeypatch.setattr(kernels.utils, "POISON", True)
    return kernels


def _both_backends(fn, inputs):
    """fn(backend=..., **leaves) -> tensor or tuple, run by triton and torch: errors of the outputs and grads."""
    results = []
    for backend in ("triton", "torch"):
        leaves = {n: t.detach().clone().requires_grad_(t.is_floating_point()) for n, t in inputs.items()}
        outs = fn(backend=backend, **leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        gen = torch.Generator().manual_seed(1)
        sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs).backward()
        results.append((outs, {n: t.grad for n, t in leaves.items() if t.requires_grad}))
    (got, got_grads), (ref, ref_grads) = results
    errors = {f"out{i}": max_error(a, b) for i, (a, b) in enumerate(zip(got, ref))}
    errors.update({f"d{n}": max_error(got_grads[n], ref_grads[n]) for n in ref_grads})
    assert all(e <= 1e-4 for e in errors.values()), errors


def test_ssd_packed_triton(fake_gpu):
    gen = torch.Generator().manual_seed(2)
    T, H, P, G, N = 32, 2, 4, 1, 16
    inputs = dict(
        x=torch.randn(1, T, H, P, generator=gen), dt=torch.randn(1, T, H, generator=gen),
        A=-torch.rand(H, generator=gen) - 0.2, B=torch.randn(1, T, G, N, generator=gen),
        C=torch.randn(1, T, G, N, generator=gen), D=torch.randn(H, generator=gen),
        initial_states=torch.randn(len(LENGTHS), H, P, N, generator=gen),
    )  # fmt: skip
    _both_backends(
        lambda **kw: ops.ssd(**kw, dt_softplus=True, chunk_size=16, return_final_states=True, cu_seqlens=CU), inputs
    )


def _saved_storages(fn):
    """(fn's result, {data_ptr: (nbytes, shape)} of the storage of every tensor autograd saved during fn)."""
    seen = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), (t.untyped_storage().nbytes(), tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, seen


def test_ssd_triton_keeps_no_per_head_copy_of_b_c_or_x_dt(fake_gpu):
    # q, k = C, B repeated over the 4 heads of their group, v = x * dt: the kernels' backward reads them, made again
    # from C, B, x and dt. Every large storage kept is one of the inputs' (interpreted kernels, fp32).
    gen = torch.Generator().manual_seed(0)
    T, H, P, G, N = 64, 4, 8, 1, 16
    x, dt = torch.randn(1, T, H, P, generator=gen), torch.randn(1, T, H, generator=gen)
    A, B, C = -torch.rand(H, generator=gen) - 0.2, torch.randn(1, T, G, N, generator=gen), torch.randn(1, T, G, N, generator=gen)
    leaves = [t.requires_grad_() for t in (x, dt, B, C)]
    y, kept = _saved_storages(lambda: ops.ssd(x, dt, A, B, C, dt_softplus=True, chunk_size=16, backend="triton"))
    inputs = {t.untyped_storage().data_ptr() for t in leaves}
    large = {ptr: shape for ptr, (nbytes, shape) in kept.items() if nbytes >= T * min(P, N) * 4 and ptr not in inputs}
    assert not large, f"kept beside the inputs: {large}"
    y.square().sum().backward()
    want = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    ops.ssd(x, dt, A, B, C, dt_softplus=True, chunk_size=16, backend="torch").square().sum().backward()
    for got, ref in zip(want, (t.grad for t in leaves)):
        assert (got - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_global_linear_attention_packed_triton(fake_gpu):
    # Packed sequences (cu_seqlens, one of a single token) through the fused non-causal kernels, elu+1, normalised.
    gen = torch.Generator().manual_seed(4)
    T, H, K = 32, 2, 16
    inputs = {n: torch.randn(1, T, H, K, generator=gen) for n in ("q", "k", "v")}
    _both_backends(
        lambda **kw: ops.global_linear_attention(**kw, cu_seqlens=CU, normalize=True, feature_map="elu"), inputs
    )


def test_selective_scan_packed_triton(fake_gpu):
    gen = torch.Generator().manual_seed(3)
    T, Dm, N = 32, 2, 16
    inputs = dict(
        u=torch.randn(1, Dm, T, generator=gen), delta=torch.randn(1, Dm, T, generator=gen),
        A=-torch.rand(Dm, N, generator=gen) - 0.2, B=torch.randn(1, N, T, generator=gen),
        C=torch.randn(1, N, T, generator=gen), initial_state=torch.randn(len(LENGTHS), Dm, N, generator=gen),
    )  # fmt: skip
    _both_backends(
        lambda **kw: ops.selective_scan(**kw, delta_softplus=True, chunk_size=16, return_last_state=True,
                                        cu_seqlens=CU),  # fmt: skip
        inputs,
    )


def test_conv_docs_triton(fake_gpu):
    # Boundaries beside the kernel's row-tile edges (32 rows), a one-token document, two rows (the second's tiles
    # start inside the first sequence: rows are tiled flattened).
    gen = torch.Generator().manual_seed(4)
    docs = torch.zeros(2, 70, dtype=torch.long)
    docs[0, 30:] = 1
    docs[0, 63] = 2
    docs[0, 64:66] = 3
    docs[1, 65:] = 4
    inputs = dict(x=torch.randn(2, 70, 12, generator=gen), weight=torch.randn(12, 4, generator=gen),
                  bias=torch.randn(12, generator=gen))  # fmt: skip
    _both_backends(lambda **kw: ops.causal_conv1d(**kw, docs=docs), inputs)


def test_conv_wider_than_the_kernels_keep_takes_the_reference(fake_gpu):
    # The conv backward keeps one x tile per tap, up to 4 (MAX_WIDTH): a wider kernel runs on F.conv1d.
    assert "width 5" in fake_gpu.conv.unsupported(torch.zeros(1, 8, 4), torch.zeros(4, 5))
    gen = torch.Generator().manual_seed(5)
    x, weight = torch.randn(2, 9, 6, generator=gen), torch.randn(6, 5, generator=gen)
    assert torch.equal(ops.causal_conv1d(x, weight), ops.causal_conv1d(x, weight, backend="torch"))
    with pytest.raises(RuntimeError, match="kernel width 5"):
        ops.causal_conv1d(x, weight, backend="triton")


def test_recurrent_mode_takes_fused_kernel(fake_gpu, monkeypatch):
    # mode "recurrent" without gradients runs the fused step-by-step kernel (past its chunk-mode length limit).
    monkeypatch.setattr(fake_gpu.ChunkRecurrence, "apply", None)
    inputs = make_inputs("gated_delta_rule", 1, 32, 2, 16, 16, seed=5, num_states=len(LENGTHS))
    with torch.no_grad():
        got = ops.linear_recurrence(**inputs, mode="recurrent", output_final_state=True, cu_seqlens=CU, backend="triton")
        ref = ops.linear_recurrence(**inputs, mode="recurrent", output_final_state=True, cu_seqlens=CU, backend="torch")
    assert max_error(got[0], ref[0]) <= 1e-4 and max_error(got[1], ref[1]) <= 1e-4
    with pytest.raises(RuntimeError, match="mode='recurrent' with gradients"):
        ops.linear_recurrence(**{**inputs, "q": inputs["q"].requires_grad_()}, mode="recurrent", backend="triton")


def test_large_shapes_run_or_are_refused_by_name(monkeypatch):
    # Every element offset in the kernels is int64 (T = 128k with 2**31 elements runs: the GPU suite's
    # test_large_shapes); token indices (cu_seqlens) are int32 and the heads sit on a grid dimension of at most
    # 65535, so past those the dispatcher refuses the kernels, naming the shape. Meta tensors: no memory.
    from mmeff.ops import recurrence

    monkeypatch.setattr(dispatch, "on_cuda", lambda x: True)

    def meta(*shape):
        return torch.empty(*shape, device="meta", dtype=torch.bfloat16)

    too_long = meta(2, 2**30, 1, 16)
    with pytest.raises(RuntimeError, match=r"B\*T = 2147483648 tokens \(q \(2, 1073741824, 1, 16\)\)"):
        linear_recurrence(too_long, too_long, too_long, backend="triton")
    many_heads = meta(1, 4, 70000, 16)
    with pytest.raises(RuntimeError, match=r"70000 heads \(q \(1, 4, 70000, 16\)\)"):
        linear_recurrence(many_heads, many_heads, many_heads, backend="triton")
    monkeypatch.setattr(recurrence, "run_recurrence", lambda impl, *args, **kwargs: impl)
    assert linear_recurrence(too_long, too_long, too_long) == "torch"  # auto: the PyTorch path
    big = meta(1, 2**17, 64, 256)  # T = 128k, 2**31 elements per tensor
    assert linear_recurrence(big, big, big, F.logsigmoid(big[..., 0].float())) == "triton"


def test_custom_op_matches_reference_and_compiles(fake_gpu):
    # mmeff::linear_recurrence (the kernels as a torch custom op) against the step-by-step reference, eagerly and
    # under torch.compile(fullgraph=True), alone and through the op's dispatch: dynamo captures it without a
    # graph break, through its fake kernels. Its backward runs the kernels' backward passes on the inputs (the gate
    # cumsum made again, the delta rule's w and u from the X its forward returned; GLA's per-key gates:
    # test_compiled_bidirectional_gla_... below).
    from functools import partial

    from mmeff.ops.custom_ops import linear_recurrence_op

    inputs = make_inputs("gated_delta_rule", 1, 32, 2, 16, 16, seed=8, num_states=len(LENGTHS))
    ref = forward_backward(linear_recurrence, inputs, mode="recurrent", cu_seqlens=CU)
    compile = partial(torch.compile, backend="aot_eager", fullgraph=True)
    for fn in (linear_recurrence_op, compile(linear_recurrence_op), compile(partial(linear_recurrence, backend="triton"))):
        got = forward_backward(partial(fn, cu_seqlens=CU, chunk_size=16), inputs)
        errors = compare(got, ref, max_error)
        assert all(e <= 1e-4 for e in errors.values()), errors
    x, dt, A, B = torch.randn(1, 32, 2, 4), torch.randn(1, 32, 2), -torch.rand(2), torch.randn(1, 32, 1, 16)
    ssd = compile(partial(ops.ssd, chunk_size=16, cu_seqlens=CU, backend="triton"))(x, dt, A, B, B)
    assert max_error(ssd, ops.ssd(x, dt, A, B, B, chunk_size=16, cu_seqlens=CU, backend="torch")) <= 1e-4


def test_custom_op_solves_the_delta_rules_x_once_in_training(fake_gpu, monkeypatch):
    # Through mmeff::linear_recurrence with a backward to come, the forward returns the WY matrix X it solved and the
    # backward makes w and u from it (solving X again took a fifth of the eager backward); without one (keep_wy
    # false), X is not returned. The gradients: test_custom_op_matches_reference_and_compiles.
    from functools import partial

    from mmeff.ops.custom_ops import linear_recurrence_op

    solved, solve = [], fake_gpu.chunk.wy_fwd
    monkeypatch.setattr(fake_gpu.chunk, "wy_fwd", lambda *args: solved.append(args[0].shape) or solve(*args))
    inputs = make_inputs("gated_delta_rule", 1, 32, 2, 16, 16, seed=8, num_states=len(LENGTHS))
    forward_backward(partial(linear_recurrence_op, cu_seqlens=CU, chunk_size=16), inputs)
    assert len(solved) == 1
    args = [inputs[n] for n in ("q", "k", "v", "log_decay", "beta")]
    kept, dropped = (
        torch.ops.mmeff.linear_recurrence(*args, None, CU, 0.25, 16, False, keep)[2] for keep in (True, False)
    )
    assert kept.shape == (1, 32, 2, 16 // 2 + 1) and kept.dtype == args[0].dtype and dropped.numel() == 0


def test_compiled_bidirectional_gla_takes_the_kernels_in_one_graph(fake_gpu):
    # The GPU path of a bidirectional (route-stacked) gla block under torch.compile(fullgraph=True): the routes'
    # gather functions and the recurrence's custom op are traced, with no graph break, and the compiled forward and
    # every gradient equal the eager ones (interpreted kernels, fp32). Tolerance: 1e-4 relative to the largest value.
    from mmeff import blocks

    torch.manual_seed(0)
    block = blocks.build("gla", 32, causal=False, scan="bi", heads=2)
    x = torch.randn(2, 40, 32)
    results = []
    torch._dynamo.reset()
    for run in (block, torch.compile(block, backend="aot_eager", fullgraph=True, dynamic=False)):
        leaf = x.clone().requires_grad_()
        y = run(leaf)
        y.square().sum().backward()
        results.append([y.detach(), leaf.grad, *(p.grad.clone() for p in block.parameters())])
        block.zero_grad(set_to_none=True)
    for got, want in zip(results[1], results[0]):
        assert max_error(got, want) <= 1e-4 * max(1.0, want.abs().max().item())



# linear attention's local_conv (grid-conv kernels), gla with its short conv, mamba2 (short conv and SSD kernels).
@pytest.mark.parametrize("name, options, grid", [
    ("linear_attn", {"scan": "global", "local_conv": 3}, (1, 6, 7)),
    ("gla", {"scan": "bi", "conv_size": 4}, None),
    ("mamba2", {"scan": "bi", "head_dim": 8, "d_state": 8}, None),
])  # fmt: skip
def test_compiled_conv_mixers_take_the_kernels_in_one_graph(fake_gpu, monkeypatch, name, options, grid):
    # The Triton kernels of these blocks run as custom ops under torch.compile(fullgraph), opaque to dynamo: tracing
    # into a kernel's autotuner failed (on the H200: "ListVariable is already tracked for mutation"; here: "Mutating
    # a variable not in the current scope"), and an import under tracing (mamba-ssm's loader, unless preloaded)
    # broke the graph. The compiled forward and every gradient equal the eager ones (interpreted kernels, fp32).
    # Tolerance: 1e-4 relative to the largest value.
    from mmeff import blocks
    from mmeff.blocks.layout import Layout

    with monkeypatch.context() as cuda:
        cuda.setattr(torch.cuda, "is_available", lambda: True)
        dispatch.preload_kernels()  # as importing mmeff.ops does on a CUDA machine
    torch.manual_seed(0)
    block = blocks.build(name, 32, causal=False, **({} if name == "mamba2" else {"heads": 2}), **options)
    layout = Layout(special=1, grid=grid) if grid else None
    x = torch.randn(2, 1 + 6 * 7 if grid else 40, 32)
    results = []
    torch._dynamo.reset()
    for run in (block, torch.compile(block, backend="aot_eager", fullgraph=True, dynamic=False)):
        leaf = x.clone().requires_grad_()
        y = run(leaf, layout=layout)
        y.square().sum().backward()
        results.append([y.detach(), leaf.grad, *(p.grad.clone() for p in block.parameters())])
        block.zero_grad(set_to_none=True)
    for got, want in zip(results[1], results[0]):
        assert max_error(got, want) <= 1e-4 * max(1.0, want.abs().max().item())


def _custom_op_cases() -> dict[str, tuple]:
    """mmeff custom op name -> arguments (fp32; q, k, v and the grid conv's x as strided views, as blocks pass them)."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 37, 3 * 2 * 16, generator=g).requires_grad_()
    q, k, v = (t.unflatten(-1, (2, 16)) for t in qkv.chunk(3, -1))
    wide = torch.randn(2, 37, 2, 32, generator=g).requires_grad_()  # keys and values of other widths: tiles not square
    grid = torch.randn(2, 5 * 7, 3 * 24, generator=g)[..., -24:].requires_grad_()
    x = torch.randn(2, 37, 24, generator=g).requires_grad_()
    runs = torch.tensor([0, 0, 0, 10, 10, 0, 0] * 5 + [0, 0], dtype=torch.int32)[None].expand(2, -1).contiguous()
    wk, wv = torch.randn(2, 37, 2, 16, generator=g), torch.randn(2, 37, 2, 24, generator=g)
    gate = -torch.rand(2, 37, 2, 16, generator=g)
    weight = torch.randn(24, 3, 3, generator=g)
    return {
        "grid_conv": (grid, weight.clone().requires_grad_(), torch.randn(24, requires_grad=True), 5, 7),
        "grid_conv_backward": (torch.randn(2, 35, 24, generator=g), grid.detach(), weight, True, 5, 7),
        "causal_conv": (x, torch.randn(24, 4, generator=g, requires_grad=True), None, True, runs),
        "causal_conv_backward": (torch.randn(2, 37, 24, generator=g), x.detach(), torch.randn(24, 4, generator=g),
                                 torch.randn(24, generator=g), True, None),  # fmt: skip
        "global_linear_attention": (q, k, v, 0.25, True, 1e-6, "elu"),
        "global_linear_attention/wide": (q, k, wide, 0.25, False, 1e-6, "relu"),
        "global_linear_attention_backward": (torch.randn(2, 37, 2, 16, generator=g), q.detach(), k.detach(), v.detach(),
                                             0.25, True, 1e-6, "identity"),  # fmt: skip
        "rope": (wk.requires_grad_(), *(t.squeeze(0) for t in torch.randn(2, 1, 37, 8, generator=g).unbind(0)),
                 torch.bfloat16, False),
        "linear_recurrence": (wk, wk, wv, gate, None, None, None, 0.25, 16, True, True),
        "linear_recurrence/delta": (F.normalize(wk, dim=-1), F.normalize(wk, dim=-1), wv, gate[..., 0],
                                    torch.rand(2, 37, 2, generator=g), None, None, 0.25, 32, False, True),  # fmt: skip
        "linear_recurrence_backward": (torch.randn(2, 37, 2, 24, generator=g), None, wk.detach(), wk.detach(), wv, gate,
                                       None, None, None, None, 0.25, 16),  # fmt: skip
    }


@pytest.mark.parametrize("case", list(_custom_op_cases()))
def test_custom_ops_fakes_match_the_kernels(fake_gpu, case):
    # Each custom op's fake implementation promises the real outputs' shapes, dtypes and strides: Inductor asserts
    # the strides, and compiled blocks failed on the H200 where the fakes promised contiguous weight gradients and
    # the kernels returned transposed views (aot_eager, as in the compile test above, checks none; nor does opcheck,
    # which is run for the schema and the autograd registration).
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_map_only

    import mmeff.ops.custom_ops  # noqa: F401  (registers the ops)

    op, args = getattr(torch.ops.mmeff, case.partition("/")[0]).default, _custom_op_cases()[case]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration"))
    with torch.no_grad():
        real = op(*args)
    with FakeTensorMode() as mode:
        fake = op(*tree_map_only(torch.Tensor, mode.from_tensor, args))
    for i, (r, f) in enumerate(zip(real, fake) if isinstance(real, tuple) else [(real, fake)]):
        assert (r.shape, r.dtype) == (f.shape, f.dtype), f"output {i}"
        kept = [d for d in range(r.dim()) if r.shape[d] > 1]  # a stride of a size-1 dimension is never read
        assert [r.stride(d) for d in kept] == [f.stride(d) for d in kept], f"output {i}: {r.stride()} vs {f.stride()}"


def test_a_block_scanning_in_groups_matches_one_group_on_the_kernels(fake_gpu):
    # scan_tokens on the GPU path (route kernels, chunk kernels, short conv; interpreted): a bidirectional
    # gated_deltanet block's 4 sequences in groups of 2 give the output and every gradient of one group, within 1e-5
    # of the largest value (fp32; measured 1e-6). mamba2 passed too (10.6 s, left out of CI; its groups are checked
    # on the plain path in tests/blocks/test_scan_routes.py).
    from mmeff import blocks
    from mmeff.blocks.layout import Layout

    x = torch.randn(4, 40, 32, generator=torch.Generator().manual_seed(0))
    results = []
    for scan_tokens in (None, 2 * 2 * 40):
        torch.manual_seed(0)
        block = blocks.build("gated_deltanet", 32, causal=False, scan="bi", scan_tokens=scan_tokens, heads=2)
        leaf = x.clone().requires_grad_()
        y = block(leaf, layout=Layout(grid=(1, 5, 8)))
        y.square().sum().backward()
        results.append([y.detach(), leaf.grad, *(p.grad for p in block.parameters())])
    for got, want in zip(*results):
        assert max_error(got, want) <= 1e-5 * max(1.0, want.abs().max().item())
