"""The GPU-only benchmark scripts run through on this device's torch and Triton. Skipped without CUDA (conftest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
pytestmark = pytest.mark.xdist_group("benchmarks")


def test_host_cost_times_every_call_and_the_parts_of_a_triton_launch(tmp_path):
    # Every call is timed, the parts of Triton's launch read through its internals too (a Triton version whose
    # internals moved fails here rather than in a benchmark run), the profile tables are written, and whole steps
    # are timed with the backward on each thread.
    # The script imports mmeff from the checkout, as `python benchmarks/host_cost.py` from its root does.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCHMARKS.parent), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(BENCHMARKS / "host_cost.py"), "--profile", "--steps", "vision:attn", "lm:attn",
                           "--out", str(tmp_path / "host")], capture_output=True, text=True, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads((tmp_path / "host.json").read_text())["records"]
    calls = [r for r in records if r["group"] != "step"]
    assert [r["call"] for r in calls if r["host_us"] is None] == []
    assert {r["group"] for r in calls} == {"aten", "triton", "norm", "autograd", "caller thread"}
    steps = [r for r in records if r["group"] == "step"]
    assert [r["call"] for r in steps] == ["vision:attn", "lm:attn"]
    assert all(r["ms"] > 0 and r["calling_thread_ms"] > 0 and r["tritons_launch_ms"] > 0 for r in steps)
    text = (tmp_path / "host.md").read_text()
    assert text.count("torch.profiler, 20 calls of") == 2 and (tmp_path / "host.png").stat().st_size > 0
    assert "| vision:attn |" in text
