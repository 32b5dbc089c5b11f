"""Host microseconds a call of what an eager training step launches: aten ops, a Triton launch and its parts,
mmeff's norm against PyTorch's layer norm, forward and backward, and what a Python autograd.Function costs (CUDA only).

The eager vision steps at 224 px and the LM steps at 4k wait on the host (`launches.py` counts their launches). This
times the calls one by one: 3,000 of each on [64, 384] bf16 tensors, small enough that the GPU keeps up, with no
synchronisation inside, so the time per call is the host's. A Triton launch is split into the parts of Triton's
`JITFunction.run` (the argument binder, the cache key, the C launcher), read through Triton's internals (3.5 and 3.6;
a part another version lacks is reported as failed, the rest still runs), beside mmeff's own launch path for a known
key (mmeff.kernels.launch.Launcher: the compiled kernel's launcher called directly). `--profile` adds a torch.profiler
table (CPU and CUDA) of one mmeff norm forward and backward and one of nn.LayerNorm's.

Where the backward runs: on CUDA, autograd's engine hands every backward to its own thread for the device, where each
Python autograd.Function's backward takes the GIL; `torch.autograd.set_multithreading_enabled(False)` keeps the
backward on the calling thread. The norm and identity cases are timed both ways, and `--steps` times whole eager
training steps of the speed scripts in one process (alternating blocks of steps, median step) three ways: as mmeff
runs them, with the backward on the calling thread, and with mmeff's kernels launched through Triton's own path
instead of mmeff's Launcher: vision rows of benchmarks/vision_speed.py at 224 px (batch 256) and LM rows of
benchmarks/lm_train_speed.py at T = 4,096 (B = 4).

    python benchmarks/host_cost.py          # writes benchmarks/results/host_cost_<device>.{md,json,png}
    python benchmarks/host_cost.py --steps vision:timm vision:gla-bi lm:attn lm:gla
"""

from __future__ import annotations

import argparse
import statistics
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
    jit = kernels._norm_fwd_kernel.fn  # the JITFunction (mmeff launches it through a Launcher)
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
        ("triton", "mmeff Launcher `kernel[grid](...)`, a known key: the compiled kernel's launcher called directly",
         lambda: kernels._norm_fwd_kernel[grid](*args, **constexprs, num_warps=kernels._warps(BR * BN))),
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
        ("caller thread", "mmeff ops.norm forward, sum, backward",
         on_caller(lambda: norm(xg, wg, bg, 1e-6, "layer").sum().backward())),
        ("caller thread", "nn.LayerNorm forward, sum, backward", on_caller(lambda: ln(xg).sum().backward())),
        ("caller thread", "Python autograd.Function (identity) forward, sum, backward",
         on_caller(lambda: _Identity.apply(xg).sum().backward())),
        ("caller thread", "aten view_as forward, sum, backward", on_caller(lambda: xg.view_as(xg).sum().backward())),
    ]  # fmt: skip


