"""GPU benchmark: fwd+bwd time of each linear-family op (chunk form) beside SDPA, fla and mamba-ssm.

65,536 tokens per batch (B = 65536 // T), 16 heads, head dim 64, bf16, on one CUDA device. Peers
that fail to import or to run are reported with their error instead of a time, in the same run.

    python benchmarks/linear_ops.py --out benchmarks/results/linear_ops_h100.md
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from mmeff import ops

HEADS, DIM, TOKENS = 16, 64, 65536


def bench(fn: Callable[[], torch.Tensor], reps: int = 3, warmup: int = 1) -> float:
    """Median milliseconds of fn() forward plus backward of its output, after warm-up runs (compile, autotune)."""
    times = []
    for i in range(reps + warmup):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        out.backward(torch.ones_like(out))
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def inputs(T: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random q, k, v, gates of the benchmark shape, each requiring grad."""
    B, dev = TOKENS // T, "cuda"

    def leaf(*shape: int, fn: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> torch.Tensor:
        return fn(torch.randn(*shape, device=dev)).to(dtype).requires_grad_()

    return {
        "q": leaf(B, T, HEADS, DIM),
        "k": leaf(B, T, HEADS, DIM, fn=lambda x: F.normalize(x, dim=-1)),
        "v": leaf(B, T, HEADS, DIM),
        "g_key": leaf(B, T, HEADS, DIM, fn=lambda x: F.logsigmoid(x) / 16),
        "g_head": leaf(B, T, HEADS, fn=lambda x: F.logsigmoid(x + 4)),
        "beta": leaf(B, T, HEADS, fn=torch.sigmoid),
        "dt": leaf(B, T, HEADS, fn=lambda x: F.softplus(x - 4)),
        "A": (-torch.rand(HEADS, device=dev) - 0.5).requires_grad_(),
        "Bm": leaf(B, T, 1, DIM),
        "Cm": leaf(B, T, 1, DIM),
        "log_decay": torch.log(1 - 2.0 ** (-5 - torch.arange(HEADS, device=dev, dtype=torch.float32))),
    }


def mmeff_cases(x: dict[str, torch.Tensor]) -> dict[str, Callable[[], torch.Tensor]]:
    """mmeff's own chunk path for every op."""
    q, k, v = x["q"], x["k"], x["v"]
    return {
        "linear_attention": lambda: ops.linear_attention(q, k, v)[0],
        "retention": lambda: ops.retention(q, k, v, x["log_decay"])[0],
        "gated_linear_attention": lambda: ops.gated_linear_attention(q, k, v, x["g_key"])[0],
        "delta_rule": lambda: ops.delta_rule(q, k, v, x["beta"])[0],
        "gated_delta_rule": lambda: ops.gated_delta_rule(q, k, v, x["g_head"], x["beta"])[0],
        "ssd": lambda: ops.ssd(v, x["dt"], x["A"], x["Bm"], x["Cm"], backend="triton"),
    }


def peer_cases(x: dict[str, torch.Tensor]) -> dict[str, Callable[[], torch.Tensor]]:
    """SDPA, fla and mamba-ssm on the same shapes (imported lazily; failures become table entries)."""
    q, k, v = x["q"], x["k"], x["v"]
    cases: dict[str, Callable[[], torch.Tensor]] = {
        "sdpa causal": lambda: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        ),
    }

    def fla(module: str, name: str, *args: torch.Tensor) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            fn = getattr(__import__(f"fla.ops.{module}", fromlist=[name]), name)
            return fn(*args)[0]

        return run

    cases["fla chunk_linear_attn"] = fla("linear_attn", "chunk_linear_attn", q, k, v)
    cases["fla chunk_simple_gla"] = fla("simple_gla", "chunk_simple_gla", q, k, v, x["g_head"])
    cases["fla chunk_gla"] = fla("gla", "chunk_gla", q, k, v, x["g_key"])
    cases["fla chunk_delta_rule"] = fla("delta_rule", "chunk_delta_rule", q, k, v, x["beta"])
    cases["fla chunk_gated_delta_rule"] = fla("gated_delta_rule", "chunk_gated_delta_rule", q, k, v, x["g_head"], x["beta"])

    def mamba() -> torch.Tensor:
        sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        return mamba_chunk_scan_combined(v, x["dt"], x["A"], x["Bm"], x["Cm"], chunk_size=64)

    cases["mamba-ssm ssd"] = mamba
    return cases


def main() -> None:
    """Run every case at each T and write a markdown table."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--T", type=int, nargs="+", default=[2048, 8192, 32768, 65536])
    p.add_argument("--out", type=Path)
    p.add_argument("--only", nargs="*", help="run only cases whose name contains one of these")
    args = p.parse_args()
    torch.manual_seed(0)
    rows: dict[str, dict[int, str]] = {}
    import triton

    head = (
        f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}; "
        f"bf16, fwd+bwd ms (median of 3 after a warm-up), {TOKENS} tokens per batch, {HEADS} heads x {DIM}.\n\n"
    )

    def table() -> str:
        text = "| op | " + " | ".join(f"T={T}" for T in args.T) + " |\n|---|" + "---:|" * len(args.T) + "\n"
        return head + text + "".join(f"| {n} | " + " | ".join(r.get(T, "") for T in args.T) + " |\n" for n, r in rows.items())

    for T in args.T:
        x = inputs(T, torch.bfloat16)
        cases = {f"mmeff {n}": f for n, f in mmeff_cases(x).items()} | peer_cases(x)
        for name, fn in cases.items():
            if args.only and not any(s in name for s in args.only):
                continue
            try:
                cell = f"{bench(fn):.2f}"
            except Exception as e:  # noqa: BLE001  (a peer's failure is a result to report)
                cell = f"error: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
            torch.cuda.empty_cache()
            rows.setdefault(name, {})[T] = cell
            print(f"T={T:6d} {name:30s} {cell}", flush=True)
            if args.out:  # after every case, so a run cut short still leaves its table
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(table())
    print(table())


if __name__ == "__main__":
    main()
