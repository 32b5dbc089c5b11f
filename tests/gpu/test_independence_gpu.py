"""Kernel calls do not depend on what ran before them: the cached fixed-length chunk layouts are per device, read
from any stream and never taken from a CUDA-graph capture, results do not change with the order of shapes, and a call
on a side stream or inside a captured graph gives the same numbers. Skipped without CUDA (conftest).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
from kernel_cases import make_inputs  # noqa: E402

pytestmark = [pytest.mark.xdist_group("independence"), pytest.mark.usefixtures("poison")]
HEADS, WIDTH = 4, 64


def forward(kernels, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return kernels.linear_recurrence_triton(**inputs, scale=0.5)[0]


def test_layout_cache_is_per_device_and_any_stream_reads_it(kernels):
    # An entry is made on a thread of its own and is complete before it is first returned: a side stream reads the
    # same one; one first asked for on a side stream holds what the default stream then reads.
    make = kernels.utils.make_chunks
    index = torch.cuda.current_device()
    default = make(None, 2, 1000, 64, torch.device("cuda"))
    assert make(None, 2, 1000, 64, torch.device("cuda", index)) is default  # "cuda" is the current device
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        assert make(None, 2, 1000, 64, torch.device("cuda")) is default
        made_on_side = make(None, 3, 130, 64, torch.device("cuda"))
    assert made_on_side.indices.tolist() == [[n, c] for n in range(3) for c in range(3)]
    assert made_on_side.cu_seqlens.tolist() == [0, 130, 260, 390] and made_on_side.offsets.tolist() == [0, 3, 6]
    assert kernels.utils.sm_count(torch.device("cuda")) == torch.cuda.get_device_properties(index).multi_processor_count


def test_results_independent_of_call_order(kernels):
    # Shapes that share compiled kernels but not chunk layouts or state tiles, in one order and back again.
    shapes = [(2, 1000), (1, 64), (3, 130), (1, 4097)]
    inputs = [make_inputs("gated_delta_rule", b, t, HEADS, WIDTH, WIDTH, dtype=torch.bfloat16, device="cuda", seed=i)
              for i, (b, t) in enumerate(shapes)]  # fmt: skip
    first = [forward(kernels, x) for x in inputs]
    again = [forward(kernels, x) for x in reversed(inputs)][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_side_stream_and_graph_capture(kernels):
    # A layout first built while a graph is captured holds nothing until a replay: it must not be cached.
    warm = make_inputs("scalar_decay", 2, 500, HEADS, WIDTH, WIDTH, dtype=torch.bfloat16, device="cuda", seed=0)
    forward(kernels, warm)  # compiles, at another length than the captured one
    inputs = make_inputs("scalar_decay", 2, 777, HEADS, WIDTH, WIDTH, dtype=torch.bfloat16, device="cuda", seed=1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = forward(kernels, inputs)
    expected = forward(kernels, inputs)  # eager, after the capture, at the captured length
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, expected)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = forward(kernels, inputs)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(on_side, expected)
