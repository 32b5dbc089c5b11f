"""mmeff.kernels.launch on the GPU: real kernels launched directly (a known key) give exactly what Triton's own
launch path gives, for plain and autotuned kernels, pointers off 16-byte alignment and a CUDA graph's capture.
Skipped without CUDA (conftest)."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
from kernel_cases import forward_backward, make_inputs  # noqa: E402

from mmeff import ops  # noqa: E402

# mmeff.kernels is imported by the tests, not at collection (tests/kernels/test_dispatch.py checks that the interpreter
# leaves no trace of it in a process that had not imported it).

pytestmark = pytest.mark.xdist_group("launch")


def _tritons_path(monkeypatch) -> None:
    """Every Launcher takes Triton's own launch path (JITFunction.run, Autotuner.run)."""
    from mmeff.kernels import launch

    monkeypatch.setattr(launch.Launcher, "__getitem__", lambda self, grid: self.fn[grid])


def _norm_step(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, z: torch.Tensor) -> list[torch.Tensor]:
    """A gated layer norm's output and the gradients of its input, weight, bias and gate."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, z)]
    y = ops.norm(leaves[0], leaves[1], leaves[2], 1e-6, "layer", groups=4, gate=leaves[3])
    y.float().square().sum().backward()
    return [y.detach(), *(t.grad for t in leaves)]


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "off-16-bytes"])
def test_direct_norm_launches_equal_tritons(monkeypatch, offset):
    g = torch.Generator(device="cuda").manual_seed(offset)
    base = torch.randn(4097 * 256 + offset, device="cuda", dtype=torch.bfloat16, generator=g)
    x = base[offset:].view(4097, 256)  # offset 1: two bytes past the allocation's alignment
    z = torch.randn(4097, 256, device="cuda", dtype=torch.bfloat16, generator=g)
    w, b = torch.randn(256, device="cuda", generator=g), torch.randn(256, device="cuda", generator=g)
    from mmeff.kernels import norm

    _norm_step(x, w, b, z)  # Triton's path compiles and the compiled kernels are kept
    assert norm._norm_fwd_kernel.compiled and norm._norm_bwd_kernel.compiled
    direct = _norm_step(x, w, b, z)
    with monkeypatch.context() as m:
        _tritons_path(m)
        theirs = _norm_step(x, w, b, z)
    assert all(torch.equal(a, t) for a, t in zip(direct, theirs))


@pytest.mark.parametrize("kind", ["gla", "gated_delta_rule"])
def test_direct_autotuned_recurrence_launches_equal_tritons(kernels, monkeypatch, kind):
    inputs = make_inputs(kind, 2, 1000, 4, 64, 64, dtype=torch.bfloat16, device="cuda", seed=3)
    run = partial(forward_backward, kernels.linear_recurrence_triton, inputs)
    run()
    direct = run()
    with monkeypatch.context() as m:
        _tritons_path(m)
        theirs = run()
    assert torch.equal(direct[0], theirs[0]) and torch.equal(direct[1], theirs[1])
    assert all(torch.equal(direct[2][n], theirs[2][n]) for n in theirs[2])
    from mmeff.kernels import chunk_h

    assert chunk_h._fwd_h_kernel.compiled and chunk_h._fwd_h_kernel.direct


def test_direct_launches_replay_in_a_cuda_graph():
    x = torch.randn(512, 384, device="cuda", dtype=torch.bfloat16)
    w, b = torch.randn(384, device="cuda"), torch.randn(384, device="cuda")
    eager = ops.norm(x, w, b)  # compiles; the capture below launches directly on the capture stream
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.norm(x, w, b)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.norm(x, w, b)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(captured, ops.norm(x, w, b)) and not torch.equal(captured, eager)
