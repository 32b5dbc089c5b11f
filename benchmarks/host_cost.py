"""Host microseconds a call of what an eager training step launches: aten ops, a Triton launch and its parts,
mmeff's norm against PyTorch's layer norm, forward and backward, and what a Python autograd.Function costs (CUDA only).

The eager vision steps at 224 px and the LM steps at 4k wait on the host (`launches.py` counts their launches). This
times the calls one by one: 3,000 of each on [64, 384] bf16 tensors, small enough that the GPU keeps up, with no
synchronisation inside, so the time per call is the host's. A Triton launch is split into the parts of Triton's
`JITFunction.run` (the argument binder, the cache key, the C launcher), read through Triton's internals (3.5 and 3.6;
a part another version lacks is reported as failed, the rest still runs). `--profile` adds a torch.profiler table
(CPU and CUDA) of one mmeff norm forward and backward and one of nn.LayerNorm's.

    python benchmarks/host_cost.py          # writes benchmarks/results/host_cost_<device>.{md,json,png}
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from mmeff.kernels import norm as kernels
from mmeff.kernels.utils import cdiv, next_pow2
from mmeff.ops.norm import norm
from timing import device_tag, save_row_bars, write_results  # benchmarks/timing.py, beside this script

M, N, CALLS = 64, 384, 3000


def host_us(fn: Callable[[], Any], calls: int = CALLS) -> float:
    """Host microseconds a call of `fn` over `calls` calls after 50 untimed ones."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def cases() -> list[tuple[str, str, Callable[[], Any]]]:
    """(group, name, call) of every timed call."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import compute_cache_key

    dev = torch.device("cuda")
    x = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
    w, b = torch.ones(N, device=dev), torch.zeros(N, device=dev)
    y, mean, rstd = torch.empty_like(x), torch.empty(M, device=dev), torch.empty(M, device=dev)
    weight = torch.randn(N, N, device=dev, dtype=torch.bfloat16)
    master = weight.float()  # a parameter as autocast meets it: fp32, cast for each call
    BN = next_pow2(N)
    BR = max(1, min(kernels.ROWS, 4096 // BN))
    grid = (cdiv(M, BR), 1, 1)
    args = (x, None, x, None, w, b, y, mean, rstd, M, N, 1, 0, 1e-6)
    constexprs = dict(RMS=False, HAS_W=True, HAS_B=True, GATE=0, HAS_R=False, BR=BR, BN=BN)
    jit = kernels._norm_fwd_kernel
    compiled = jit[grid](*args, **constexprs, num_warps=kernels._warps(BR * BN))
    device = driver.active.get_current_device()
    stream = driver.active.get_current_stream(device)
    _, key_cache, _, _, binder = jit.device_caches[device]
    bound, specialization, options = binder(*args, **constexprs, num_warps=kernels._warps(BR * BN))
    runner = compiled[grid]
    xg = x.clone().requires_grad_()
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
    ln = torch.nn.LayerNorm(N, device=dev, dtype=torch.bfloat16)
    return [
        ("aten", "add (allocating)", lambda: torch.add(x, x)),
        ("aten", "add(out=)", lambda: torch.add(x, x, out=y)),
        ("aten", "empty", lambda: torch.empty((M, N), device=dev, dtype=torch.bfloat16)),
        ("aten", "linear, fp32 weight cast under autocast", lambda: F.linear(x, master.to(torch.bfloat16))),
        ("aten", "linear, bf16 weight", lambda: F.linear(x, weight)),
        ("triton", "JITFunction launch `kernel[grid](...)`",
         lambda: jit[grid](*args, **constexprs, num_warps=kernels._warps(BR * BN))),
        ("triton", "part: argument binder", lambda: binder(*args, **constexprs, num_warps=kernels._warps(BR * BN))),
        ("triton", "part: cache key", lambda: compute_cache_key(key_cache, specialization, options)),
        ("triton", "part: current device and stream", lambda: driver.active.get_current_stream(driver.active.get_current_device())),
        ("triton", "CompiledKernel runner `compiled[grid](*args)`", lambda: runner(*bound.values(), stream=stream)),
        ("triton", "CompiledKernel C launcher", lambda: compiled.run(
            *grid, stream, compiled.function, compiled.packed_metadata, None, None, None, *bound.values())),
        ("norm", "mmeff kernels.norm.norm_fwd (buffers and launch)",
         lambda: kernels.norm_fwd(x, w, b, 1e-6, False, 1, torch.bfloat16)),
        ("norm", "mmeff ops.norm forward, with gradients", lambda: norm(xg, wg, bg, 1e-6, "layer")),
        ("norm", "nn.LayerNorm forward, with gradients", lambda: ln(xg)),
        ("norm", "mmeff ops.norm forward, sum, backward", lambda: norm(xg, wg, bg, 1e-6, "layer").sum().backward()),
        ("norm", "nn.LayerNorm forward, sum, backward", lambda: ln(xg).sum().backward()),
        # What a Python autograd.Function's backward costs apart from its work (its backward runs on autograd's CUDA
        # thread): an identity Function against an aten op, each with the same sum and backward.
        ("autograd", "Python autograd.Function (identity) forward, sum, backward", lambda: _Identity.apply(xg).sum().backward()),
        ("autograd", "aten view_as forward, sum, backward", lambda: xg.view_as(xg).sum().backward()),
    ]  # fmt: skip


class _Identity(torch.autograd.Function):
    """x -> x, gradient passed through: the Python Function machinery alone."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return dy


