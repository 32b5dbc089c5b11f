"""The one place that picks each op's implementation: the `backend` argument, MMEFF_FORCE_REFERENCE, eligibility.

Every op of mmeff.ops runs either its plain-PyTorch reference ("torch") or a fast implementation: "triton"
(mmeff's own kernels, mmeff.kernels), "mamba_ssm" (mamba-ssm's kernels), "flex" (FlexAttention), "grouped_mm"
(torch._grouped_mm). The caller's `backend` says which:
- "auto": the first fast implementation that covers the call, else the reference;
- "torch": the reference;
- a fast implementation's name: that one, or a RuntimeError (BackendUnavailable) saying why it cannot run.
MMEFF_FORCE_REFERENCE=1 in the environment makes every call take the reference, whatever `backend` says.
Each distinct choice is logged once per process at INFO on the "mmeff.ops" logger, with the reasons the
faster implementations were passed over (not while torch.compile traces: a logging call breaks the graph).

Eligibility goes through `on_cuda` and `capability` (tests fake a GPU by replacing them) and mmeff's kernels
are imported through `triton_kernels`, and by `preload_kernels` where CUDA is present, so that CPU-only use never
imports Triton.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from types import ModuleType
from typing import Callable, Literal, Optional, Sequence, Tuple, TypeVar, get_args

import torch
from torch import Tensor

__all__ = [
    "Backend",
    "BackendUnavailable",
    "Check",
    "check_backend",
    "choose",
    "cuda_fast_path",
    "exporting",
    "force_reference",
    "needs_grad",
    "once",
    "on_cuda",
    "preload",
    "preload_kernels",
    "triton_kernels",
    "triton_unsupported",
]

Backend = Literal["auto", "torch", "triton", "mamba_ssm"]
T = TypeVar("T")
# Why an implementation cannot take the call at hand; "" when it can. Called lazily, in order.
Check = Callable[[], str]

logger = logging.getLogger("mmeff.ops")
_logged: set[str] = set()


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name and cannot run the call."""


def force_reference() -> bool:
    """Whether the environment asks for the plain-PyTorch references (MMEFF_FORCE_REFERENCE=1)."""
    return os.environ.get("MMEFF_FORCE_REFERENCE") == "1"


def on_cuda(x: Tensor) -> bool:
    """Whether `x` lives on a CUDA device (the condition of every fast path; tests replace it to fake a GPU)."""
    return x.is_cuda


def capability(x: Tensor) -> Tuple[int, int]:
    """Compute capability of the CUDA device of `x`."""
    return torch.cuda.get_device_capability(x.device)


def needs_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd will need gradients of any of `tensors`."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def once(fn: Callable[[], T]) -> Callable[[], T]:
    """`fn`, run on the first call only: lazy arguments shared by a check and the call (functools.cache would
    break torch.compile's graph)."""
    memo: list = []

    def get() -> T:
        if not memo:
            memo.append(fn())
        return memo[0]

    return get


def exporting() -> bool:
    """Whether torch.export is tracing (not torch.compile)."""
    # torch.compiler.is_exporting() reads True while torch.compile traces too (torch 2.9), which sent compiled
    # models down the export-only paths (a scan op whose backward Inductor failed on); the flag it returns outside
    # tracing does not.
    return bool(getattr(torch.compiler, "_is_exporting_flag", False))


def cuda_fast_path(x: Tensor) -> bool:
    """Whether a CUDA-only PyTorch fast path may take `x`: on CUDA and the references not forced."""
    return on_cuda(x) and not force_reference()


def check_backend(backend: str, allowed: Sequence[str] = get_args(Backend)) -> None:
    """Raise a ValueError unless `backend` is one of `allowed`."""
    if backend not in allowed:
        raise ValueError(f"backend must be one of {', '.join(map(repr, allowed))}, got {backend!r}")


def _log(message: str) -> None:
    # Not while torch.compile traces: a logging call breaks the graph.
    if message not in _logged and not torch.compiler.is_compiling():
        _logged.add(message)
        logger.info(message)