def on_caller(fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn` with autograd's multithreading off: its backward runs on the calling thread, not the device's."""

    def call() -> Any:
        with torch.autograd.set_multithreading_enabled(False):
            return fn()

    return call


def step_of(spec: str) -> Callable[[], None]:
    """One eager training step of `vision:<row>` (vision_speed.py, 224 px, batch 256) or `lm:<row>` (lm_train_speed.py,
    T = 4,096, B = 4) on CUDA."""
    import lm_train_speed
    import vision_speed

    kind, _, row = spec.partition(":")
    torch.manual_seed(0)
    if kind == "vision":
        model, example = vision_speed.build(row, 224, vision_speed.REAL)
        model = model.cuda()
        batch = example.expand(vision_speed.SIZES[224], *example.shape[1:]).contiguous().cuda()
        return vision_speed.train_step(model, batch, vision_speed.REAL.classes)
    if kind == "lm":
        T = 4096
        model, logits_of = lm_train_speed.build(row, lm_train_speed.REAL, T)
        tokens = torch.randint(0, 256, (lm_train_speed.REAL.tokens // T, T + 1), device="cuda")
        return lm_train_speed.train_step(model.cuda(), logits_of, tokens, None)
    raise ValueError(f"a step is vision:<row> or lm:<row>, not {spec!r}")


def on_tritons_path(fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn` with mmeff's kernels launched through Triton's own JITFunction.run (Autotuner.run), not mmeff's Launcher."""
    from mmeff.kernels.launch import Launcher

    def call() -> Any:
        direct = Launcher.__getitem__
        Launcher.__getitem__ = lambda self, grid: self.fn[grid]
        try:
            return fn()
        finally:
            Launcher.__getitem__ = direct

    return call


# Ways of running a step: (record field, table column).
WAYS = [("ms", "mmeff's default ms"), ("calling_thread_ms", "backward on the calling thread ms"),
        ("tritons_launch_ms", "Triton's launch path ms")]  # fmt: skip


def step_records(specs: list[str], blocks: int = 4, per_block: int = 5) -> list[dict[str, Any]]:
    """Median ms of each step as mmeff runs it (its Launcher, the backward on autograd's device thread), with the
    backward on the calling thread, and with Triton's own launch path, in alternating blocks of `per_block` steps
    after 3 untimed ones of each."""
    records = []
    for spec in specs:
        step = step_of(spec)
        ways = dict(zip((f for f, _ in WAYS), (step, on_caller(step), on_tritons_path(step))))
        times: dict[str, list[float]] = {way: [] for way in ways}
        for fn in ways.values():
            for _ in range(3):
                fn()
        for _ in range(blocks):
            for way, fn in ways.items():
                for _ in range(per_block):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    fn()
                    torch.cuda.synchronize()
                    times[way].append((time.perf_counter() - start) * 1e3)
        records.append({"group": "step", "call": spec, **{way: statistics.median(t) for way, t in times.items()}})
        print(f"{spec}: " + ", ".join(f"{col} {records[-1][f]:.1f}" for f, col in WAYS), flush=True)
        del step, ways
        torch.cuda.empty_cache()
    return records


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
    p.add_argument("--steps", nargs="+", default=[], metavar="KIND:ROW",
                   help="also time eager training steps as mmeff runs them, with the backward on the calling thread "
                        "and with Triton's launch path: vision:<row> of vision_speed.py at 224 px, lm:<row> of "
                        "lm_train_speed.py at T = 4096")  # fmt: skip
    p.add_argument("--out", type=Path, help="results stem (default benchmarks/results/host_cost_<device>)")
    args = p.parse_args()
    bad = [spec for spec in args.steps if spec.partition(":")[0] not in ("vision", "lm") or not spec.partition(":")[2]]
    if bad:
        p.error(f"--steps takes vision:<row> or lm:<row>, got {' '.join(bad)}")
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
    steps = step_records(args.steps)
    if steps:
        lines += ["", "One eager training step (median ms, CUDA-synchronised) as mmeff runs it (its kernels through "
                  "mmeff.kernels.launch.Launcher, the backward on autograd's device thread), with the backward on the "
                  "calling thread (`torch.autograd.set_multithreading_enabled(False)`) and with Triton's own launch "
                  "path (JITFunction.run):", "",
                  "| step | " + " | ".join(col for _, col in WAYS) + " |", "|---|" + "---:|" * len(WAYS)]  # fmt: skip
        lines += ["| " + " | ".join([r["call"], *(f"{r[f]:.1f}" for f, _ in WAYS)]) + " |" for r in steps]
    records += steps
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

    timed = [r for r in records if r.get("host_us") is not None]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.bar(range(len(timed)), [r["host_us"] for r in timed], label=device)
    save_row_bars(fig, ax, [r["call"][:38] for r in timed], "host us a call", "Host time a call (no sync inside)",
                  out.with_name(out.name + ".png"))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
