"""benchmarks/timing.py: what the speed scripts share."""

from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


@pytest.mark.parametrize(
    "name,tag",
    [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"),
     ("NVIDIA L40S", "l40s"), ("NVIDIA GeForce RTX 4090", "4090")],
)  # fmt: skip
def test_gpu_tag_names_the_model(monkeypatch, name, tag):
    # The results' file names (vision_speed_<tag>.md ...): an H100's name ends in its memory's ("HBM3"), which named
    # its results vision_speed_hbm3 before.
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from timing import gpu_tag

    assert gpu_tag(name) == tag
