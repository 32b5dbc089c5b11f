"""Packed documents through the ops' fast backends on the GPU against the PyTorch path: mamba-ssm's SSD (seq_idx,
varlen final states) and mmeff's kernels for ssd, selective_scan and the short conv with `docs`.

Error: ||fast - reference|| / ||reference|| < 1e-2 (bf16 inputs; the reference runs in fp32 on them).
"""

from __future__ import annotations

import pytest
import torch

from mmeff import ops
from mmeff.ops import ssm

LENGTHS = [700, 1, 1500, 64, 2000 - 765]
CU = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def _run(fn, backend: str, inputs: dict, grad: bool):
    leaves = {n: t.detach().clone().requires_grad_(grad and t.is_floating_point()) for n, t in inputs.items()}
    outs = fn(backend=backend, **leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if not grad:
        return list(outs)
    gen = torch.Generator(device="cuda").manual_seed(1)
    sum((o.float() * torch.randn(o.shape, device="cuda", generator=gen)).sum() for o in outs).backward()
    return list(outs) + [t.grad for t in leaves.values() if t.requires_grad]


def _check(fn, fast: str, inputs: dict, grad: bool = True) -> None:
    got, ref = _run(fn, fast, inputs, grad), _run(fn, "torch", inputs, grad)
    errors = [_err(a, b) for a, b in zip(got, ref)]
    assert all(e < 1e-2 for e in errors), errors


def _ssd_inputs(initial: bool) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    T, H, P, G, N = int(CU[-1]), 8, 64, 1, 64

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", generator=gen).to(dtype)

    inputs = dict(x=randn(1, T, H, P), dt=randn(1, T, H, dtype=torch.float32), A=-torch.rand(H, device="cuda") - 0.5,
                  B=randn(1, T, G, N), C=randn(1, T, G, N), D=randn(H, dtype=torch.float32))  # fmt: skip
    if initial:
        inputs["initial_states"] = randn(len(LENGTHS), H, P, N, dtype=torch.float32)
    return inputs


@pytest.mark.parametrize("backend", ["triton", "mamba_ssm"])
def test_ssd_packed(backend):
    if backend == "mamba_ssm" and ssm._load_mamba_ssd() is None:
        pytest.skip("mamba-ssm's SSD not importable")
    cu = CU.cuda()
    # Training (gradients, no final states), then final states per sequence (no gradients for mamba-ssm).
    _check(lambda **kw: ops.ssd(**kw, dt_softplus=True, cu_seqlens=cu), backend, _ssd_inputs(backend == "triton"))
    _check(lambda **kw: ops.ssd(**kw, dt_softplus=True, cu_seqlens=cu, return_final_states=True), backend,
           _ssd_inputs(backend == "triton"), grad=backend == "triton")  # fmt: skip


def test_selective_scan_packed_triton():
    gen = torch.Generator(device="cuda").manual_seed(1)
    T, Dm, N = int(CU[-1]), 64, 16
    inputs = dict(
        u=torch.randn(1, Dm, T, device="cuda", generator=gen).bfloat16(),
        delta=torch.randn(1, Dm, T, device="cuda", generator=gen),
        A=-torch.rand(Dm, N, device="cuda", generator=gen) - 0.5,
        B=torch.randn(1, N, T, device="cuda", generator=gen).bfloat16(),
        C=torch.randn(1, N, T, device="cuda", generator=gen).bfloat16(),
        initial_state=torch.randn(len(LENGTHS), Dm, N, device="cuda", generator=gen),
    )
    cu = CU.cuda()
    _check(lambda **kw: ops.selective_scan(**kw, delta_softplus=True, cu_seqlens=cu, return_last_state=True),
           "triton", inputs)  # fmt: skip


def test_short_conv_docs_triton():
    gen = torch.Generator(device="cuda").manual_seed(2)
    docs = torch.zeros(4, 3000, dtype=torch.long, device="cuda")
    for row, cut in enumerate([63, 64, 65, 1500]):
        docs[row, cut:] = 1
        docs[row, cut + 1 :] = 2  # a one-token document after each cut
    inputs = dict(x=torch.randn(4, 3000, 1024, device="cuda", generator=gen).bfloat16(),
                  weight=torch.randn(1024, 4, device="cuda", generator=gen), bias=torch.randn(1024, device="cuda"))  # fmt: skip
    _check(lambda **kw: ops.causal_conv1d(**kw, docs=docs), "triton", inputs)
