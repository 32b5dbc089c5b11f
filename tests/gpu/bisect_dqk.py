"""Bisect _bwd_dqk_kernel's configs on the GPU: one (kind, K, V, config) per process, its errors against the reference.

    python tests/gpu/bisect_dqk.py            # every case, 8 processes at a time; prints one JSON line per case
A config that miscompiles can corrupt the CUDA context, so each case runs alone (the way the 4-warp GLA and WY
miscompiles were found, benchmarks/results/kernels_notes.md).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [(8, 2), (4, 2), (2, 2)]
SHAPES = [(128, 32), (256, 32), (64, 64)]
KINDS = ["linear_attention", "scalar_decay", "gla", "delta_rule", "gated_delta_rule"]


def one(kind: str, dk: int, dv: int, warps: int, stages: int) -> dict:
    """Errors of one case (in this process)."""
    import torch
    import triton

    sys.path.insert(0, str(ROOT / "tests" / "kernels"))
    from kernel_cases import compare, forward_backward, make_inputs, norm_error

    from mmeff import kernels
    from mmeff.kernels import chunk_o
    from mmeff.ops.recurrence import linear_recurrence

    chunk_o._bwd_dqk_kernel.fn.configs = [triton.Config({}, num_warps=warps, num_stages=stages)]  # the autotuner
    inputs = make_inputs(kind, 1, 3000, 4, dk, dv, dtype=torch.bfloat16, device="cuda", seed=dk * 7 + dv)
    got = forward_backward(kernels.linear_recurrence_triton, inputs)
    os.environ["MMEFF_FORCE_REFERENCE"] = "1"
    ref = forward_backward(linear_recurrence, inputs, upcast=True)
    torch.cuda.synchronize()
    return {k: round(float(v), 5) for k, v in compare(got, ref, norm_error).items()}


def main() -> None:
    if len(sys.argv) > 1:
        kind, dk, dv, warps, stages = sys.argv[1], *map(int, sys.argv[2:6])
        print(json.dumps(one(kind, dk, dv, warps, stages)))
        return
    cases = list(itertools.product(KINDS, SHAPES, CONFIGS))

    def run(case):
        kind, (dk, dv), (warps, stages) = case
        env = {**os.environ, "MMEFF_TRITON_PIN": "1", "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
        cmd = [sys.executable, __file__, kind, str(dk), str(dv), str(warps), str(stages)]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        out = p.stdout.strip().splitlines()[-1] if p.returncode == 0 and p.stdout.strip() else f"FAILED rc={p.returncode} {p.stderr.strip()[-200:]!r}"
        line = json.dumps({"kind": kind, "K": dk, "V": dv, "warps": warps, "stages": stages, "errors": out})
        print(line, flush=True)
        return line

    with ThreadPoolExecutor(8) as pool:
        lines = list(pool.map(run, cases))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bisect_dqk.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
