"""The `kernels` fixture: mmeff.kernels run by the Triton interpreter, for one test module (see kernel_cases)."""

from __future__ import annotations

from types import ModuleType
from typing import Iterator

import pytest
from kernel_cases import interpreted_kernels


@pytest.fixture(scope="module")
def kernels() -> Iterator[ModuleType]:
    with interpreted_kernels() as module:
        yield module
