"""Autotuning itself, at one size (the rest of the GPU suite runs the pinned configs, MMEFF_TRITON_PIN=1):
every kernel tunes over its whole config list, minus the builds Hopper miscompiles, and agrees with the pinned
run. The shape is GLA's 16 heads x K 32 x V 64 in bf16, where the 4-warp backward builds are wrong on an H100.
Skipped without CUDA (conftest).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
from kernel_cases import compare, forward_backward, make_inputs, norm_error  # noqa: E402

pytestmark = [pytest.mark.xdist_group("autotune"), pytest.mark.usefixtures("poison")]


@pytest.fixture
def unpinned(kernels):
    """Every autotuned kernel tunes over all its configs for the test, then is pinned again as before."""
    kernels.utils.pin_configs(False)
    yield kernels
    kernels.utils.pin_configs(kernels.utils.pinning_requested())


@pytest.mark.parametrize("kind", ["gla", "gated_delta_rule"])
def test_autotuned_matches_pinned(kernels, unpinned, kind):
    from mmeff.kernels import chunk_delta, chunk_o

    # The kernels whose 4-warp builds Hopper miscompiles: the GLA backward (16-bit) and both WY kernels.
    banned = [chunk_o._bwd_dqk_kernel] if kind == "gla" else [chunk_delta._wy_fwd_kernel, chunk_delta._wy_bwd_kernel]
    inputs = make_inputs(kind, 1, 8192, 16, 32, 64, dtype=torch.bfloat16, device="cuda", seed=3, gates="mixed")
    tuned = forward_backward(kernels.linear_recurrence_triton, inputs)
    chosen = {k.base_fn.__name__: k.best_config for k in banned}
    assert all(k.cache for k in banned), "the kernels were not tuned"
    assert all(c.num_warps != 4 for c in chosen.values()), chosen
    kernels.utils.pin_configs(True)
    pinned = forward_backward(kernels.linear_recurrence_triton, inputs)
    errors = compare(tuned, pinned, norm_error)
    assert all(e < 1e-2 for e in errors.values()), errors
