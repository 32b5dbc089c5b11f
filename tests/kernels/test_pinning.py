"""Launch plumbing of mmeff.kernels on CPU: pinned autotune configs (MMEFF_TRITON_PIN), the chunk-layout cache
keys, and packed-sequence bounds that would send the kernels out of bounds. The pinned configs are what the
interpreter tests run (the first of each list), so their results are checked there.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

AUTOTUNED = 12  # chunk_h 2, chunk_o 3, chunk_gla 2, chunk_delta 2, conv 2, recurrent 1


@pytest.fixture
def utils():
    """The compiled (not interpreted) mmeff.kernels.utils, every autotuned kernel defined; pinning restored after."""
    from mmeff.kernels import chunk, conv, recurrent, utils  # noqa: F401 - importing defines the kernels

    yield utils
    utils.pin_configs(utils.pinning_requested())


def test_pin_configs_toggles_every_kernel(utils):
    assert len(utils._TUNED) == AUTOTUNED
    utils.pin_configs(False)
    assert [len(t.configs) for t, _ in utils._TUNED] == [len(c) for _, c in utils._TUNED]
    assert any(len(t.configs) > 1 for t, _ in utils._TUNED)
    utils.pin_configs(True)
    assert all(t.configs == c[:1] for t, c in utils._TUNED)


def test_pinned_configs_survive_the_hopper_prunes(utils):
    # A pinned kernel runs without its prune (Triton prunes only among several configs): its first config must
    # be one the prune keeps for every launch, i.e. no 4-warp GLA backward on 16-bit inputs (kernels_notes.md).
    for tuner, configs in utils._TUNED:
        if tuner.early_config_prune is None:
            continue
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for gate in (utils.NO_GATE, utils.SCALAR_GATE, utils.KEY_GATE):
                kept = tuner.early_config_prune(configs, {"q": torch.empty(1, dtype=dtype)}, GATE=gate.value)
                assert configs[0] in kept, (tuner.base_fn.__name__, dtype, gate)


def test_pin_env_at_import():
    code = (
        "from mmeff.kernels import chunk, conv, recurrent, utils\n"
        "assert all(len(t.configs) == 1 for t, _ in utils._TUNED), 'not pinned'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"MMEFF_TRITON_PIN": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_fixed_layouts_cached_per_shape_and_device(utils):
    cpu = torch.device("cpu")
    a = utils.make_chunks(None, 2, 100, 64, cpu)
    assert utils.make_chunks(None, 2, 100, 64, "cpu") is a
    b = utils.make_chunks(None, 2, 100, 32, cpu)
    assert b is not a and b.num_chunks == 8 and a.num_chunks == 4
    assert a.indices.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]] and a.cu_seqlens.tolist() == [0, 100, 200]
    assert utils.sm_count(cpu) == 0


@pytest.mark.parametrize(
    "bounds", [[0, 5, 12], [0, 5, 9], [1, 5, 10], [0, 7, 3, 10], []], ids=["past-end", "short", "start", "falling", "empty"]
)
def test_packed_bounds_checked(utils, bounds):
    # cu_seqlens must cover exactly the batch's 10 tokens: a bound past them made the kernels read and write
    # past the tensors (an illegal memory access on the GPU), one short of them left outputs unwritten.
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-d tensor rising from 0 to the 10 tokens"):
        utils.make_chunks(torch.tensor(bounds, dtype=torch.int32), 1, 10, 16, torch.device("cpu"))
    ok = utils.make_chunks(torch.tensor([0, 3, 3, 10], dtype=torch.int32), 1, 10, 16, torch.device("cpu"))
    assert (ok.num_seqs, ok.num_chunks, ok.max_len, ok.offsets.tolist()) == (3, 2, 7, [0, 1, 1])
