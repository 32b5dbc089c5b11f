"""Dispatch and packed sequences around the kernels, on CPU: the reference's cu_seqlens support, Triton kept
out of CPU-only imports, and the interpreter fixture leaving no trace for the rest of the suite.

Tolerance of the reference comparisons: max |a - b| <= 1e-4 * max(1, max |b|) (fp32).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from kernel_cases import compare, forward_backward, interpreted_kernels, make_inputs, max_error

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
    assert [c.num_warps for c in _sm90_safe_configs(configs, bf16, GATE=KEY_GATE.value)] == [8, 2]
    assert _sm90_safe_configs(configs, fp32, GATE=KEY_GATE.value) == configs
    assert _sm90_safe_configs(configs, bf16, GATE=SCALAR_GATE.value) == configs


def test_wy_kernels_skip_miscompiled_configs():
    # 4-warp builds of both delta-rule WY kernels are wrong (or fail in ptxas) on an H100 (kernels_notes.md).
    from mmeff.kernels import chunk_delta

    for kernel in (chunk_delta._wy_fwd_kernel, chunk_delta._wy_bwd_kernel):
        assert kernel.configs and all(c.num_warps != 4 for c in kernel.configs)
