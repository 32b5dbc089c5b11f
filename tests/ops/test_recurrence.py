"""Chunked form vs the step-by-step recurrence for every op, plus properties of the shared core.

Tolerances (atol is relative to the reference tensor's max magnitude, floored at 1):
fp32 inputs: rtol 1e-4, atol 1e-5; bf16 inputs: rtol 2e-2, atol 2e-2. Gradients of parameters that are
shared over batch and time (A, dt_bias, delta_bias, retention's log_decay, D) sum thousands of terms of
both signs, so in fp32 they get rtol 1e-3, atol 1e-4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mmeff.ops import recurrence
from mmeff.ops import (
    delta_rule,
    gated_delta_rule,
    gated_linear_attention,
    linear_attention,
    linear_recurrence,
    retention,
    selective_scan,
    ssd,
)

TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 2e-2)}
SHARED_PARAM_TOL = {torch.float32: (1e-3, 1e-4), torch.bfloat16: (2e-2, 2e-2)}
BATCH, HEADS, DK, DV = 2, 2, 16, 16


def assert_close(actual: Tensor, expected: Tensor, rtol: float, atol: float, what: str = "") -> None:
    """assert_close with atol scaled by the reference magnitude."""
    expected = expected.float()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.float(), expected, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


@dataclass
class Case:
    """An op with random inputs: run(inputs, state, mode, chunk_size) -> (o, final_state)."""

    run: Callable[[Dict[str, Tensor], Tensor, str, int], Tuple[Tensor, Tensor]]
    inputs: Dict[str, Tensor]
    state: Tensor
    time_dims: Dict[str, int]


def _randn(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=gen)


def _linear_case(op: str, T: int, gen: torch.Generator) -> Case:
    q, k, v = _randn(gen, BATCH, T, HEADS, DK), _randn(gen, BATCH, T, HEADS, DK), _randn(gen, BATCH, T, HEADS, DV)
    inputs = {"q": q, "k": k, "v": v}
    if op in ("delta_rule", "gated_delta_rule"):
        inputs["k"] = F.normalize(k, dim=-1)
        inputs["beta"] = torch.sigmoid(_randn(gen, BATCH, T, HEADS))
    if op == "gated_linear_attention":
        inputs["log_g"] = F.logsigmoid(_randn(gen, BATCH, T, HEADS, DK))
    if op == "gated_delta_rule":
        inputs["log_g"] = F.logsigmoid(_randn(gen, BATCH, T, HEADS))
    if op == "retention":
        inputs["log_decay"] = F.logsigmoid(_randn(gen, HEADS) + 2)
    fn = {
        "linear_attention": linear_attention,
        "retention": retention,
        "gated_linear_attention": gated_linear_attention,
        "delta_rule": delta_rule,
        "gated_delta_rule": gated_delta_rule,
    }[op]

    def run(x: Dict[str, Tensor], state: Tensor, mode: str, chunk_size: int) -> Tuple[Tensor, Tensor]:
        return fn(**x, mode=mode, chunk_size=chunk_size, initial_state=state, output_final_state=True)

    time_dims = {name: 1 for name in inputs if name != "log_decay"}
    return Case(run, inputs, _randn(gen, BATCH, HEADS, DK, DV), time_dims)


def _ssd_case(T: int, gen: torch.Generator) -> Case:
    H, P, G, N = 4, 8, 2, 8
    inputs = {
        "x": _randn(gen, BATCH, T, H, P),
        "dt": _randn(gen, BATCH, T, H),
        "A": -torch.exp(torch.rand(H, generator=gen)),
        "B": _randn(gen, BATCH, T, G, N),
        "C": _randn(gen, BATCH, T, G, N),
        "D": _randn(gen, H),
        "z": _randn(gen, BATCH, T, H, P),
        "dt_bias": _randn(gen, H) * 0.5 - 1,
    }

    def run(x: Dict[str, Tensor], state: Tensor, mode: str, chunk_size: int) -> Tuple[Tensor, Tensor]:
        return ssd(
            **x, dt_softplus=True, chunk_size=chunk_size, initial_states=state, return_final_states=True, mode=mode
        )

    time_dims = {"x": 1, "dt": 1, "B": 1, "C": 1, "z": 1}
    return Case(run, inputs, _randn(gen, BATCH, H, P, N), time_dims)


def _selective_scan_case(T: int, gen: torch.Generator) -> Case:
    D, N, G = 4, 8, 2
    inputs = {
        "u": _randn(gen, BATCH, D, T),
        "delta": _randn(gen, BATCH, D, T),
        "A": -torch.exp(torch.rand(D, N, generator=gen)),
        "B": _randn(gen, BATCH, G, N, T),
        "C": _randn(gen, BATCH, N, T),
        "D": _randn(gen, D),
        "z": _randn(gen, BATCH, D, T),
        "delta_bias": _randn(gen, D) * 0.5 - 1,
    }

    def run(x: Dict[str, Tensor], state: Tensor, mode: str, chunk_size: int) -> Tuple[Tensor, Tensor]:
        return selective_scan(
            **x, delta_softplus=True, return_last_state=True, mode=mode, chunk_size=chunk_size, initial_state=state
        )

    time_dims = {"u": 2, "delta": 2, "B": 3, "C": 2, "z": 2}
    return Case(run, inputs, _randn(gen, BATCH, D, N), time_dims)


OPS = [
    "linear_attention",
    "retention",
    "gated_linear_attention",
    "delta_rule",
    "gated_delta_rule",
    "ssd",
    "selective_scan",
]


def make_case(op: str, T: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> Case:
    """Random inputs for `op`; batch-shaped tensors in `dtype`, parameters and state in fp32."""
    gen = torch.Generator().manual_seed(seed)
    if op == "ssd":
        case = _ssd_case(T, gen)
    elif op == "selective_scan":
        case = _selective_scan_case(T, gen)
    else:
        case = _linear_case(op, T, gen)
    case.inputs = {n: (t.to(dtype) if n in case.time_dims else t) for n, t in case.inputs.items()}
    return case


def _forward_backward(case: Case, mode: str, chunk_size: int) -> Tuple[Tensor, Tensor, Dict[str, Tensor]]:
    """Outputs, final state and gradients of every input (incl. the initial state) of a fixed random loss."""
    inputs = {n: t.detach().clone().requires_grad_() for n, t in case.inputs.items()}
    state = case.state.detach().clone().requires_grad_()
    o, final = case.run(inputs, state, mode, chunk_size)
    gen = torch.Generator().manual_seed(1)
    loss = (o.float() * torch.randn(o.shape, generator=gen)).sum()
    loss = loss + (final * torch.randn(final.shape, generator=gen)).sum()
    names = [*inputs, "initial_state"]
    grads = torch.autograd.grad(loss, [*inputs.values(), state])
    return o, final, dict(zip(names, grads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 17, 64, 200])
@pytest.mark.parametrize("op", OPS)
def test_chunk_matches_recurrent(op: str, T: int, dtype: torch.dtype) -> None:
    case = make_case(op, T, dtype)
    rtol, atol = TOL[dtype]
    o_ref, s_ref, g_ref = _forward_backward(case, "recurrent", 64)
    assert o_ref.dtype == dtype and s_ref.dtype == torch.float32
    for chunk_size in (16, 64):
        o, s, g = _forward_backward(case, "chunk", chunk_size)
        assert o.dtype == dtype and s.dtype == torch.float32
        assert_close(o, o_ref, rtol, atol, f"output (chunk {chunk_size})")
        assert_close(s, s_ref, rtol, atol, f"final state (chunk {chunk_size})")
        for name in g_ref:
            assert g[name].dtype == g_ref[name].dtype
            shared = name not in case.time_dims and name != "initial_state"
            g_rtol, g_atol = SHARED_PARAM_TOL[dtype] if shared else (rtol, atol)
            assert_close(g[name], g_ref[name], g_rtol, g_atol, f"grad {name} (chunk {chunk_size})")


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("op", OPS)
def test_state_carry(op: str, mode: str) -> None:
    T, split = 50, 23
    case = make_case(op, T)
    o_full, s_full = case.run(case.inputs, case.state, mode, 16)

    def part(start: int, length: int) -> Dict[str, Tensor]:
        dims = case.time_dims
        return {n: (t.narrow(dims[n], start, length) if n in dims else t) for n, t in case.inputs.items()}

    o_a, s_a = case.run(part(0, split), case.state, mode, 16)
    o_b, s_b = case.run(part(split, T - split), s_a, mode, 16)
    time_dim = 2 if op == "selective_scan" else 1
    rtol, atol = TOL[torch.float32]
    assert_close(torch.cat([o_a, o_b], dim=time_dim), o_full, rtol, atol, "output")
    assert_close(s_b, s_full, rtol, atol, "final state")


@pytest.mark.parametrize("dv", [DV, 1])
@pytest.mark.parametrize("delta", [False, True], ids=["additive", "delta"])
@pytest.mark.parametrize("decay", ["none", "scalar", "channel"])
@pytest.mark.parametrize("T", [17, 200])
def test_core_all_combinations(decay: str, delta: bool, T: int, dv: int) -> None:
    # Includes per-channel decay with the delta rule (S_t = (I - b k k^T) diag(exp g_t) S_{t-1} + b k v^T),
    # which no wrapper exposes, and value width 1 (the stepped intra-chunk path for per-channel decay);
    # strong decays (log g down to about -20 per step) check stability.
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(BATCH, T, HEADS, d, generator=gen) for d in (DK, DK, dv))
    k = F.normalize(k, dim=-1)
    decay_shape = {"none": None, "scalar": (BATCH, T, HEADS), "channel": (BATCH, T, HEADS, DK)}[decay]
    log_decay = None if decay_shape is None else F.logsigmoid(4 * torch.randn(*decay_shape, generator=gen))
    beta = torch.sigmoid(torch.randn(BATCH, T, HEADS, generator=gen)) if delta else None
    s0 = torch.randn(BATCH, HEADS, DK, dv, generator=gen)

    def run(mode: str, chunk_size: int) -> Tuple[Tensor, Tensor, Tuple[Tensor, ...]]:
        leaves = [t.clone().requires_grad_() for t in (q, k, v, s0)]
        if log_decay is not None:
            leaves.append(log_decay.clone().requires_grad_())
        o, s = linear_recurrence(
            *leaves[:3],
            leaves[4] if log_decay is not None else None,
            beta,
            scale=DK**-0.5,
            initial_state=leaves[3],
            output_final_state=True,
            mode=mode,
            chunk_size=chunk_size,
        )
        grads = torch.autograd.grad((o * o).sum() + s.sum(), leaves)
        return o, s, grads

    o_ref, s_ref, g_ref = run("recurrent", 64)
    rtol, atol = TOL[torch.float32]
    for chunk_size in (16, 32, 64, 48):
        o, s, grads = run("chunk", chunk_size)
        for a, b in zip((o, s, *grads), (o_ref, s_ref, *g_ref)):
            assert torch.isfinite(a).all()
            assert_close(a, b, rtol, atol, f"chunk {chunk_size}")


def test_core_options_and_errors() -> None:
    q = torch.randn(1, 5, 2, 4, dtype=torch.bfloat16)
    o, s = linear_recurrence(q, q, q)
    assert o.dtype == torch.bfloat16 and o.shape == q.shape and s is None
    with pytest.raises(ValueError, match="mode"):
        linear_recurrence(q, q, q, mode="parallel")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="log_decay"):
        linear_recurrence(q, q, q, log_decay=torch.zeros(1, 5, 2, 3))
    with pytest.raises(ValueError, match="beta"):
        linear_recurrence(q, q, q, beta=torch.zeros(1, 5, 2, 1))


@pytest.mark.parametrize("delta", [False, True], ids=["additive", "delta"])
@pytest.mark.parametrize("decay", ["none", "scalar", "channel"])
def test_keys_shared_by_groups_of_heads(decay: str, delta: bool) -> None:
    # q and k with 2 heads for v's 6: heads 0-2 read key head 0, heads 3-5 key head 1, as if repeated per head; their
    # gradients are the sums over each group's heads.
    gen = torch.Generator().manual_seed(4)
    q, k = (torch.randn(1, 20, 2, DK, generator=gen) for _ in range(2))
    v = torch.randn(1, 20, 6, DV, generator=gen)
    decay_shape = {"none": None, "scalar": (1, 20, 6), "channel": (1, 20, 6, DK)}[decay]
    log_decay = None if decay_shape is None else F.logsigmoid(torch.randn(*decay_shape, generator=gen))
    beta = torch.sigmoid(torch.randn(1, 20, 6, generator=gen)) if delta else None

    def run(shared: bool) -> Tuple[Tensor, ...]:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        qk = leaves[:2] if shared else [t.repeat_interleave(3, dim=2) for t in leaves[:2]]
        o, _ = linear_recurrence(*qk, leaves[2], log_decay, beta, chunk_size=8)
        return (o, *torch.autograd.grad((o * o).sum(), leaves))

    for a, b in zip(run(True), run(False)):
        assert_close(a, b, *TOL[torch.float32], "shared keys")
    with pytest.raises(ValueError, match="their heads dividing v's"):
        linear_recurrence(q, k, v[:, :, :5])


@pytest.mark.parametrize("size", [64, 48])
@pytest.mark.parametrize("keys", ["random", "alike", "equal"])
def test_unit_lower_inverse_solves_like_solve_triangular(keys: str, size: int) -> None:
    # The export-time inverse of the delta rule's (I + M), M_ts = beta_t <k_t, k_s> exp(b_t - b_s) (s < t), on the
    # mixers' inputs: L2-normalised keys (random, sharing a direction as trained keys do, or all equal: the case where
    # the nilpotent series (I + N)(I + N^2)... fails: 26 and 1e10 off at size 64), sigmoid betas (1 for equal keys),
    # gated decays. Measured max |error| vs float64 (solutions up to 6.4): 3.5e-7 / 3.8e-7 / 1.1e-6 (size 64),
    # fp32 solve_triangular 3.1e-7 / 1.0e-6 / 2.7e-6.
    gen = torch.Generator().manual_seed(0)
    shape = (2, 2, 4, size)
    k = torch.randn(*shape, DK, generator=gen)
    k = F.normalize({"random": k, "alike": k + 3 * torch.randn(DK, generator=gen), "equal": torch.ones_like(k)}[keys], dim=-1)
    beta = torch.ones(*shape, 1) if keys == "equal" else torch.sigmoid(torch.randn(*shape, 1, generator=gen))
    b = (F.logsigmoid(torch.randn(*shape, 1, generator=gen)) / 16).cumsum(-2)
    m = beta * recurrence._decayed_scores(k, k, b, strict=True)
    rhs = torch.randn(*shape, 2 * DK, generator=gen)
    exact = torch.linalg.solve_triangular(m.double(), rhs.double(), upper=False, unitriangular=True)
    assert (recurrence.unit_lower_inverse(m) @ rhs - exact).abs().max() < 5e-6
