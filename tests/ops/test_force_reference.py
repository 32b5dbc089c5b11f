"""MMEFF_FORCE_REFERENCE=1 keeps every op and mixer family off every fast path; without it the dispatcher takes them.

A fake GPU (mmeff.ops.dispatch.on_cuda true for every tensor, a Hopper capability) makes every fast path
eligible on this CPU machine, and every fast entry point raises `Reached`: mmeff's Triton kernels (recurrences,
short conv, MoE glue, norms, rotary embedding: all imported through dispatch.triton_kernels), mamba-ssm's loaders,
FlexAttention's compiled call and block masks, torch._grouped_mm, the router's fused half-precision logits. With the
switch set the ops and mixers run; without it, each op reaches its fast entry point.
"""

from __future__ import annotations

from typing import Callable, Dict

import pytest
import torch
import torch.nn.functional as F

from mmeff import blocks, ops
from mmeff.ops import dispatch, flex, grouped, masks, routing, ssm
from mmeff.ops.rope import rope_angles


class Reached(BaseException):
    """A fast entry point was called (a BaseException: no `except Exception` on the way swallows it)."""


def _entry(name: str) -> Callable:
    def reached(*args, **kwargs):
        raise Reached(name)

    return reached


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(dispatch, "on_cuda", lambda x: True)
    monkeypatch.setattr(dispatch, "capability", lambda x: (9, 0))
    monkeypatch.setattr(dispatch, "triton_kernels", _entry("triton"))
    monkeypatch.setattr(ssm, "_load_mamba_ssd", _entry("mamba_ssm"))
    monkeypatch.setattr(ssm, "_load_mamba_selective_scan", _entry("mamba_ssm"))
    monkeypatch.setattr(flex, "flex", _entry("flex"))
    monkeypatch.setattr(flex, "block_mask", _entry("flex"))
    monkeypatch.setattr(flex, "flex_attention", _entry("flex"))
    monkeypatch.setattr(torch, "_grouped_mm", _entry("grouped_mm"), raising=False)
    monkeypatch.setattr(routing._HalfLogits, "apply", _entry("router_logits"))


def _randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))).to(dtype)


def _op_calls() -> Dict[str, tuple[str, Callable[[], object]]]:
    """Each op's call on eligible inputs and the fast entry point it takes without the switch."""
    q, v = _randn(1, 12, 2, 16), _randn(1, 12, 2, 8)
    g, beta = F.logsigmoid(_randn(1, 12, 2)), torch.rand(1, 12, 2)
    x, dt, A, bc = _randn(1, 12, 2, 4), _randn(1, 12, 2), -torch.rand(2), _randn(1, 12, 1, 8)
    u, scan_bc = _randn(1, 4, 12), _randn(1, 8, 12)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    hq, hk = _randn(1, 2, 200, 16), _randn(1, 2, 200, 16)
    docs = torch.zeros(1, 12, dtype=torch.long)
    rows, w_in, w_out = (_randn(*shape, dtype=torch.bfloat16) for shape in ((6, 16), (3, 16, 32), (3, 16, 16)))
    order, inv = grouped.sort_assignments(torch.tensor([[0, 1], [2, 0], [1, 2]]))
    counts = torch.tensor([2, 2, 2])
    return {
        "linear_recurrence": ("triton", lambda: ops.linear_recurrence(q, q, v, g, beta, cu_seqlens=cu)),
        "linear_recurrence_recurrent": ("triton", lambda: ops.linear_recurrence(q, q, v, g, mode="recurrent")),
        "gated_linear_attention": ("triton", lambda: ops.gated_linear_attention(q, q, v, F.logsigmoid(q))),
        "gated_delta_rule": ("triton", lambda: ops.gated_delta_rule(q, q, v, g, beta)),
        "ssd": ("triton", lambda: ops.ssd(x, dt, A, bc, bc)),
        "ssd_packed": ("triton", lambda: ops.ssd(x, dt, A, bc, bc, cu_seqlens=cu)),
        "selective_scan": ("mamba_ssm", lambda: ops.selective_scan(u, u, -torch.rand(4, 8), scan_bc, scan_bc)),
        "causal_conv1d": ("triton", lambda: ops.causal_conv1d(x.flatten(2), _randn(8, 4))),
        "causal_conv1d_docs": ("triton", lambda: ops.causal_conv1d(x.flatten(2), _randn(8, 4), docs=docs)),
        "attention": ("flex", lambda: flex.attention(hq, hk, hk, masks.sliding_window(64))),
        "expert_ffn": ("grouped_mm", lambda: grouped.expert_ffn(rows, counts, w_in, w_out, gated=True)),
        "moe_dispatch": ("triton", lambda: grouped.dispatch(rows[:3], order, inv, 2)),
        "moe_combine": ("triton", lambda: grouped.combine(rows, order, inv, torch.rand(3, 2))),
        "moe_swiglu": ("triton", lambda: grouped.activate(_randn(6, 32), gated=True)),
        "router_logits": ("router_logits", lambda: routing.router_logits(rows, w_in[0].t().contiguous())),
        "norm": ("triton", lambda: ops.norm(rows, None, kind="rms")),
        "norm_grouped": ("triton", lambda: ops.norm(rows, _randn(16), _randn(16), groups=2)),
        "rope": ("triton", lambda: ops.apply_rope(q, *rope_angles(torch.arange(12), 16), torch.bfloat16)),
    }


@pytest.mark.parametrize("op", list(_op_calls()))
def test_ops_reach_their_fast_path_unless_forced(fake_gpu, monkeypatch, op):
    entry, call = _op_calls()[op]
    monkeypatch.delenv("MMEFF_FORCE_REFERENCE", raising=False)
    with pytest.raises(Reached, match=entry):
        call()
    monkeypatch.setenv("MMEFF_FORCE_REFERENCE", "1")
    call()


