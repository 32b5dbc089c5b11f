"""What the benchmark script tests share: running a script's main() in-process."""

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


@pytest.fixture
def script(monkeypatch):
    """Run benchmarks/<name>.py's main() with `argv`."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))

    def run(name: str, *argv: str) -> None:
        module = __import__(name)
        monkeypatch.setattr(sys, "argv", [name, *argv])
        module.main()

    return run
