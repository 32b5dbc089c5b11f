"""Every token mixer's whole block, and the MoE channel mixer, on the GPU against the same block with
MMEFF_FORCE_REFERENCE=1: bf16 autocast, forward and backward, at a realistic size (B = 2, T = 2048, dim = 512),
causal and bidirectional (the scan mixers' default `scan: bi` there), and causal over packed documents
(`Layout.docs`: the varlen kernels, the document masks). Skipped without CUDA (conftest).

Both runs use the same weights and input; the fast run must have reached the fast path the mixer is built
on (FlexAttention for the sparse mixers, mmeff's Triton kernels for the linear ones, torch._grouped_mm for the
MoE), and the reference run none of them. Error per tensor (the output, the input gradient, each parameter
gradient): ||fast - reference|| / ||reference|| < 3e-2 and max |fast - reference| / max |reference| < 6e-2.
Both runs are bf16 computations of the same function and differ by rounding: the reference itself in bf16
autocast against fp32 (CPU, B = 1, T = 512, dim = 256) is off by up to 1.3e-2 (norm) in outputs and most
gradients (ttt, deltanet), 1.9e-2 / 2.8e-2 (norm / max) in mamba2's dt_bias gradient (a sum over all tokens).
A kernel bug (a miscompiled build, an unwritten tile) is off by O(1).

A tensor past those tolerances is judged against the fp32 reference (no autocast): it passes if the fast run is
within ROUNDING times the bf16 reference's own error of it (and within 10x the tolerances of the bf16 reference):
the tensor is then ill-conditioned in bf16, not wrong, while a bug stays far past both. Packed documents make some
tensors so. The first token of a document has no past: o = (q.k) v, which RetNet's per-head LayerNorm makes
scale-invariant; where q.k is near zero (on CPU, T = 512, this layout: q.k/sqrt(K) = 6e-3 against a median of 0.23,
the norm's input std 3.5e-3 ~ sqrt(eps)) that token's input gradient is set by the rounding of q and k: the
reference alone, bf16 autocast against fp32, is off by 5.9e-2 / 0.17 in dx and 6.6e-2 / 0.19 in dqkv.weight, nearly
all of it at that one token (unpacked: 8.6e-3 / 1.0e-2). gated_deltanet's dA_log and dt_bias gradients, sums over
all tokens: 1.4e-2 / 1.7e-2 packed, 7.5e-3 unpacked; the fast run rounds more than that (its states and score tiles
are bf16): the reference's recurrence itself run in bf16 (a coarser stand-in for the kernels) moves them by 6.9e-2 /
8.9e-2 packed (2.2e-2 unpacked), 5x the reference's own error, hence ROUNDING (the H200: 3.6e-2 from the kernels).
The same stand-in moves retnet-packed's dx by 6.5e-3 only, not the H200's 5.1e-2: the kernels at those shapes and
documents are checked on their own, well conditioned, by test_kernels_gpu.py::test_packed_block_shapes.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterator

import pytest
import torch

import mmeff.blocks as blocks

BATCH, LENGTH, DIM = 2, 2048, 512
NORM_TOL, MAX_TOL = 3e-2, 6e-2
ROUNDING = 5  # a tensor past the tolerances may be this many times further from fp32 than the bf16 reference is
SPARSE = {"sliding", "longformer", "sink", "bigbird", "dilated", "block_topk"}
LINEAR = {"linear_attn", "retnet", "gla", "deltanet", "gated_deltanet", "ttt"}
# The fast path each mixer must reach on CUDA (mamba / mamba2 / hybrid_heads: mamba-ssm or Triton, either).
FAST = {**dict.fromkeys(SPARSE, "flex"), **dict.fromkeys(LINEAR, "triton")}
# Mixers also run over packed documents: the recurrences (varlen kernels) and two FlexAttention masks.
PACKED = LINEAR | {"mamba", "mamba2", "attn", "sliding"}
MIXERS = blocks.names("mixer")


@contextlib.contextmanager
def fast_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter]:
    """Count the calls of every fast entry point (FlexAttention, mmeff's Triton kernels, torch._grouped_mm)."""
    import mmeff.kernels
    import mmeff.kernels.conv
    import mmeff.kernels.conv2d
    import mmeff.kernels.moe
    import mmeff.kernels.noncausal
    import mmeff.ops.flex

    calls: Counter = Counter()
    with monkeypatch.context() as m:

        def spy(owner: object, name: str, label: str) -> None:
            original = getattr(owner, name)
            m.setattr(owner, name, lambda *a, **k: calls.update([label]) or original(*a, **k))

        spy(mmeff.ops.flex, "flex", "flex")
        spy(mmeff.kernels, "linear_recurrence_triton", "triton")
        spy(mmeff.kernels.conv.CausalConv, "apply", "triton_conv")
        spy(mmeff.kernels.noncausal, "forward", "triton_noncausal")
        spy(mmeff.kernels.conv2d, "grid_conv", "triton_grid_conv")
        for cls in ("Dispatch", "Combine", "SwiGLU"):
            spy(getattr(mmeff.kernels.moe, cls), "apply", "triton_moe")
        if hasattr(torch, "_grouped_mm"):
            spy(torch, "_grouped_mm", "grouped_mm")
        yield calls


def run_block(
    block: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, bf16: bool = True, **kwargs
) -> dict[str, torch.Tensor]:
    """Output, input gradient and parameter gradients of one forward and backward, in bf16 autocast or fp32."""
    block.zero_grad(set_to_none=True)
    leaf = x.detach().clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        out = block(leaf, **kwargs)
    out.float().backward(grad)
    found = {"out": out.detach().float(), "dx": leaf.grad}
    found |= {f"d{n}": p.grad.float() for n, p in block.named_parameters() if p.grad is not None}
    return found


def errors(fast: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """(norm-relative, max-relative) error of every tensor; a tensor only one run has counts as failed."""
    assert fast.keys() == ref.keys(), f"gradients differ in which parameters they reach: {fast.keys() ^ ref.keys()}"
    out = {}
    for name, a in fast.items():
        b = ref[name]
        diff = (a - b).float()
        out[name] = ((diff.norm() / b.norm().clamp(min=1e-30)).item(), (diff.abs().max() / b.abs().max().clamp(min=1e-30)).item())
    return out


def compare(monkeypatch, block, expect: str | None, **kwargs) -> None:
    """Run block fast and with MMEFF_FORCE_REFERENCE=1; check the fast path ran and the results agree."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(BATCH, LENGTH, DIM, device="cuda", generator=gen)
    grad = torch.randn(BATCH, LENGTH, DIM, device="cuda", generator=gen)
    with fast_calls(monkeypatch) as calls:
        fast = run_block(block, x, grad, **kwargs)
        fast_calls_seen = dict(calls)
        calls.clear()
        with monkeypatch.context() as m:
            m.setenv("MMEFF_FORCE_REFERENCE", "1")
            ref = run_block(block, x, grad, **kwargs)
    assert not calls, f"MMEFF_FORCE_REFERENCE=1 still ran fast paths: {dict(calls)}"
    if expect is not None:
        assert fast_calls_seen.get(expect), f"the fast run did not reach {expect} (calls: {fast_calls_seen})"
    assert all(t.isfinite().all() for t in fast.values()), "non-finite values in the fast run"
    found = errors(fast, ref)
    bad = {n: e for n, e in found.items() if e[0] >= NORM_TOL or e[1] >= MAX_TOL}
    if bad:  # rounding of an ill-conditioned tensor, or a bug? Both runs against the fp32 reference.
        with monkeypatch.context() as m:
            m.setenv("MMEFF_FORCE_REFERENCE", "1")
            m.setattr(torch.backends.cudnn, "allow_tf32", False)  # on by default: the short convs would run in TF32
            exact = run_block(block, x, grad, bf16=False, **kwargs)
        own, off = errors(ref, exact), errors(fast, exact)
        bad = {
            n: {"vs bf16 ref": e, "vs fp32 ref": off[n], "bf16 ref vs fp32 ref": own[n]}
            for n, e in bad.items()
            if not all(o <= ROUNDING * r and f < 10 * t for o, r, f, t in zip(off[n], own[n], e, (NORM_TOL, MAX_TOL)))
        }
    worst = max(found.items(), key=lambda kv: kv[1][0])
    assert not bad, f"(norm, max) errors past ({NORM_TOL}, {MAX_TOL}), not bf16 rounding: {bad}; worst overall {worst}"


def build(name: str, dim: int, **options) -> torch.nn.Module:
    """The block on CUDA with seeded weights; a mixer without that form (sink is causal only) is skipped."""
    torch.manual_seed(0)
    try:
        return blocks.build(name, dim, **options).cuda()
    except Exception as e:  # ConfigError wraps the block's ValueError
        if options.get("causal") is False:
            pytest.skip(f"{name} has no bidirectional form: {e}")
        raise


def mixer_params(forms: list[str]):
    return pytest.mark.parametrize(
        "name,form",
        [pytest.param(n, f, id=f"{n}-{f}", marks=pytest.mark.xdist_group(f"block-{n}")) for n in MIXERS for f in forms
         if f != "packed" or n in PACKED],
    )  # fmt: skip


@mixer_params(["causal", "bidirectional", "packed"])
def test_mixer_block(monkeypatch, name, form):
    block = build(name, DIM, causal=form != "bidirectional")
    kwargs = {}
    if form == "packed":
        from mmeff.blocks.layout import Layout

        # Row 0: documents of 707, 1 and 1340 tokens; row 1: 2047 and 1 (boundaries off the 64-token chunks).
        first = LENGTH * 11 // 32 + 3
        docs = torch.tensor([[0] * first + [1] + [2] * (LENGTH - first - 1), [0] * (LENGTH - 1) + [1]], device="cuda")
        kwargs["layout"] = Layout(docs=docs)
    compare(monkeypatch, block, FAST.get(name) if form != "packed" or name in LINEAR else None, **kwargs)


@pytest.mark.xdist_group("block-linear_attn")
@pytest.mark.parametrize("local_conv", [0, 3])
def test_global_linear_attention_block(monkeypatch, local_conv):
    # scan: global (the fused non-causal kernels, elu+1 features, normalised) over a 32 x 64 grid of 2048 tokens, with
    # and without the grid conv of v (local_conv: mmeff.kernels.conv2d), against the GEMMs and F.conv2d.
    from mmeff.blocks.layout import Layout

    block = build("linear_attn", DIM, causal=False, scan="global", local_conv=local_conv)
    layout = Layout(grid=(1, 32, LENGTH // 32))
    compare(monkeypatch, block, "triton_noncausal" if not local_conv else "triton_grid_conv", layout=layout)


@pytest.mark.xdist_group("block-moe")
@pytest.mark.parametrize("experts,top_k", [(8, 2), (16, 1)])
def test_moe_block(monkeypatch, experts, top_k):
    # The dropless MoE FFN: grouped GEMMs (torch._grouped_mm on Hopper in bf16) and the Triton glue.
    # top_k 1 routes Switch-style (renormalize off): renormalised, every weight is 1 and the router's gradient is
    # only the balancing loss's, near zero, so its relative error measured noise (117% on the H200).
    block = build("moe", DIM, num_experts=experts, top_k=top_k, hidden=704, renormalize=top_k > 1)
    with torch.no_grad():  # clear routing decisions: float rounding must not flip a token's expert
        block.router.weight.mul_(100)
    expect = "grouped_mm" if torch.cuda.get_device_capability()[0] == 9 else "triton_moe"
    compare(monkeypatch, block, expect)


@pytest.mark.xdist_group("compiled")
@pytest.mark.parametrize("name", ["gla", "gated_deltanet", "linear_attn-global", "mamba2", "retnet", "attn"])
def test_compiled_bidirectional_block(name):
    # torch.compile(fullgraph=True, Inductor) of the bidirectional block on the fast path: the recurrence as mmeff's
    # custom op (its backward runs the kernels' backward passes on the inputs), the route gathers as autograd
    # functions, the short conv's kernels as a custom op. Against the eager fast block: the same function rounded in other
    # places, so the tolerances above.
    # linear_attn-global: the fused non-causal kernels and the grid conv, custom ops both; mamba2: its short conv
    # (custom op under compile) and the SSD kernels; retnet and attn: the rotary embedding's kernel (custom op under
    # compile).
    from mmeff.blocks.layout import Layout

    name, _, scan = name.partition("-")
    options = {"scan": scan, "local_conv": 3} if scan else {}
    kwargs = {"layout": Layout(grid=(1, 32, LENGTH // 32))} if scan else {}
    block = build(name, DIM, causal=False, **options)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(BATCH, LENGTH, DIM, device="cuda", generator=gen)
    grad = torch.randn(BATCH, LENGTH, DIM, device="cuda", generator=gen)
    eager = run_block(block, x, grad, **kwargs)
    torch._dynamo.reset()
    compiled = run_block(torch.compile(block, fullgraph=True), x, grad, **kwargs)
    compiled = {n.replace("_orig_mod.", ""): t for n, t in compiled.items()}
    found = errors(compiled, eager)
    bad = {n: e for n, e in found.items() if e[0] >= NORM_TOL or e[1] >= MAX_TOL}
    assert not bad, f"compiled vs eager (norm, max) errors past ({NORM_TOL}, {MAX_TOL}): {bad}"
