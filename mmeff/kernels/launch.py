"""Launching mmeff's Triton kernels without Triton's per-call dispatch once a specialisation is compiled.

`kernel[grid](*args, **constexprs)` on a Triton JITFunction costs the host about 36 us on the H200, of which its
compiled launcher takes 10 (benchmarks/results/launches_cpu.md: Triton 3.6, torch 2.11): the rest is JITFunction.run
binding and specialising the arguments, building its cache key, parsing options and checking hooks and globals. An
eager training step of a scan mixer launches 200 to 360 kernels and waits on the host (benchmarks/launches.py).

`jit` (for `triton.jit`) and mmeff.kernels.utils.autotune wrap each launched kernel in a `Launcher`, which keeps each
specialisation's compiled kernel under a key of the call: every tensor's dtype and 16-byte alignment (what Triton
specialises a pointer on), every other argument's type and exact value (finer than Triton's integer
specialisations: equal to 1, divisible by 16, 32 or 64 bits) and the keyword arguments (constexprs, num_warps). A new
key takes Triton's own path, which compiles (or, for an autotuner, tunes), launches and returns the compiled kernel,
which is kept; a known key calls that kernel's launcher directly, with the arguments in the kernel's signature order,
as JITFunction.run does. Triton's path is taken every time under its interpreter, for grids given as functions,
while a launch hook is set (a profiler), for an autotuner config with a pre-hook, and for a kernel once it has seen
MAX_KEYS keys (an argument that changes every call, a decoding position) or failed on the direct path (logged).
Triton's check that a kernel's global constants were not reassigned after compiling is not repeated: mmeff's are
module constants.
"""

from __future__ import annotations

import inspect
import logging
import os
import weakref
from typing import Any, Callable

import torch
import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

__all__ = ["Launcher", "clear", "jit"]

log = logging.getLogger(__name__)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # as triton.jit reads it, once
MAX_KEYS = 256
_LAUNCHERS: weakref.WeakSet[Launcher] = weakref.WeakSet()


def jit(fn: Callable) -> Launcher:
    """triton.jit(fn), launched through a Launcher (for kernels the host launches, not for @triton.jit helpers)."""
    return Launcher(triton.jit(fn))


def clear() -> None:
    """Forget every kept compiled kernel (mmeff.kernels.utils.pin_configs: the autotuners choose again)."""
    for launcher in list(_LAUNCHERS):
        launcher.compiled.clear()


class Launcher:
    """A Triton JITFunction or Autotuner, launched as `launcher[grid](*args, **kwargs)` (see the module docstring);
    `fn` is the Triton object (as an autotuner's `fn` is its JITFunction), for its own attributes (an autotuner's
    configs) and its own launch path."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.compiled: dict[Any, tuple] = {}
        base = fn
        while not isinstance(base, JITFunction) and hasattr(base, "fn"):
            base = base.fn
        self.direct = not INTERPRET and isinstance(base, JITFunction) and isinstance(fn, (JITFunction, Autotuner))
        self.params = [(p.name, p.default) for p in base.signature.parameters.values()] if self.direct else []
        _LAUNCHERS.add(self)

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        if not self.direct or callable(grid):
            return self.fn[grid]
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _launch(self, grid: tuple, args: tuple, kwargs: dict) -> Any:
        device = _device()
        try:
            key = (device, _spec(args), tuple(kwargs.items()))
            kept = self.compiled.get(key)
        except TypeError:  # an argument that cannot be hashed: Triton's path
            return self.fn[grid](*args, **kwargs)
        if kept is None or _hooked():
            return self._first(grid, args, kwargs, key)
        compiled, run, function, packed, tail = kept
        try:
            run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, _stream(device), function,
                packed, None, None, None, *args, *tail)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - a launcher this path does not know how to call: Triton's from now on
            log.warning("%s: launching directly failed (%r); Triton's launch path from now on", self, e)
            self.direct = False
            self.compiled.clear()
            return self.fn[grid](*args, **kwargs)
        return compiled  # as Triton's launch returns it

    def _first(self, grid: tuple, args: tuple, kwargs: dict, key: Any) -> Any:
        """Triton's launch (compiling or tuning where needed); its compiled kernel kept under `key` where it can be."""
        compiled = self.fn[grid](*args, **kwargs)
        kept = self._entry(compiled, args, kwargs)
        if kept is not None and not _hooked():
            if len(self.compiled) >= MAX_KEYS:
                log.info("%s: %d keys seen; Triton's launch path from now on", self, MAX_KEYS)
                self.direct = False
                self.compiled.clear()
            else:
                self.compiled[key] = kept
        return compiled

    def _entry(self, compiled: Any, args: tuple, kwargs: dict) -> tuple | None:
        """(the compiled kernel, its launcher, function handle and packed metadata, the arguments after `args` in
        signature order), or None where it cannot be launched directly."""
        if compiled is None or not hasattr(compiled, "packed_metadata"):  # a jit hook's skip, an async compile
            return None
        named = dict(kwargs)
        if isinstance(self.fn, Autotuner):
            config = self.fn.best_config
            if config.pre_hook is not None:
                return None
            named.update(config.kwargs)
        tail = []
        for name, default in self.params[len(args):]:
            if name in named:
                tail.append(named[name])
            elif default is not inspect.Parameter.empty:
                tail.append(default)
            else:
                return None
        run = compiled.run  # loads the module: the function handle is set after
        return compiled, run, compiled.function, compiled.packed_metadata, tuple(tail)

    def __repr__(self) -> str:
        return f"Launcher({self.fn!r})"


def _spec(args: tuple) -> tuple:
    """The key of positional arguments: (dtype, 16-byte aligned) of a tensor, (type, value) of anything else."""
    return tuple(
        (a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
        else _spec(a) if isinstance(a, tuple) else (a.__class__, a)
        for a in args
    )  # fmt: skip


def _hooked() -> bool:
    """Whether a launch hook is set (a HookChain with calls, or a hook where Triton keeps one)."""
    runtime = triton.knobs.runtime
    return any(h is not None and getattr(h, "calls", True) for h in (runtime.launch_enter_hook, runtime.launch_exit_hook))


_device = torch.cuda.current_device
# The raw current stream of a device, as Triton's CUDA driver reads it (a capture stream while a CUDA graph records).
_stream = getattr(torch._C, "_cuda_getCurrentRawStream", lambda index: torch.cuda.current_stream(index).cuda_stream)