def test_ssd_takes_triton_without_mamba_ssm(fake_gpu, monkeypatch):
    # "auto" takes mmeff's kernels, mamba-ssm missing or not; mamba-ssm cannot take what its kernels lack.
    monkeypatch.setattr(ssm, "_load_mamba_ssd", lambda: None)
    monkeypatch.setattr(ssm, "_load_mamba_selective_scan", lambda: None)
    x, dt, A, bc = _randn(1, 12, 2, 4), _randn(1, 12, 2), -torch.rand(2), _randn(1, 12, 1, 8)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    with pytest.raises(Reached, match="triton"):
        ops.ssd(x, dt, A, bc, bc)
    with pytest.raises(RuntimeError, match="mamba-ssm not importable"):
        ops.ssd(x, dt, A, bc, bc, backend="mamba_ssm")
    with pytest.raises(RuntimeError, match="packed sequences with initial states"):
        ops.ssd(x, dt, A, bc, bc, cu_seqlens=cu, initial_states=_randn(2, 2, 4, 8), backend="mamba_ssm")
    u, scan_bc = _randn(1, 4, 12), _randn(1, 8, 12)
    with pytest.raises(RuntimeError, match="selective_scan_fn has no variable-length form"):
        ops.selective_scan(u, u, -torch.rand(4, 8), scan_bc, scan_bc, cu_seqlens=cu, backend="mamba_ssm")
    with pytest.raises(Reached, match="triton"):
        ops.selective_scan(u, u, -torch.rand(4, 8), scan_bc, scan_bc, cu_seqlens=cu)


def test_ssd_takes_triton_under_torch_compile(fake_gpu, monkeypatch):
    # mamba-ssm's autograd function is not traceable (its backward reads best_config); the custom op is.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x, dt, A, bc = _randn(1, 12, 2, 4), _randn(1, 12, 2), -torch.rand(2), _randn(1, 12, 1, 8)
    with pytest.raises(Reached, match="triton"):
        ops.ssd(x, dt, A, bc, bc)
    with pytest.raises(RuntimeError, match="mamba-ssm's backward is not traceable"):
        ops.ssd(x, dt, A, bc, bc, backend="mamba_ssm")


def test_choices_are_logged_once(fake_gpu, monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "_logged", set())
    monkeypatch.setenv("MMEFF_FORCE_REFERENCE", "1")
    x, weight = _randn(1, 12, 8), _randn(8, 4)
    with caplog.at_level("INFO", logger="mmeff.ops"):
        for _ in range(3):
            ops.causal_conv1d(x, weight)
            ops.causal_conv1d(x, weight, backend="triton")
    assert caplog.messages == [
        "causal_conv1d: torch (MMEFF_FORCE_REFERENCE=1)",
        "causal_conv1d: torch (MMEFF_FORCE_REFERENCE=1, overrides backend='triton')",
    ]


# Mixer families over every kind of fast path (dim 32, a few small options), bf16 where the grouped GEMM needs it.
FAMILIES = [
    ("gla", dict(heads=2, chunk_size=8), torch.float32),
    ("gated_deltanet", dict(heads=2, chunk_size=8), torch.float32),
    ("retnet", dict(heads=2), torch.float32),
    ("mamba", dict(d_state=4, chunk_size=8), torch.float32),
    ("mamba2", dict(d_state=8, head_dim=16, chunk_size=8), torch.float32),
    ("mamba2", dict(d_state=8, head_dim=16, chunk_size=8, backend="triton"), torch.float32),
    ("sliding", dict(heads=2, window=6), torch.float32),
    ("block_topk", dict(heads=2, block=4, topk=1), torch.float32),
    ("moe", dict(num_experts=4, top_k=2, hidden=32), torch.bfloat16),
]


@pytest.mark.parametrize("name,options,dtype", FAMILIES, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(FAMILIES)])
def test_mixers_run_forced_reference(fake_gpu, monkeypatch, name, options, dtype):
    torch.manual_seed(0)
    block = blocks.build(name, 32, **options).to(dtype)
    x = _randn(2, 20, 32, dtype=dtype).requires_grad_()
    monkeypatch.delenv("MMEFF_FORCE_REFERENCE", raising=False)
    with pytest.raises(Reached):
        block(x)
    monkeypatch.setenv("MMEFF_FORCE_REFERENCE", "1")
    out = block(x)
    out = out[0] if isinstance(out, tuple) else out
    out.float().sum().backward()
    assert torch.isfinite(x.grad.float()).all()


def test_backend_names_are_checked():
    q = _randn(1, 6, 2, 8)
    with pytest.raises(RuntimeError, match="linear_recurrence: backend='mamba_ssm' requested but linear_recurrence has no"):
        ops.gated_delta_rule(q, q, q, torch.zeros(1, 6, 2), torch.ones(1, 6, 2), backend="mamba_ssm")
    with pytest.raises(RuntimeError, match="causal_conv1d: backend='triton' requested but .*inputs not on CUDA"):
        ops.causal_conv1d(q.flatten(2), _randn(16, 4), backend="triton")
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'torch', 'triton', 'mamba_ssm', got 'cuda'"):
        ops.linear_attention(q, q, q, backend="cuda")  # type: ignore[arg-type]


def test_exporting_is_true_under_torch_export_only():
    # torch.compiler.is_exporting() reads True while torch.compile traces (torch 2.9): compiled models took the
    # export-only paths (a scan op over the chunks, whose backward Inductor failed on).
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(dispatch.exporting())
            return x + 1

    torch.compile(Probe(), backend="eager")(torch.ones(2))
    torch.export.export(Probe(), (torch.ones(2),))
    assert seen == [False, True] and not dispatch.exporting()
