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

AUTOTUNED = 16  # chunk_h 2, chunk_o 4, chunk_gla 2, chunk_delta 2, conv 3, conv2d 2, recurrent 1


@pytest.fixture
def utils():
    """The compiled (not interpreted) mmeff.kernels.utils, every autotuned kernel defined; pinning restored after."""
    from mmeff.kernels import chunk, conv, conv2d, recurrent, utils  # noqa: F401 - importing defines the kernels

    yield utils
    utils.pin_configs(utils.pinning_requested())


def _launch(dtype: torch.dtype, gate, K: int = 64, BV: int = 64, delta: bool = False) -> tuple[dict, dict]:
    """(named_args, constexprs) of a launch, as a prune sees them."""
    return {"q": torch.empty(1, dtype=dtype)}, {"GATE": gate.value, "DELTA": delta, "K": K, "BV": BV}


def _running(tuner, configs: list, launch: tuple[dict, dict]) -> list:
    """The configs `tuner` would run for `launch`."""
    if len(tuner.configs) == 1:
        return tuner.configs
    return tuner.early_config_prune(configs, launch[0], **launch[1])


def test_pin_configs_toggles_every_kernel(utils):
    assert len(utils._TUNED) == AUTOTUNED
    launch = _launch(torch.bfloat16, utils.SCALAR_GATE)
    utils.pin_configs(False)
    assert [len(t.configs) for t, _, _ in utils._TUNED] == [len(c) for _, c, _ in utils._TUNED]
    assert any(len(_running(t, c, launch)) > 1 for t, c, _ in utils._TUNED)
    utils.pin_configs(True)
    assert all(len(_running(t, c, launch)) == 1 for t, c, _ in utils._TUNED)


def test_switching_modes_forgets_earlier_choices(utils):
    # A kernel that prunes keeps all its configs, so Triton caches its (pinned) choice per launch key: tuning
    # afterwards must not reuse it, nor a pinned run a tuned choice.
    tuner, configs, _ = next(entry for entry in utils._TUNED if entry[2])
    tuner.cache[("some", "launch")] = configs[-1]
    utils.pin_configs(False)
    assert not tuner.cache
    tuner.cache[("some", "launch")] = configs[-1]
    utils.pin_configs(True)
    assert not tuner.cache


@pytest.mark.parametrize("pinned", [True, False])
def test_pinned_and_tuned_launches_skip_the_hopper_miscompiles(utils, pinned):
    # A pinned launch runs the first config its prune keeps; a tuned one chooses among those the prune keeps.
    from mmeff.kernels import chunk_o

    utils.pin_configs(pinned)
    tuner = chunk_o._bwd_dqk_kernel.fn  # the autotuner (its Launcher launches it)
    configs = next(c for t, c, _ in utils._TUNED if t is tuner)
    warps = lambda launch: {c.num_warps for c in _running(tuner, configs, launch)}  # noqa: E731
    assert 4 not in warps(_launch(torch.bfloat16, utils.KEY_GATE))  # GLA: 4 warps miscompile (K = 32)
    for gate in (utils.NO_GATE, utils.SCALAR_GATE):  # V <= 32 with K >= 128: 4 and 8 warps miscompile
        assert warps(_launch(torch.bfloat16, gate, K=128, BV=32)) == {2}
        assert warps(_launch(torch.bfloat16, gate, K=256, BV=32)) == {2}
        assert len(warps(_launch(torch.bfloat16, gate, K=64, BV=64))) == (1 if pinned else 3)
    assert len(warps(_launch(torch.float32, utils.KEY_GATE))) == (1 if pinned else 3)  # fp32 is exact everywhere
    assert warps(_launch(torch.bfloat16, utils.NO_GATE, K=128, BV=32, delta=True)) == ({8} if pinned else {8, 4, 2})


def test_pin_env_at_import():
    code = (
        "from mmeff.kernels import chunk, conv, recurrent, utils\n"
        "assert utils._PINNED[0] and all(len(t.configs) == 1 for t, _, prunes in utils._TUNED if not prunes), 'not pinned'\n"
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


def test_packed_layouts_cached_per_bounds_tensor(utils):
    # One layout per cu_seqlens tensor (every layer of a model gets the layout's one tensor), rebuilt after an
    # in-place write and for another chunk size; a new tensor with the same bounds builds its own.
    cpu = torch.device("cpu")
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    a = utils.make_chunks(cu, 1, 10, 4, cpu)
    assert utils.make_chunks(cu, 1, 10, 4, cpu) is a and a.num_chunks == 3
    assert utils.make_chunks(cu, 1, 10, 8, cpu).num_chunks == 2
    cu[1] = 5
    b = utils.make_chunks(cu, 1, 10, 4, cpu)
    assert b is not a and b.cu_seqlens.tolist() == [0, 5, 10] and b.num_chunks == 4
    assert utils.make_chunks(torch.tensor([0, 5, 10], dtype=torch.int32), 1, 10, 4, cpu) is not b
