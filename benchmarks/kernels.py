"""GPU benchmark of mmeff's Triton kernels (mmeff.kernels) beside fla, mamba-ssm and causal SDPA.

bf16 forward + backward, 65,536 tokens per batch (B = 65536 // T), 16 heads, head dim 64, T = 2k, 8k,
32k. Every problem runs on mmeff's kernels (through mmeff.ops, the path users get) and on its peers:

    linear attention     mmeff linear_attention        fla chunk_linear_attn
    scalar decay         mmeff linear_recurrence        fla chunk_simple_gla
    GLA                  mmeff gated_linear_attention   fla chunk_gla
    delta rule           mmeff delta_rule               fla chunk_delta_rule
    gated delta rule     mmeff gated_delta_rule         fla chunk_gated_delta_rule
    SSD (Mamba-2)        mmeff kernels on SSD           mamba-ssm mamba_chunk_scan_combined
    softmax attention    torch SDPA (causal)

Each row has its time, its modelled FLOPs and bytes (see `cost`) and the fraction they are of an H100's
790 TFLOP/s (bf16 dense) and 3.0 TB/s. A peer that fails to import or refuses to run (fla refuses
chunk_simple_gla / chunk_gated_delta_rule on Hopper with Triton < 3.7.1, its issue #640) gets its error
instead of a time, in the same run. Results are rewritten after every case (markdown, JSON, and a PNG
when matplotlib imports), so a run cut short still leaves them; cases not started within --budget-s are
marked as such. `--plot-only` draws the PNG from a previous run's JSON.

    python benchmarks/kernels.py --warm --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

TOKENS, HEADS, DIM, CHUNK = 65536, 16, 64, 64
PEAK_FLOPS, PEAK_BYTES = 790e12, 3.0e12
NAME = "kernels_h100"
COLORS = {"mmeff": "C1", "fla": "C0", "mamba-ssm": "C2", "torch SDPA": "C3"}  # one color per implementation


@dataclass
class Row:
    """One measured case."""

    problem: str
    impl: str
    T: int
    fwd_ms: Optional[float] = None
    total_ms: Optional[float] = None
    gflop: Optional[float] = None
    gbyte: Optional[float] = None
    note: str = ""


def cost(problem: str, T: int) -> Tuple[float, float]:
    """Modelled (FLOPs, bytes) of one forward + backward.

    Chunked recurrences (chunk C, key K, value V, per token and head): forward 4KV + 2C(K+V) FLOPs (state
    update, inter-chunk output, intra-chunk scores and output, full C x C tiles); the delta rule adds
    2KV + 4CK + 2CV + 2C^2/3 (v~ = u - w h, k k^T, w, u, the triangular solve); forward + backward = 3x
    forward (backward about twice the forward, states recomputed). Bytes: q, k, v, gates read and o written
    forward; q, k, v, gates, do read and dq, dk, dv, dgates written backward (bf16; gates fp32); the chunk
    states written and read once forward and twice backward (recomputed states, state gradients).
    Causal SDPA: forward 2 T D FLOPs per token and head, forward + backward 3.5x; bytes q, k, v, o forward,
    q, k, v, o, do, dq, dk, dv backward.
    """
    n, K = TOKENS * HEADS, DIM
    V = C = DIM
    if problem == "softmax attention":
        return 3.5 * 2 * T * K * n, 12 * n * K * 2
    fwd = 4 * K * V + 2 * C * (K + V)
    if "delta" in problem:
        fwd += 2 * K * V + 4 * C * K + 2 * C * V + 2 * C * C / 3
    gate_words = {"GLA": K, "scalar decay": 1, "gated delta rule": 1, "SSD (Mamba-2)": 1}.get(problem, 0)
    beta_words = 1 if "delta" in problem else 0
    tensors = (4 + 7) * K * 2  # q, k, v, o forward; q, k, v, do, dq, dk, dv backward
    per_token = tensors + 4 * gate_words * 4 + 2 * beta_words * 2
    states = 6 * K * V * 2 / C
    return 3 * fwd * n, (per_token + states) * n


def inputs(T: int) -> Dict[str, torch.Tensor]:
    """Random bf16 inputs of the benchmark shape (gates fp32), fresh per T; leaves requiring grad."""
    B = TOKENS // T

    def leaf(*shape: int, fn: Callable = lambda x: x, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return fn(torch.randn(*shape, device="cuda")).to(dtype).requires_grad_()

    return {
        "q": leaf(B, T, HEADS, DIM),
        "k": leaf(B, T, HEADS, DIM, fn=lambda x: F.normalize(x, dim=-1)),
        "v": leaf(B, T, HEADS, DIM),
        "g_key": leaf(B, T, HEADS, DIM, fn=lambda x: F.logsigmoid(x) / 16, dtype=torch.float32),
        "g_head": leaf(B, T, HEADS, fn=lambda x: F.logsigmoid(x + 4), dtype=torch.float32),
        "beta": leaf(B, T, HEADS, fn=torch.sigmoid),
        "dt": leaf(B, T, HEADS, fn=lambda x: F.softplus(x - 4), dtype=torch.float32),
        "A": (-torch.rand(HEADS, device="cuda") - 0.5).requires_grad_(),
        "Bm": leaf(B, T, 1, DIM),
        "Cm": leaf(B, T, 1, DIM),
    }


def cases(x: Dict[str, torch.Tensor]) -> List[Tuple[str, str, Callable[[], torch.Tensor]]]:
    """(problem, implementation, forward) for every row; peers are imported when their row runs."""
    from mmeff import ops

    q, k, v, g_key, g_head, beta = (x[n] for n in ("q", "k", "v", "g_key", "g_head", "beta"))

    def fla(module: str, name: str, *args: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: getattr(__import__(f"fla.ops.{module}", fromlist=[name]), name)(*args)[0]

    def mmeff_ssd() -> torch.Tensor:
        # mmeff's SSD op casts to fp32 for its reference path; this is its problem on the bf16 kernels.
        heads = x["v"].shape[2]
        log_decay = x["dt"] * x["A"]
        value = x["v"] * x["dt"].to(torch.bfloat16)[..., None]
        cm, bm = x["Cm"].expand(-1, -1, heads, -1), x["Bm"].expand(-1, -1, heads, -1)
        return ops.linear_recurrence(cm, bm, value, log_decay, scale=1.0)[0]

    def mamba() -> torch.Tensor:
        sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        return mamba_chunk_scan_combined(x["v"], x["dt"], x["A"], x["Bm"], x["Cm"], chunk_size=CHUNK)

    sdpa = partial(F.scaled_dot_product_attention, *(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
    rows = [
        ("linear attention", "mmeff", lambda: ops.linear_attention(q, k, v)[0]),
        ("linear attention", "fla", fla("linear_attn", "chunk_linear_attn", q, k, v)),
        ("scalar decay", "mmeff", lambda: ops.linear_recurrence(q, k, v, g_head, scale=DIM**-0.5)[0]),
        ("scalar decay", "fla", fla("simple_gla", "chunk_simple_gla", q, k, v, g_head)),
        ("GLA", "mmeff", lambda: ops.gated_linear_attention(q, k, v, g_key)[0]),
        ("GLA", "fla", fla("gla", "chunk_gla", q, k, v, g_key)),
        ("delta rule", "mmeff", lambda: ops.delta_rule(q, k, v, beta)[0]),
        ("delta rule", "fla", fla("delta_rule", "chunk_delta_rule", q, k, v, beta)),
        ("gated delta rule", "mmeff", lambda: ops.gated_delta_rule(q, k, v, g_head, beta)[0]),
        ("gated delta rule", "fla", fla("gated_delta_rule", "chunk_gated_delta_rule", q, k, v, g_head, beta)),
        ("SSD (Mamba-2)", "mmeff", mmeff_ssd),
        ("SSD (Mamba-2)", "mamba-ssm", mamba),
        ("softmax attention", "torch SDPA", sdpa),
    ]
    # mmeff first: if the time budget cuts a T short, the peers' rows are the ones missing.
    return sorted(rows, key=lambda row: row[1] != "mmeff")


def bench(fn: Callable[[], torch.Tensor], leaves: List[torch.Tensor], reps: int = 10) -> Tuple[float, float]:
    """Median (forward ms, forward + backward ms) after one warm-up call (compilation, autotuning)."""
    fwd, total = [], []
    for i in range(reps + 1):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        events[0].record()
        out = fn()
        events[1].record()
        torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)
        events[2].record()
        torch.cuda.synchronize()
        if i:
            fwd.append(events[0].elapsed_time(events[1]))
            total.append(events[0].elapsed_time(events[2]))
        del out
    return sorted(fwd)[reps // 2], sorted(total)[reps // 2]


def profile(fn: Callable[[], torch.Tensor], leaves: List[torch.Tensor]) -> str:
    """Table of the GPU kernels of one forward + backward (run after bench, so compiled and tuned)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    with profiler(activities=[ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60)


def failure(exc: BaseException) -> str:
    """One-line description of a failed case."""
    text = str(exc).strip().splitlines()
    message = f"{type(exc).__name__}: {text[0][:110] if text else ''}"
    refused = "refuse" in message.lower() or "incorrect results" in message.lower() or "#640" in message
    return ("refused: " if refused else "error: ") + message


def write(rows: List[Row], out_dir: Path, header: str) -> None:
    """Markdown table and JSON of the rows so far, and the plot when matplotlib is there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{NAME}.json").write_text(json.dumps({"header": header, "rows": [asdict(r) for r in rows]}, indent=1))
    lines = [
        "| problem | implementation | T | fwd ms | fwd+bwd ms | GFLOP | GB | % of 790 TFLOP/s | % of 3.0 TB/s | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in sorted(rows, key=lambda r: (r.problem, r.T, r.impl)):
        if r.total_ms is None:
            lines.append(f"| {r.problem} | {r.impl} | {r.T} | | | | | | | {r.note} |")
            continue
        seconds = r.total_ms / 1e3
        flops = 100 * r.gflop * 1e9 / seconds / PEAK_FLOPS
        bandwidth = 100 * r.gbyte * 1e9 / seconds / PEAK_BYTES
        lines.append(
            f"| {r.problem} | {r.impl} | {r.T} | {r.fwd_ms:.2f} | {r.total_ms:.2f} | {r.gflop:.0f} | {r.gbyte:.2f} "
            f"| {flops:.1f} | {bandwidth:.1f} | {r.note} |"
        )
    (out_dir / f"{NAME}.md").write_text(header + "\n".join(lines) + "\n")
    plot(rows, out_dir)


def plot(rows: List[Row], out_dir: Path) -> None:
    """fwd+bwd ms against T, one panel per problem (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator
    except ImportError:
        return
    problems = sorted({r.problem for r in rows})
    fig, axes = plt.subplots(1, len(problems), figsize=(3.2 * len(problems), 3.2), squeeze=False)
    for ax, problem in zip(axes[0], problems):
        for impl in sorted({r.impl for r in rows if r.problem == problem}):
            points = sorted((r.T, r.total_ms) for r in rows if (r.problem, r.impl) == (problem, impl) and r.total_ms)
            if points:
                ax.plot(*zip(*points), marker="o", label=impl, color=COLORS.get(impl))
        ax.set(title=problem, xscale="log", yscale="log", xlabel="T (65,536 tokens per batch)")
        # Ticks at the measured T only, labelled 2k / 8k / 32k; plain numbers on y (log axes default to
        # 2x10^3-style minor labels that overlap).
        Ts = sorted({r.T for r in rows if r.problem == problem})
        ax.set_xticks(Ts, [f"{t // 1024}k" for t in Ts])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 3, 4, 5, 6, 8)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("fwd+bwd ms (bf16, 16 heads x 64)")
    fig.tight_layout()
    fig.savefig(out_dir / f"{NAME}.png", dpi=120)
    plt.close(fig)


def warm(args: argparse.Namespace) -> None:
    """Run every selected row once, each in its own process and all at once, so that the timed run finds every
    kernel compiled in Triton's on-disk cache (a fresh machine otherwise compiles one row after another).
    Autotuning is not cached, so the timed run still tunes each kernel alone on the GPU."""
    x = inputs(min(args.T))
    names = [f"{problem} {impl}" for problem, impl, _ in cases(x)]
    del x
    names = [n for n in names if not args.only or any(s in n for s in args.only)]
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--T", *map(str, args.T), "--only", name, "--reps", "1",
                 "--out-dir", f"{tmp}/{i}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            for i, name in enumerate(names)
        ]  # fmt: skip
        deadline = time.time() + args.warm_s
        for proc in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
    print(f"warm-up: {len(names)} rows compiled in parallel", flush=True)


