"""Timing, device ceilings, the clean-up between rows, parallel warm-ups and result files, shared by the benchmark scripts."""

from __future__ import annotations

import gc
import json
import os
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mmeff.config import BackboneConfig


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


def median_ms(fn: Callable[[], None], device: torch.device, warmup: int, reps: int) -> tuple[float, float | None]:
    """Median milliseconds of `fn` after `warmup` calls, and the peak GiB allocated by those calls (CUDA only)."""
    if device.type == "cuda":
        return cuda_median_ms(fn, warmup, reps)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), None


def matmul_rate(device: torch.device, n: int) -> float:
    """FLOP/s of an n x n x n matmul on `device` (bf16 on CUDA, fp32 on the CPU): the rate the floors are counted at."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    ms, _ = median_ms(lambda: torch.mm(a, b), device, 3, 10)
    return 2 * n**3 / (ms / 1e3)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy of `nbytes` (bytes read plus bytes written): the rate byte floors use."""
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    ms, _ = median_ms(lambda: dst.copy_(src), device, 3, 10)
    return 2 * src.numel() * 4 / (ms / 1e3)


def device_tag(device: torch.device) -> str:
    """'h200' for an NVIDIA H200, 'cpu' on the CPU."""
    return "cpu" if device.type != "cuda" else gpu_tag(torch.cuda.get_device_name(device))


def gpu_tag(name: str) -> str:
    """The model in a GPU's name, lower case: 'NVIDIA H100 80GB HBM3' -> 'h100' (its last word, 'hbm3', named the
    results of an H100 before), 'NVIDIA H200' -> 'h200'; the last word where no word is letters then digits."""
    model = re.search(r"\b[A-Z]+[0-9]+[A-Z]*\b", name)
    return re.sub(r"[^a-z0-9]", "", (model.group(0) if model else name.split()[-1]).lower())


def free(device: torch.device) -> None:
    """Collect the garbage a finished row left and give its cached CUDA memory back, so the next row starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def error_note(e: BaseException) -> str:
    """A failed row's note: the exception's type and first line."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def run_in_parallel(commands: list[list[str]], seconds: float, jobs: int, env: dict[str, str] | None = None) -> int:
    """Run `commands` as child processes, at most `jobs` at a time, for at most `seconds` in all (the ones still
    running then are killed; those not started are dropped); the number that finished. For warm-ups that fill
    Triton's on-disk cache from many processes at once, where one process would compile one kernel after another."""
    pending, running, finished = list(commands), [], 0
    deadline = time.monotonic() + seconds
    try:
        while (pending or running) and time.monotonic() < deadline:
            while pending and len(running) < jobs:
                running.append(subprocess.Popen(pending.pop(0), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                env={**os.environ, **(env or {})}))  # fmt: skip
            time.sleep(0.5)
            finished += sum(p.returncode == 0 for p in running if p.poll() is not None)
            running = [p for p in running if p.returncode is None]
    finally:  # also when interrupted: no child is left running
        for proc in running:
            proc.kill()
            proc.wait()
    return finished


def run_id(records: list[dict[str, Any]]) -> str:
    """The time now, to the second, as a run's id; with a suffix (".2", ".3", ...) where `records` already have that
    id: two runs into one file within a second (the tests call main() twice in one process) stay two runs."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    taken = {r.get("run") for r in records}
    run, n = stamp, 1
    while run in taken:
        n += 1
        run = f"{stamp}.{n}"
    return run


def write_results(stem: Path, data: dict[str, Any], markdown: str) -> None:
    """`stem`.json (`data`) and `stem`.md, each written under a temporary name and renamed: a run cut mid-write
    leaves the last whole files."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(data, indent=1) + "\n"), (".md", markdown)):
        tmp = stem.with_name(stem.name + suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, stem.with_name(stem.name + suffix))


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """A matplotlib figure to `path`, written under a temporary name and renamed (as write_results), then closed."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)
    plt.close(fig)


def save_row_bars(fig: Any, ax: Any, rows: list[str], ylabel: str, title: str, path: Path) -> None:
    """A bar chart of one bar group per row: its row names, labels and legend, then saved (as save_figure)."""
    ax.set_xticks(list(range(len(rows))), rows)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# Row suffix -> backbone.checkpoint, for the rows of vision_speed.py and lm_train_speed.py ("gla-bi+ckpt_norm"); a row
# without one takes the config's default ("norm"), `+no_ckpt` keeps every activation (false).
CHECKPOINT = {"+ckpt_mixer": "mixer", "+ckpt_norm": "norm", "+ckpt": True, "+no_ckpt": False}


def unchecked(row: str) -> tuple[str, bool | str]:
    """(the row without its checkpoint suffix, backbone.checkpoint)."""
    for suffix, checkpoint in CHECKPOINT.items():
        if row.endswith(suffix):
            return row.removesuffix(suffix), checkpoint
    return row, BackboneConfig.checkpoint


# `--compile [MODE]` of vision_speed.py and lm_train_speed.py: torch.compile's modes, as `trainer.compile` takes them.
COMPILE_MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


def add_compile_argument(p: Any, who: str) -> None:
    """`--compile [MODE]` on argparse parser `p`: False without it, "default" alone, else the mode named."""
    p.add_argument("--compile", nargs="?", const="default", default=False, choices=COMPILE_MODES, metavar="MODE",
                   help=f"torch.compile every model ({who} too), as trainer.compile: MODE is one of "
                        f"{', '.join(COMPILE_MODES)} (default: default; reduce-overhead adds Inductor's CUDA graphs)")  # fmt: skip


def compile_label(record: dict[str, Any]) -> str:
    """'' for an eager record, 'compiled' for torch.compile's default mode, else 'compiled-<mode>'."""
    if not record["compiled"]:
        return ""
    mode = record.get("compile_mode", "default")
    return "compiled" if mode == "default" else f"compiled-{mode}"


def replays_graphs(graphs: bool, compile_setting: str | bool) -> bool:
    """Whether a step replays CUDA graphs (`--graphs`, or torch.compile's reduce-overhead and max-autotune modes): their
    private memory pools are not in the allocator's allocated count, so such a step has no peak to report."""
    return graphs or compile_setting in ("reduce-overhead", "max-autotune")


def compile_fields(setting: str | bool) -> dict[str, Any]:
    """A record's `compiled` (bool) and, for a mode other than the default, its `compile_mode`."""
    return {"compiled": bool(setting), **({"compile_mode": setting} if setting not in (False, "default") else {})}
