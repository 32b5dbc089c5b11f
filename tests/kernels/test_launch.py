"""mmeff.kernels.launch on CPU: every launched kernel goes through a Launcher, and its direct path (the compiled
kernel's launcher, called with the arguments in signature order) against a stand-in for Triton's JIT path that
records what it is given. tests/gpu/test_launch_gpu.py runs the real kernels both ways."""

from __future__ import annotations

import importlib
import logging
import pkgutil

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

# mmeff.kernels is imported by the tests, not at collection: test_dispatch checks the interpreter leaves no trace of
# it in a process that had not imported it.


@pytest.fixture
def launch():
    from mmeff.kernels import launch

    return launch


def test_every_launched_kernel_goes_through_a_launcher(launch):
    # A kernel defined with plain @triton.jit (or triton.autotune) would take Triton's slower launch path unnoticed.
    import mmeff.kernels

    found = {}
    for info in pkgutil.iter_modules(mmeff.kernels.__path__):
        module = importlib.import_module(f"mmeff.kernels.{info.name}")
        found.update({f"{info.name}.{n}": v for n, v in vars(module).items() if n.startswith("_") and n.endswith("_kernel")})
    assert len(found) >= 37
    assert [name for name, kernel in found.items() if not isinstance(kernel, launch.Launcher)] == []
    assert all(kernel.direct for kernel in found.values())  # compiled, not interpreted, in this process


def _toy(x, y, n, scale, flag, BLOCK: tl.constexpr, MODE: tl.constexpr = 3):
    pass


class _Compiled:
    """A compiled kernel: its launcher records each direct launch."""

    def __init__(self, calls: list) -> None:
        self.calls = calls
        self.function, self.packed_metadata = "function", "packed"

    def run(self, *args):  # the launcher (CompiledKernel.run is a property returning it)
        self.calls.append(("direct", args))


class _JIT(JITFunction):
    """Triton's JIT path: records each launch and returns one compiled kernel per call."""

    def __init__(self) -> None:
        super().__init__(_toy)
        self.calls: list = []
        self.fail = False

    def run(self, *args, grid, warmup, **kwargs):
        self.calls.append(("triton", grid, args, kwargs))
        compiled = _Compiled(self.calls)
        if self.fail:
            compiled.run = lambda *a: (_ for _ in ()).throw(TypeError("a launcher of another Triton"))
        return compiled


@pytest.fixture
def toy(launch, monkeypatch):
    monkeypatch.setattr(launch, "INTERPRET", False)
    monkeypatch.setattr(launch, "_device", lambda: 0)
    monkeypatch.setattr(launch, "_stream", lambda device: 77)
    jit = _JIT()
    return launch.Launcher(jit), jit.calls


def test_a_known_key_calls_the_compiled_launcher_with_the_signature_order(toy):
    launcher, calls = toy
    x, y = torch.zeros(8), torch.zeros(8, dtype=torch.bfloat16)
    launcher[(4,)](x, y, 10, 0.5, True, BLOCK=16, num_warps=2)
    assert [c[0] for c in calls] == ["triton"]
    launcher[(4, 2)](x, y, 10, 0.5, True, BLOCK=16, num_warps=2)
    # grid padded to three dims, the stream, the handle and metadata, no launch metadata or hooks, then every
    # argument in signature order: the positional ones, BLOCK from the keywords, MODE's default.
    assert calls[-1] == ("direct", (4, 2, 1, 77, "function", "packed", None, None, None, x, y, 10, 0.5, True, 16, 3))


X, Y = torch.zeros(8), torch.zeros(8, dtype=torch.bfloat16)
BASE = {"BLOCK": 16, "num_warps": 2}


@pytest.mark.parametrize(
    "first, then",
    [
        (((X, Y, 10, 0.5, False), BASE), ((X[1:], Y, 10, 0.5, False), BASE)),  # 4 bytes past 16-byte alignment
        (((X, Y, 10, 0.5, False), BASE), ((X.double(), Y, 10, 0.5, False), BASE)),  # another dtype
        (((X, Y, 10, 0.5, False), BASE), ((X, Y, 1, 0.5, False), BASE)),  # n == 1: a constexpr to Triton
        (((X, Y, 1, 0.5, False), BASE), ((X, Y, True, 0.5, False), BASE)),  # True == 1, and hashes alike
        (((X, Y, 10, 1, False), BASE), ((X, Y, 10, 1.0, False), BASE)),  # a float where an int was
        (((X, Y, 10, 0.5, False), BASE), ((X, Y, 10, 0.5, False), {**BASE, "BLOCK": 32})),  # a constexpr
        (((X, Y, 10, 0.5, False), BASE), ((X, Y, 10, 0.5, False), {**BASE, "num_warps": 4})),  # a launch option
    ],
)
def test_a_call_that_specialises_otherwise_takes_tritons_path(toy, first, then):
    launcher, calls = toy
    launcher[(4,)](*first[0], **first[1])
    launcher[(4,)](*then[0], **then[1])
    launcher[(4,)](*then[0], **then[1])  # now known
    launcher[(4,)](*first[0], **first[1])  # still known
    assert [c[0] for c in calls] == ["triton", "triton", "direct", "direct"]