def main() -> None:
    """Run every case at each T (ascending), writing the results after each one."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--only", nargs="*", help="run only rows whose 'problem implementation' contains one of these")
    p.add_argument("--budget-s", type=float, default=330.0, help="start no case after this many seconds")
    p.add_argument("--plot-only", action="store_true", help="draw the PNG from --out-dir's JSON and exit")
    p.add_argument("--profile", action="store_true", help="also print each case's GPU kernels (torch.profiler)")
    p.add_argument("--warm", action="store_true", help="first compile every row in parallel processes (see warm)")
    p.add_argument("--warm-s", type=float, default=300.0, help="time limit of the parallel warm-up")
    p.add_argument("--reps", type=int, default=10, help="timed calls per row (median)")
    args = p.parse_args()
    if args.plot_only:
        saved = json.loads((args.out_dir / f"{NAME}.json").read_text())
        plot([Row(**r) for r in saved["rows"]], args.out_dir)
        return

    import triton

    import mmeff.kernels

    versions = {"torch": torch.__version__, "triton": triton.__version__}
    for package in ("fla", "mamba_ssm"):
        try:
            if package == "mamba_ssm":
                sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
            versions[package] = getattr(__import__(package), "__version__", "?")
        except Exception as exc:  # noqa: BLE001  (a missing peer is a result to report)
            versions[package] = f"unavailable ({type(exc).__name__})"
    header = (
        f"# Linear-family kernels on the GPU\n\nDevice: {torch.cuda.get_device_name()}; "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f". bf16, {TOKENS} tokens per batch, {HEADS} heads x {DIM}; median of {args.reps} after a warm-up call. FLOPs and "
        "bytes are modelled (benchmarks/kernels.py, `cost`), their % against 790 TFLOP/s and 3.0 TB/s.\n\n"
    )

    # Count the calls that reach mmeff's kernels, so a row on the PyTorch fallback says so.
    kernel_calls = []
    original = mmeff.kernels.linear_recurrence_triton
    mmeff.kernels.linear_recurrence_triton = lambda *a, **kw: kernel_calls.append(1) or original(*a, **kw)

    if args.warm:
        warm(args)
    torch.manual_seed(0)
    start, rows = time.time(), []
    for T in args.T:
        x = inputs(T)
        for problem, impl, fn in cases(x):
            if args.only and not any(s in f"{problem} {impl}" for s in args.only):
                continue
            row = Row(problem, impl, T)
            if time.time() - start > args.budget_s:
                row.note = "not run (time budget)"
            else:
                kernel_calls.clear()
                try:
                    row.fwd_ms, row.total_ms = bench(fn, list(x.values()), args.reps)
                    flops, nbytes = cost(problem, T)
                    row.gflop, row.gbyte = flops / 1e9, nbytes / 1e9
                    if impl == "mmeff" and not kernel_calls:
                        row.note = "PyTorch path, not the Triton kernels"
                    if args.profile:
                        print(f"T={T} {problem} {impl}\n{profile(fn, list(x.values()))}", flush=True)
                except Exception as exc:  # noqa: BLE001  (a peer's failure is a result to report)
                    row.note = failure(exc)
                torch.cuda.empty_cache()
            rows.append(row)
            print(f"T={T:6d} {problem:18s} {impl:11s} {row.total_ms or '':>8} {row.note}", flush=True)
            write(rows, args.out_dir, header)
        del x
    print((args.out_dir / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
