"""What every GPU test shares: CUDA or a clean skip, pinned Triton configs, one on-disk compile cache, a device
sync after each test, and xdist groups that keep the tests of one set of kernels on one worker.

Compile time dominates this suite (a sequential run once got through 4 tests in 520 s, autotuning). So:
- MMEFF_TRITON_PIN=1: every autotuned kernel runs one known-good config (mmeff.kernels.utils.autotune), one
  compile per shape and no benchmarking; test_autotune_gpu.py turns tuning back on for one size;
- TRITON_CACHE_DIR / TORCHINDUCTOR_CACHE_DIR under `.triton-cache/` at the repository root (git-ignored), one
  directory shared by all workers (both caches write atomically, so workers may share them), which a later
  run can reuse; TRITON_CACHE_AUTOTUNING=1 keeps tuning results there too;
- `pytest -n N` schedules by xdist group (`xdist_group` marks, --dist loadgroup): the tests that compile the
  same kernels run on one worker instead of compiling them on every worker at once.
Every variable is only a default: the environment wins (tests/gpu/run_h200.sh sets them all).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
CACHE = HERE.parents[1] / ".triton-cache"
GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"

if GPU:  # before anything imports Triton or mmeff.kernels: autotune reads MMEFF_TRITON_PIN when it decorates
    os.environ.setdefault("MMEFF_TRITON_PIN", "1")
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    os.environ.setdefault("TRITON_CACHE_DIR", str(CACHE / "triton"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(CACHE / "inductor"))
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "2")  # per worker: 8 workers share 16 cores


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "xdist_group(name): tests that run on one xdist worker (--dist loadgroup)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if GPU:
        return
    why = "TRITON_INTERPRET=1 would run the GPU tests in the interpreter" if torch.cuda.is_available() else "needs a CUDA device"
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`-n N` alone (--dist load) schedules by xdist group here, as --dist loadgroup would."""
    if config.getoption("dist") == "load":
        from xdist.scheduler import LoadGroupScheduling

        return LoadGroupScheduling(config, log)
    return None


@pytest.fixture(scope="session", autouse=True)
def kernels():
    """mmeff.kernels, its autotuned kernels pinned as MMEFF_TRITON_PIN says, for every test (the package may have
    been imported before this file set the variable)."""
    import mmeff.kernels

    mmeff.kernels.utils.pin_configs(mmeff.kernels.utils.pinning_requested())
    return mmeff.kernels


@pytest.fixture(autouse=True)
def _synchronize():
    """Kernel faults are asynchronous: wait for the device after each test so that the test which caused one
    reports it (every later test of the worker fails with the same sticky error). Then hand the worker's cached
    blocks back: eight workers share one card, and on an 80 GB H100 two tests ran out of memory while the other
    seven workers' processes held 78 GiB between them (a caching allocator keeps the blocks of finished tests)."""
    yield
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


@pytest.fixture
def poison(kernels, monkeypatch):
    """Every buffer the kernels allocate starts as NaN, so an element left unwritten fails the comparison."""
    monkeypatch.setattr(kernels.utils, "POISON", True)
