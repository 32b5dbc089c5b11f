"""Shared fixtures: the digits shards (built once per session) and a tiny run config."""

from pathlib import Path

import pytest
import yaml


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    from mmeff.data import build_shards

    root = tmp_path_factory.mktemp("digits")
    build_shards(None, root, source="digits")
    return root


@pytest.fixture
def tiny_config(tmp_path, digits_root):
    """Write a small, fast digits config and return a function making variants of it."""

    def make(**overrides) -> Path:
        cfg = {
            "name": "tiny",
            "run_dir": str(tmp_path / "runs" / "${name}"),
            "data": {"root": str(digits_root), "batch_size": 32, "num_workers": 0},
            "encoder": {"name": "image", "image_size": 16, "patch_size": 4},
            "backbone": {"dim": 32, "pattern": ["attn"], "depth": 1, "causal": False, "mixers": {"attn": {"heads": 2}}},
            "task": {"name": "classify", "num_classes": 10},
            "trainer": {"max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False, "logger": "csv"},
            "optim": {"lr": 3e-3, "warmup_steps": 5},
        }
        for key, value in overrides.items():
            node = cfg
            *parents, last = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
        path = tmp_path / f"cfg_{len(list(tmp_path.glob('cfg_*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return make


@pytest.fixture
def one_thread():
    """One torch thread while the test runs: tiny models on shared cores run many times faster without OpenMP's
    thread barriers (use: pytestmark = pytest.mark.usefixtures("one_thread"))."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def census(monkeypatch):
    """benchmarks/saved_memory.py (its step census: step_peak, live) imported in this process, with its default of
    TRITON_INTERPRET=1 kept out of the kernel imports of later tests (they would run interpreted:
    tests/kernels/test_launch.py failed so)."""
    import importlib
    import os

    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    return importlib.import_module("saved_memory")
