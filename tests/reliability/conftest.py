"""Helpers of the fault tests: short runs of the tiny digits config, and reading their logs."""

import csv
from pathlib import Path

import pytest


SHORT = {"trainer.max_epochs": 2, "trainer.kwargs": {"limit_train_batches": 4, "limit_val_batches": 2}, "trainer.log_every_n_steps": 1}


@pytest.fixture
def short_config(tiny_config):
    """A tiny digits config of 2 epochs x 4 steps (validation on 2 batches), with any overrides."""

    def make(**overrides):
        return tiny_config(**{**SHORT, **overrides})

    return make


def _logged(run: Path, column: str) -> list[tuple[int, float]]:
    rows = []
    for path in sorted((run / "logs").rglob("metrics.csv")):
        with path.open() as f:
            rows += [(int(r["step"]), float(r[column])) for r in csv.DictReader(f) if r.get(column)]
    return sorted(rows)


@pytest.fixture
def logged():
    """(step, value) of a column in every metrics.csv of a run folder (all versions: a resumed run adds one)."""
    return _logged
