"""Autotuning itself, at one size (the rest of the GPU suite runs the pinned configs, MMEFF_TRITON_PIN=1):
every kernel tunes over its whole config list, minus the builds Hopper miscompiles, and agrees with the pinned
run. The shape is GLA's 16 heads x K 32 x V 64 in bf16, where the 4-warp backward builds are wrong on an H100
(both GLA paths: mixed gates).
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


def test_autotuned_matches_pinned(kernels, unpinned):
    # One shape only: tuning compiles every build of every kernel (the heaviest test of the suite per shape).
    from mmeff.kernels import chunk_o

    inputs = make_inputs("gla", 1, 4096, 16, 32, 64, dtype=torch.bfloat16, device="cuda", seed=3, gates="mixed")
    tuned = forward_backward(kernels.linear_recurrence_triton, inputs)
    kernel = chunk_o._bwd_dqk_kernel.fn  # the autotuner (its Launcher launches it)
    assert kernel.cache, "the GLA backward was not tuned"
    assert kernel.best_config.num_warps != 4, kernel.best_config  # the build Hopper miscompiles here
    kernels.utils.pin_configs(True)
    pinned = forward_backward(kernels.linear_recurrence_triton, inputs)
    errors = compare(tuned, pinned, norm_error)
    assert all(e < 1e-2 for e in errors.values()), errors