def test_hooks_function_grids_and_unhashable_arguments_take_tritons_path(toy, monkeypatch):
    launcher, calls = toy
    x = torch.zeros(8)
    launcher[lambda meta: (1,)](x, x, 3, 0.5, False, BLOCK=16)
    launcher[lambda meta: (1,)](x, x, 3, 0.5, False, BLOCK=16)
    launcher[(1,)](x, x, [3], 0.5, False, BLOCK=16)
    assert [c[0] for c in calls] == ["triton"] * 3
    launcher[(1,)](x, x, 3, 0.5, False, BLOCK=16)
    hooks = triton.knobs.runtime.launch_enter_hook  # a HookChain: its calls are what a profiler adds
    monkeypatch.setattr(hooks, "calls", [lambda metadata: None])
    launcher[(1,)](x, x, 3, 0.5, False, BLOCK=16)  # a profiler's hook must see the launch
    assert [c[0] for c in calls] == ["triton"] * 5


def test_a_launcher_that_fails_sends_the_kernel_back_to_triton_for_good(launch, toy, caplog):
    launcher, calls = toy
    launcher.fn.fail = True
    x = torch.zeros(8)
    launcher[(1,)](x, x, 3, 0.5, False, BLOCK=16)
    with caplog.at_level(logging.WARNING, logger="mmeff.kernels.launch"):
        launcher[(1,)](x, x, 3, 0.5, False, BLOCK=16)  # fails directly, relaunched on Triton's path
    assert "launching directly failed" in caplog.text and not launcher.direct
    launcher[(1,)](x, x, 3, 0.5, False, BLOCK=16)
    assert [c[0] for c in calls] == ["triton"] * 3


def test_a_kernel_seeing_many_keys_keeps_tritons_path(launch, toy, monkeypatch):
    launcher, calls = toy
    monkeypatch.setattr(launch, "MAX_KEYS", 3)
    x = torch.zeros(8)
    for n in range(4):  # an argument that changes every call, a decoding position
        launcher[(1,)](x, x, n + 2, 0.5, False, BLOCK=16)
    assert not launcher.direct and launcher.compiled == {}
    launcher[(1,)](x, x, 2, 0.5, False, BLOCK=16)
    assert [c[0] for c in calls] == ["triton"] * 5


def test_clear_forgets_the_compiled_kernels(launch, toy):
    launcher, calls = toy
    x = torch.zeros(8)
    launcher[(1,)](x, x, 3, 0.5, False, BLOCK=16)
    launch.clear()  # as pin_configs does: the autotuners choose again
    launcher[(1,)](x, x, 3, 0.5, False, BLOCK=16)
    assert [c[0] for c in calls] == ["triton", "triton"]


class _Tuner(Autotuner):
    """An autotuner that chose `config` (its JIT path records as _JIT's)."""

    def __init__(self, config: triton.Config) -> None:  # noqa: D107 - Autotuner's own set-up is not needed
        self.fn = _JIT()
        self.best_config = config

    def run(self, *args, **kwargs):
        return self.fn.run(*args, **kwargs, **self.best_config.all_kwargs())


def test_an_autotuned_kernel_launches_the_chosen_config_directly(launch, toy):
    _, _ = toy
    tuner = _Tuner(triton.Config({"MODE": 5}, num_warps=8))
    launcher = launch.Launcher(tuner)
    x = torch.zeros(8)
    launcher[(2,)](x, x, 3, 0.5, False, BLOCK=16)
    launcher[(2,)](x, x, 3, 0.5, False, BLOCK=16)
    assert [c[0] for c in tuner.fn.calls] == ["triton", "direct"]
    assert tuner.fn.calls[-1][1][-2:] == (16, 5)  # the config's constexpr, not MODE's default

    hooked = launch.Launcher(_Tuner(triton.Config({}, num_warps=8, pre_hook=lambda args: None)))
    for _ in range(2):
        hooked[(2,)](x, x, 3, 0.5, False, BLOCK=16, MODE=3)
    assert [c[0] for c in hooked.fn.fn.calls] == ["triton", "triton"]  # a pre-hook runs on Triton's path only


def test_a_direct_launch_returns_the_compiled_kernel_as_tritons_does(toy):
    launcher, _ = toy
    x = torch.zeros(8)
    first = launcher[(1,)](x, x, 3, 0.5, False, BLOCK=16)
    assert isinstance(first, _Compiled) and launcher[(1,)](x, x, 3, 0.5, False, BLOCK=16) is first