def choose(op: str, backend: str, fast: Sequence[Tuple[str, Check]], allowed: Sequence[str] = get_args(Backend)) -> str:
    """The implementation `op` runs for this call: a name of `fast` (checked in order) or "torch"; logs it once.

    `allowed` are the backend values the op accepts (a ValueError names the others); a fast name in `allowed`
    that `fast` lacks, or whose check fails, is a BackendUnavailable error when asked for by name.
    """
    check_backend(backend, allowed)
    if force_reference():
        _log(f"{op}: torch (MMEFF_FORCE_REFERENCE=1{'' if backend == 'auto' else f', overrides backend={backend!r}'})")
        return "torch"
    if backend == "torch":
        _log(f"{op}: torch (backend='torch')")
        return "torch"
    checks = dict(fast)
    if backend != "auto":
        if backend not in checks:
            raise BackendUnavailable(f"{op}: backend={backend!r} requested but {op} has no {backend} implementation")
        why = checks[backend]()
        if why:
            raise BackendUnavailable(f"{op}: backend={backend!r} requested but it cannot run this call: {why}")
        _log(f"{op}: {backend}")
        return backend
    passed = []
    for name, check in fast:
        why = check()
        if not why:
            _log(f"{op}: {name}" + (f" ({'; '.join(passed)})" if passed else ""))
            return name
        passed.append(f"{name}: {why}")
    _log(f"{op}: torch ({'; '.join(passed) or 'no fast implementation'})")
    return "torch"


KERNEL_MODULES = ("", "bidirectional_gla", "norm", "conv", "conv2d", "moe", "noncausal", "pointwise", "rope", "routes")  # mmeff.kernels and the submodules the ops import by name
_LOADERS: list[Callable[[], object]] = []  # other libraries' kernels the ops import (mamba-ssm), see `preload`


def preload(loader: Callable[[], T]) -> Callable[[], T]:
    """Register `loader` (an import of another library's kernels, memoised with `once`) for `preload_kernels`."""
    _LOADERS.append(loader)
    return loader


def preload_kernels() -> None:
    """Import mmeff.kernels and its submodules, and run the `preload` loaders, now if CUDA is present. torch.compile
    cannot trace an import: a model compiled before its first CUDA call otherwise broke its graph at each layer's
    first kernel (12 breaks in the gla-bi ViT of benchmarks/vision_speed.py). A Triton that fails to import is left
    for the dispatch to report; MMEFF_FORCE_REFERENCE=1 imports nothing."""
    if force_reference() or not torch.cuda.is_available():
        return
    try:
        for module in KERNEL_MODULES:
            triton_kernels(module)
    except Exception as exc:  # a broken Triton install fails in many ways
        logger.info("mmeff's Triton kernels not preloaded: %r", exc)
    for loader in _LOADERS:  # each catches its own import errors
        loader()


def triton_kernels(module: str = "") -> ModuleType:
    """mmeff.kernels (or its submodule `module`): importing it imports Triton."""
    name = "mmeff.kernels" + (f".{module}" if module else "")
    # Once imported, from sys.modules: torch.compile traces that lookup, not an import.
    return sys.modules.get(name) or importlib.import_module(name)


def eager_triton_unsupported(x: Tensor, module: str = "", ask: Callable[[ModuleType], str] | None = None) -> str:
    """triton_unsupported, refusing too while torch.compile or torch.export traces: there the plain-PyTorch form is
    traced, and Inductor fuses it."""
    if torch.compiler.is_compiling() or exporting():
        return "torch.compile traces: Inductor fuses the reference"
    return triton_unsupported(x, module, ask)


def triton_unsupported(x: Tensor, module: str = "", ask: Callable[[ModuleType], str] | None = None) -> str:
    """Why mmeff's Triton kernels (`module` of mmeff.kernels) cannot take a call on `x`; `ask(module)` adds the
    kernels' own conditions. "" when they can."""
    if not on_cuda(x):
        return "inputs not on CUDA"
    try:  # Triton is imported only here, for CUDA inputs
        kernels = triton_kernels(module)
    except Exception as exc:  # a broken Triton install fails in many ways
        return f"Triton kernels unavailable: {exc!r}"
    return ask(kernels) if ask is not None else ""
