"""Triton kernels under the interpreter (CPU) against the step-by-step reference, forward and every gradient.

Tolerance, per tensor (output, final state, each gradient): max |kernel - reference| <= TOL * max(1, max
|reference|), TOL = 1e-4 for fp32 inputs (measured ~1e-6) and 5e-3 for fp16 (measured ~7e-4). bf16 is
checked on the GPU only: the interpreter's bf16 tl.dot is wrong. Every buffer the kernels allocate starts
as NaN, so an element a kernel fails to write shows up as NaN.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from kernel_cases import KINDS, compare, forward_backward, make_inputs, max_error, saved_bytes, wy_made_again

from mmeff.ops.recurrence import linear_recurrence
from mmeff.ops.varlen import cu_seqlens_to

TOL = {torch.float32: 1e-4, torch.float16: 5e-3}
reference = partial(linear_recurrence, mode="recurrent")


@pytest.fixture(autouse=True)
def poison(kernels, monkeypatch):
    monkeypatch.setattr(kernels.utils, "POISON", True)


def check(kernels, inputs, tol, chunk_size, cu_seqlens=None):
    kernel = partial(kernels.linear_recurrence_triton, chunk_size=chunk_size, cu_seqlens=cu_seqlens)
    got = forward_backward(kernel, inputs)
    ref = forward_backward(partial(reference, cu_seqlens=cu_seqlens), inputs, upcast=True)
    assert got[0].dtype == inputs["v"].dtype and got[1].dtype == torch.float32
    errors = compare(got, ref, max_error)
    assert all(e <= tol for e in errors.values()), errors


@pytest.mark.parametrize("kind", KINDS)
def test_chunk_matches_reference(kernels, kind):
    # Two chunks of 32, the second with 13 steps: 2 sub-chunks per chunk (GLA blocks, delta-rule solve).
    check(kernels, make_inputs(kind, 2, 45, 2, 16, 32, seed=1), TOL[torch.float32], chunk_size=32)


@pytest.mark.parametrize("kind", ["gla", "gated_delta_rule"])
def test_chunk_64(kernels, kind):
    # The GPU's chunk size: 4 sub-chunks; key and value widths differ (32, 16); 70 = 64 + 6 steps.
    check(kernels, make_inputs(kind, 1, 70, 1, 32, 16, seed=2), TOL[torch.float32], chunk_size=64)


@pytest.mark.parametrize("gates,dtype", [("mild", torch.float32), ("mixed", torch.float32), ("mild", torch.float16)])
def test_gla_factored_scores(kernels, gates, dtype):
    # Chunks within the span limit take the factored scores (all of them with mild gates; with mixed gates
    # the first chunks, while the wiped ones take the sub-chunk kernels), beside the strong gates above.
    inputs = make_inputs("gla", 2, 150, 2, 32, 16, dtype=dtype, seed=6, gates=gates)
    b, span = kernels.utils.chunk_cumsum(inputs["log_decay"].reshape(1, 300, 2, 32), _chunks(kernels, 2, 150, 32))
    fast = span <= kernels.utils.span_limit(dtype)
    assert fast.all() if gates == "mild" else (fast.any() and not fast.all())
    check(kernels, inputs, TOL[dtype], chunk_size=32)


@pytest.mark.parametrize("gates, dk, tile, packed, dv_apart",
                         [("mixed", 48, 16, False, True), ("mild", 32, 16, True, True), ("mild", 16, 16, False, True),
                          ("mixed", 16, 32, False, False)])  # fmt: skip
def test_gla_key_tiles(kernels, monkeypatch, gates, dk, tile, packed, dv_apart):
    # Keys as wide as chunk_o.GLA_KEY_TILE or wider (the ViT-S GLA's 32: one tile; 64, the LM's 128; tiles of 32):
    # _bwd_dqk_kernel's programs take a key tile each (dq, dk and dg columns) and _gla_dv_kernel makes dv; here tiles
    # of 16, K 48 leaving a partial tile of the power of two the kernels pad K to, K 16 one tile. Narrower keys keep
    # dv in the same program. Mixed gates: chunks on both the factored and the sub-chunk path.
    monkeypatch.setattr(kernels.chunk_o, "GLA_KEY_TILE", tile)
    real, grids = kernels.chunk_o._gla_dv_kernel, []

    class Recorded:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    monkeypatch.setattr(kernels.chunk_o, "_gla_dv_kernel", Recorded())
    cu_seqlens = torch.tensor([0, 9, 9, 10, 31, 37], dtype=torch.int32) if packed else None
    batch, seqlen = (1, 37) if packed else (2, 75)
    inputs = make_inputs("gla", batch, seqlen, 2, dk, 24, seed=11, gates=gates, num_states=5 if packed else None)
    check(kernels, inputs, TOL[torch.float32], chunk_size=32, cu_seqlens=cu_seqlens)
    assert len(grids) == (1 if dv_apart else 0)  # _gla_dv_kernel launched once, or not at all


@pytest.mark.parametrize(
    "kind, value_tile, V",
    [("scalar_decay", 16, 32), ("gla", 16, 32), ("delta_rule", 16, 32), ("gated_delta_rule", 32, 64)],
)
def test_split_state_tiles(kernels, monkeypatch, kind, value_tile, V):
    # On a GPU with few (sequence, head) pairs the sequential passes split the state into key and value
    # tiles (the delta rule into value tiles only); on the CPU they never would, so force them: the smallest, and
    # the delta rule's 32-wide value tiles of gated_deltanet's LM (see test_state_tiles_on_a_132_sm_gpu).
    tiles = lambda K, V, n, split, device: (16 if split else K, value_tile)  # noqa: E731
    monkeypatch.setattr(kernels.chunk_h, "state_blocks", tiles)
    check(kernels, make_inputs(kind, 1, 50, 1, 32, V, seed=7), TOL[torch.float32], chunk_size=16)


@pytest.mark.parametrize(
    "programs, K, V, split_keys, tiles",
    [
        (32, 128, 256, False, (128, 32)),  # gated_deltanet's LM at 4k: 4 x 8 (sequence, head) pairs
        (32, 128, 128, False, (128, 16)),  # deltanet's
        (32, 128, 256, True, (32, 64)),  # retnet's: keys split, two programs a SM
        (3072, 64, 64, True, (64, 64)),  # a bidirectional ViT's 512 x 6: enough programs untiled
    ],
)
def test_state_tiles_on_a_132_sm_gpu(kernels, monkeypatch, programs, K, V, split_keys, tiles):
    # The tiles chunk_h.state_blocks picks on the H200 (132 SMs); the delta rule's programs each read every key.
    monkeypatch.setattr(kernels.chunk_h, "sm_count", lambda device: 132)
    assert kernels.chunk_h.state_blocks(K, V, programs, split_keys, torch.device("cuda")) == tiles


def _chunks(kernels, batch, seqlen, size):
    return kernels.utils.make_chunks(None, batch, seqlen, size, torch.device("cpu"))


@pytest.mark.parametrize("kind", ["scalar_decay", "gla", "gated_delta_rule"])
def test_packed_sequences(kernels, kind):
    # Five sequences (one empty, one of a single step, one of a single chunk + 5 steps), states reset at each start.
    cu_seqlens = torch.tensor([0, 9, 9, 10, 31, 37], dtype=torch.int32)
    inputs = make_inputs(kind, 1, 37, 2, 16, 16, seed=3, num_states=5)
    check(kernels, inputs, TOL[torch.float32], chunk_size=16, cu_seqlens=cu_seqlens)


def test_packed_layout_from_host_bounds_reads_nothing_back(kernels, monkeypatch):
    # The chunk layout of boundaries the host made (mmeff.ops.varlen.cu_seqlens_to): no tolist of the device tensor.
    cu_seqlens = cu_seqlens_to([0, 9, 9, 10, 31, 37], "cpu")
    monkeypatch.setattr(torch.Tensor, "tolist", None)
    chunks = kernels.utils.make_chunks(cu_seqlens, 1, 37, 16, torch.device("cpu"))
    monkeypatch.undo()
    assert (chunks.num_seqs, chunks.num_chunks, chunks.max_len) == (5, 5, 21)
    assert chunks.indices.tolist() == [[0, 0], [2, 0], [3, 0], [3, 1], [4, 0]] and chunks.offsets.tolist() == [0, 1, 1, 2, 4]


@pytest.mark.parametrize("kind", ["linear_attention", "gla", "gated_delta_rule"])
def test_fp16(kernels, kind):
    check(kernels, make_inputs(kind, 1, 40, 2, 16, 16, dtype=torch.float16, seed=4), TOL[torch.float16], chunk_size=16)


@pytest.mark.parametrize("kind", [*KINDS, "gla_delta"])
def test_fused_recurrent(kernels, monkeypatch, kind):
    # Short sequences without gradients take the fused step-by-step kernel (packed here, one empty);
    # it alone covers per-key decay with the delta rule.
    monkeypatch.setattr(kernels.ChunkRecurrence, "apply", None)
    cu_seqlens = torch.tensor([0, 1, 1, 13, 29], dtype=torch.int32)
    inputs = make_inputs("gla" if kind == "gla_delta" else kind, 1, 29, 2, 16, 16, seed=5, num_states=4)
    if kind == "gla_delta":
        inputs["beta"] = torch.rand(1, 29, 2)
    assert kernels.RECURRENT_MAX_LEN >= 16
    with torch.no_grad():
        got = kernels.linear_recurrence_triton(**inputs, scale=0.5, output_final_state=True, cu_seqlens=cu_seqlens)
    ref = reference(**inputs, scale=0.5, output_final_state=True, cu_seqlens=cu_seqlens)
    errors = {"o": max_error(got[0], ref[0]), "final_state": max_error(got[1], ref[1])}
    assert all(e <= TOL[torch.float32] for e in errors.values()), errors


def test_supports_and_errors(kernels):
    q = torch.randn(1, 8, 2, 16)
    assert kernels.unsupported(q, q, q) == ""  # the device is mmeff.ops.dispatch's to check
    wide = torch.randn(1, 8, 2, kernels.MAX_KEY_DIM + 1)
    assert "key dim" in kernels.unsupported(wide, wide, q)
    with pytest.raises(ValueError, match="batch size 1"):
        kernels.linear_recurrence_triton(torch.randn(2, 8, 2, 16), *[torch.randn(2, 8, 2, 16)] * 2,
                                         cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))  # fmt: skip
    with pytest.raises(ValueError, match="initial_state"):
        kernels.linear_recurrence_triton(q, q, q, initial_state=torch.zeros(2, 2, 16, 16))


@pytest.mark.parametrize("kind, dtype", [("delta_rule", torch.float32), ("gated_delta_rule", torch.float32),
                                         ("gated_delta_rule", torch.float16)])  # fmt: skip
def test_wy_products_made_again(kernels, kind, dtype):
    # The backward keeps X alone (in the inputs' dtype) and makes w and u again from it: bit for bit the forward's.
    cu_seqlens = torch.tensor([0, 9, 9, 10, 31, 37], dtype=torch.int32)
    inputs = make_inputs(kind, 1, 37, 2, 16, 32, dtype=dtype, seed=7, num_states=5)
    X, made, again = wy_made_again(kernels, inputs, cu_seqlens, 16)
    assert X.dtype == dtype and X.shape == (1, 37, 2, 16 // 2 + 1)  # each chunk's lower triangle
    assert all(torch.equal(a, m) for a, m in zip(again, made))


def test_delta_rule_keeps_x_not_w_and_u(kernels):
    # What the chunked delta rule keeps for its backward: the inputs and X's lower triangles [T, H, chunk / 2 + 1],
    # not w [T, H, K] and u.
    inputs = make_inputs("gated_delta_rule", 1, 64, 2, 16, 32, seed=8)
    leaves = {n: t.requires_grad_() for n, t in inputs.items() if t is not None}
    with saved_bytes() as kept:
        out = kernels.linear_recurrence_triton(**leaves, chunk_size=16)  # its graph holds what is counted
    inputs_bytes = sum(t.untyped_storage().nbytes() for t in leaves.values())
    assert sum(kept.values()) == inputs_bytes + 64 * 2 * (16 // 2 + 1) * 4


@pytest.mark.parametrize("kind, last", [("gla", "intra_bwd"), ("gated_delta_rule", "wy_bwd")])
def test_backward_lets_each_buffer_go_after_its_last_reader(kernels, monkeypatch, kind, last):
    # By the backward's last pass, the recomputed states and w, u, v~, GLA's scores, the local dv and the state
    # gradients are gone, so that pass's outputs can take their memory: gated_deltanet-bi's training step peaked
    # 16.6 KiB per token lower so (`saved_memory.py --peak`'s census, 128 px images, batch 8). Collected first: the
    # interpreter holds a launch's arguments in a reference cycle, a GPU launch does not.
    import gc

    from torch.multiprocessing.reductions import StorageWeakRef

    chunk, made, alive = kernels.chunk, [], []

    def recorded(fn, picks):  # picks: the outputs to follow, by index; None: the one tensor returned
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            made.extend(StorageWeakRef(t.untyped_storage()) for t in ([out] if picks is None else [out[i] for i in picks])
                        if t is not None)  # fmt: skip
            return out

        return wrapped

    def checked(fn):
        def wrapped(*args, **kwargs):
            gc.collect()
            alive.extend(r for r in made if not r.expired())
            return fn(*args, **kwargs)

        return wrapped

    followed = {"fwd_h": (0, 1), "bwd_dh": (0,), "wy_again": (0, 1), "dv_local": None, "intra_scores": None}
    for name, picks in followed.items():
        monkeypatch.setattr(chunk, name, recorded(getattr(chunk, name), picks))
    monkeypatch.setattr(chunk, last, checked(getattr(chunk, last)))
    forward_backward(partial(kernels.linear_recurrence_triton, chunk_size=16), make_inputs(kind, 1, 40, 2, 16, 16, seed=9))
    assert len(made) == (5 if kind == "gla" else 8) and not alive  # forward and backward each make states (and v~)


@pytest.mark.parametrize("kind", ["linear_attention", "scalar_decay"])
@pytest.mark.parametrize("packed", [False, True])
def test_keys_shared_by_groups_of_heads(kernels, kind, packed):
    # Mamba-2's q and k (C and B): 2 key heads shared by the 6 value heads in groups of 3, read in place by every
    # kernel; the reference repeats them per head, so dq and dk are each group's heads' gradients summed.
    cu_seqlens = torch.tensor([0, 9, 9, 10, 31, 37], dtype=torch.int32) if packed else None
    inputs = make_inputs(kind, 1 if packed else 2, 37, 6, 16, 16, seed=9, num_states=5 if packed else None)
    inputs["q"], inputs["k"] = inputs["q"][:, :, ::3].contiguous(), inputs["k"][:, :, ::3].contiguous()
    check(kernels, inputs, TOL[torch.float32], chunk_size=16, cu_seqlens=cu_seqlens)
    # As Mamba-2 hands them over: columns of one wider tensor (its short conv's output), token rows 80 apart.
    wide = torch.cat([inputs["q"].flatten(2), inputs["k"].flatten(2), torch.zeros(*inputs["q"].shape[:2], 16)], -1)
    wide.requires_grad_()
    views = dict(inputs, q=wide[..., :32].unflatten(-1, (2, 16)), k=wide[..., 32:64].unflatten(-1, (2, 16)))
    args = kernels.pack(**{n: views[n] for n in ("q", "k", "v", "log_decay", "beta")}, initial_state=None,
                        cu_seqlens=cu_seqlens, chunk_size=16)[0]  # fmt: skip
    assert args[0].data_ptr() == wide.data_ptr() and args[0].stride(1) == 80 and args[1].stride(1) == 80
    got = kernels.linear_recurrence_triton(**views, cu_seqlens=cu_seqlens, chunk_size=16)[0]
    (got * torch.linspace(-1, 1, got.numel()).view(got.shape)).sum().backward()
    ref_q, ref_k = (inputs[n].clone().requires_grad_() for n in ("q", "k"))
    want = reference(**dict(inputs, q=ref_q, k=ref_k), cu_seqlens=cu_seqlens)[0]
    (want * torch.linspace(-1, 1, want.numel()).view(want.shape)).sum().backward()
    dq, dk = wide.grad[..., :32].unflatten(-1, (2, 16)), wide.grad[..., 32:64].unflatten(-1, (2, 16))
    errors = [max_error(got, want), max_error(dq, ref_q.grad), max_error(dk, ref_k.grad)]
    assert all(e <= TOL[torch.float32] for e in errors), errors
    # The group reading key head 1 is heads 3-5: a kernel reading head h // 2 (or h % 2) fails the check above.
    with torch.no_grad():
        got = kernels.linear_recurrence_triton(**inputs, cu_seqlens=cu_seqlens, chunk_size=16, mode="recurrent")[0]
    ref = reference(**inputs, cu_seqlens=cu_seqlens)[0]
    assert max_error(got, ref) <= TOL[torch.float32]


@pytest.mark.parametrize("kind, dv, programs, splits",
                         [("scalar_decay", 16, 1, 1), ("scalar_decay", 16, 12, 2), ("linear_attention", 80, 1, 1)])
def test_heads_sharing_keys_sum_their_dq_dk_in_the_kernel(kernels, monkeypatch, kind, dv, programs, splits):
    # Mamba-2's shape: 6 value heads share one key head. Where chunks x key heads x splits reach GROUP_PROGRAMS, a
    # program takes 6 / splits heads and writes their dq and dk summed (no [T, 6, K] per-head copies): 6 chunks here,
    # so 1 program a chunk when any count will do, 2 (3 heads each, the host adding the two) for 12. No gate and
    # values over one 64-wide tile take the group's other branches.
    monkeypatch.setattr(kernels.chunk_o, "GROUP_PROGRAMS", programs)
    assert kernels.chunk_o.head_splits(6, 6) == splits
    inputs = make_inputs(kind, 2, 37, 6, 16, dv, seed=4)
    inputs["q"], inputs["k"] = inputs["q"][:, :, :1].contiguous(), inputs["k"][:, :, :1].contiguous()
    made = []
    original = kernels.chunk_o.empty
    monkeypatch.setattr(kernels.chunk_o, "empty", lambda shape, *a: made.append(tuple(shape)) or original(shape, *a))
    check(kernels, inputs, TOL[torch.float32], chunk_size=16)
    tokens = 2 * 37
    # dq's and dk's buffers per split; per head only o (forward) and dv, where the per-head path also made dq and dk
    assert made.count((splits, 1, tokens, 1, 16)) == 2 and made.count((1, tokens, 6, dv)) == 2, made


def test_shared_keys_refused_with_per_key_decay(kernels):
    inputs = make_inputs("gla", 1, 8, 4, 16, 16)
    inputs["q"], inputs["k"] = inputs["q"][:, :, :2], inputs["k"][:, :, :2]
    assert "per-key decay or the delta rule" in kernels.unsupported(**inputs)
    with pytest.raises(ValueError, match="only under a scalar gate or none"):
        kernels.linear_recurrence_triton(**inputs)
