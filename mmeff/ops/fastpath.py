"""The one switch every fast path obeys: MMEFF_FORCE_REFERENCE=1 runs the plain-PyTorch references everywhere."""

from __future__ import annotations

import os

from torch import Tensor


def force_reference() -> bool:
    """Whether the environment asks for the plain-PyTorch references (MMEFF_FORCE_REFERENCE=1)."""
    return os.environ.get("MMEFF_FORCE_REFERENCE") == "1"


def cuda_fast_path(x: Tensor) -> bool:
    """Whether a CUDA-only fast path may take `x`: it is on CUDA and the references are not forced."""
    return x.is_cuda and not force_reference()
