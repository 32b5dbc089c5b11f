"""CUDA timing shared by the benchmark scripts."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def cuda_median_ms(step: Callable[[], None], warmup: int, iters: int) -> tuple[float, float]:
    """Median milliseconds of `step` over `iters` calls after `warmup` ones (CUDA events), and the peak GiB of those calls."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30