def profile_table(fn: Callable[[], Any]) -> str:
    """torch.profiler's table (CPU and CUDA time) of 20 calls of `fn`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", action="store_true", help="torch.profiler tables of the two norms' forward and backward")
    p.add_argument("--out", type=Path, help="results stem (default benchmarks/results/host_cost_<device>)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("host_cost: times what a CUDA step launches; no CUDA device here")
    import triton

    device = torch.cuda.get_device_name()
    out = args.out or Path(__file__).parent / "results" / f"host_cost_{device_tag(torch.device('cuda'))}"
    command = " ".join(["python benchmarks/host_cost.py", *sys.argv[1:]])
    records = []
    for group, name, fn in cases():
        try:
            records.append({"group": group, "call": name, "host_us": host_us(fn)})
        except Exception as e:  # noqa: BLE001  (a part another Triton version lacks: reported, the rest runs)
            records.append({"group": group, "call": name, "host_us": None, "note": f"{type(e).__name__}: {e}"[:200]})
        print(f"{name}: {records[-1]['host_us'] or records[-1].get('note')}", flush=True)
    lines = [f"`{command}` on {device} (torch {torch.__version__}, Triton {triton.__version__}): host microseconds a "
             f"call, {CALLS:,} calls on [{M}, {N}] bf16 tensors, no synchronisation inside.", "",
             "| group | call | host us |", "|---|---|---:|"]  # fmt: skip
    for r in records:
        shown = f"{r['host_us']:.1f}" if r["host_us"] is not None else f"failed: {r['note']}"
        lines.append(f"| {r['group']} | {r['call']} | {shown} |")
    if args.profile:
        xg = torch.randn(M, N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        wg = torch.ones(N, device="cuda", requires_grad=True)
        bg = torch.zeros(N, device="cuda", requires_grad=True)
        ln = torch.nn.LayerNorm(N, device="cuda", dtype=torch.bfloat16)
        for title, fn in (("mmeff ops.norm forward, sum, backward", lambda: norm(xg, wg, bg, 1e-6, "layer").sum().backward()),
                          ("nn.LayerNorm forward, sum, backward", lambda: ln(xg).sum().backward())):  # fmt: skip
            fn()
            lines += ["", f"torch.profiler, 20 calls of: {title}", "", "```", profile_table(fn), "```"]
    write_results(out, {"command": command, "device": device, "records": records}, "\n".join(lines) + "\n")
    import matplotlib.pyplot as plt

    timed = [r for r in records if r["host_us"] is not None]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.bar(range(len(timed)), [r["host_us"] for r in timed], label=device)
    save_row_bars(fig, ax, [r["call"][:38] for r in timed], "host us a call", "Host time a call (no sync inside)",
                  out.with_name(out.name + ".png"))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
