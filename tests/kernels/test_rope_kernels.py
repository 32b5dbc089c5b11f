"""The rotary-embedding kernel (mmeff.kernels.rope, through mmeff.ops.apply_rope with a faked GPU) under the Triton
interpreter against the reference (backend "torch"): output and the gradient of x, for contiguous and strided x,
angles shared over the batch or per sample, output dtype given or not.

Tolerance: max |kernel - reference| <= 1e-6 * max(1, max |reference|) for an fp32 output (measured: equal); a
16-bit output within one ulp of the reference's (2^-7 relative for bf16, plus 1e-6 absolute): the interpreter casts
fp32 to bf16 by truncation, half the elements one ulp off the reference's rounding to nearest.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from mmeff.ops import dispatch
from mmeff.ops.dispatch import BackendUnavailable
from mmeff.ops.rope import apply_rope, rope_angles

B, T, H, D = 3, 7, 5, 12  # H * D/2 = 30 pairs: a masked pair tile; B * T = 21 rows: a masked row tile


@pytest.fixture
def fake_gpu(kernels, monkeypatch):
    monkeypatch.setattr(dispatch, "on_cuda", lambda x: True)
    monkeypatch.setattr(importlib.import_module("mmeff.kernels.utils"), "POISON", True)


# How x [B, T, H, D] sits in its source tensor (which gets the gradient): as it is, a slice of a fused qkv stream
# (strided in T and H), its B and T dims swapped (a permuted view), heads outermost.
LAYOUTS = {
    "contiguous": ((B, T, H, D), lambda s: s),
    "qkv_slice": ((B, T, 3 * H * D), lambda s: s[..., H * D : 2 * H * D].unflatten(-1, (H, D))),
    "permuted": ((T, B, H, D), lambda s: s.transpose(0, 1)),
    "heads_outer": ((H, B, T, D), lambda s: s.permute(1, 2, 0, 3)),
}
TOL = {torch.float32: (1e-6, 0.0), torch.bfloat16: (2**-7, 1e-6), torch.float16: (2**-10, 1e-6)}


def _angles(per_sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(B * T).view(B, T) * 3 if per_sample else torch.arange(5, 5 + T)
    return rope_angles(positions, D)


def _run(backend: str, source: torch.Tensor, view, cos, sin, dtype):
    leaf = source.detach().clone().requires_grad_()
    y = apply_rope(view(leaf), cos, sin, dtype, backend=backend)
    dy = torch.linspace(-2, 2, y.numel()).view(y.shape).to(y.dtype)
    y.backward(dy)
    return y, leaf.grad


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    rtol, atol = TOL[want.dtype]
    got, want = got.float(), want.float()
    if rtol == 1e-6:
        assert (got - want).abs().max() <= rtol * max(1.0, want.abs().max().item())
    else:
        assert ((got - want).abs() <= rtol * want.abs() + atol).all()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared_angles", "per_sample_angles"])
@pytest.mark.parametrize(
    "dtype,out_dtype",
    [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
     (torch.float16, torch.float16)],
    ids=["fp32", "bf16", "bf16-to-fp32", "fp32-to-bf16", "fp16"],
)  # fmt: skip
def test_rope_matches_reference(fake_gpu, layout, per_sample, dtype, out_dtype):
    shape, view = LAYOUTS[layout]
    source = (torch.randn(*shape, generator=torch.Generator().manual_seed(len(layout))) * 3).to(dtype)
    cos, sin = _angles(per_sample)
    y, dx = _run("triton", source, view, cos, sin, out_dtype)
    y_ref, dx_ref = _run("torch", source, view, cos, sin, out_dtype)
    assert y.is_contiguous() and y.dtype == (out_dtype or dtype)
    _close(y, y_ref)
    _close(dx, dx_ref)


def test_rope_wide_rows(fake_gpu):
    # 66 heads of 64: more pairs than one program's tile, so each row is split over two programs.
    x = torch.randn(1, 3, 66, 64, generator=torch.Generator().manual_seed(0))
    cos, sin = rope_angles(torch.arange(3), 64)
    _close(*(_run(backend, x, lambda s: s, cos, sin, None)[0] for backend in ("triton", "torch")))


def test_compiled_rope_runs_the_kernel_as_its_custom_op(fake_gpu):
    # While torch.compile traces, the rotation is the custom op mmeff::rope (the kernel each way), not the reference
    # that Inductor fused with the angles' pow, cos and sin made again for every element (13.9 of the compiled attn
    # LM's 61.5 GPU ms a step on an H100). One graph; output and x's gradient as the reference's (bf16, one ulp).
    from torch._dynamo.testing import CompileCounterWithBackend

    def rotate(x: torch.Tensor) -> torch.Tensor:
        cos, sin = rope_angles(torch.arange(T), D)
        return apply_rope(x, cos, sin)

    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(rotate, backend=counter, fullgraph=True)
    source = (torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16)
    results = []
    for run in (compiled, lambda x: apply_rope(x, *rope_angles(torch.arange(T), D), backend="torch")):
        leaf = source.clone().requires_grad_()
        y = run(leaf)
        y.backward(torch.linspace(-2, 2, y.numel()).view(y.shape).to(y.dtype))
        results.append((y, leaf.grad))
    assert counter.frame_count == 1
    ops = {str(node.target) for graph in counter.graphs for node in graph.graph.nodes if node.op == "call_function"}
    assert "mmeff.rope.default" in ops, ops
    for got, want in zip(*results):
        _close(got, want)


def test_exported_rope_takes_the_reference(fake_gpu, monkeypatch):
    # torch.export (mmeff export: .pt2 or ONNX) gets the plain ops, not the custom op, which ONNX cannot lower.
    from mmeff.ops import dispatch as dispatch_module

    monkeypatch.setattr(torch.compiler, "_is_exporting_flag", True, raising=False)
    assert dispatch_module.exporting()
    with pytest.raises(BackendUnavailable, match="torch.export"):
        apply_rope(torch.randn(B, T, H, D), *_angles(False), backend="triton")


def test_angles_with_a_gradient_take_the_reference(fake_gpu):
    x = torch.randn(B, T, H, D)
    cos, sin = _angles(False)
    cos.requires_grad_()
    with pytest.raises(BackendUnavailable, match="the angles need a gradient"):
        apply_rope(x, cos, sin, backend="triton")
    apply_rope(x, cos, sin).sum().backward()
    assert cos.grad is not None


@pytest.mark.parametrize(
    "x_shape,angle_shape,angle_dtype,why",
    [
        ((B, T, H, D), (T - 1, D // 2), torch.float32, "is not [T, D/2] or [B, T, D/2]"),
        ((B, T, H, D), (2, T, D // 2), torch.float32, "is not [T, D/2] or [B, T, D/2]"),
        ((B, T, H, D), (T, D // 2), torch.float64, "not float32"),
        ((B, T, H, D + 1), (T, D // 2), torch.float32, "with D even"),
        ((T, H, D), (T, D // 2), torch.float32, "is not [B, T, H, D]"),
    ],
)
def test_kernel_conditions(kernels, x_shape, angle_shape, angle_dtype, why):
    angles = torch.zeros(angle_shape, dtype=angle_dtype)
    assert why in importlib.import_module("mmeff.kernels.rope").unsupported(torch.zeros(x_shape), angles, angles)
