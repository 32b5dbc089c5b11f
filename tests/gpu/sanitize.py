"""Every Triton kernel of mmeff.kernels once, at small awkward sizes, for `compute-sanitizer` (not a pytest file).

    compute-sanitizer --tool memcheck --print-limit 50 python tests/gpu/sanitize.py          # pinned configs
    compute-sanitizer --tool memcheck --print-limit 50 python tests/gpu/sanitize.py --unpinned  # tuned: every kept config
    compute-sanitizer --tool initcheck python tests/gpu/sanitize.py --only recurrence          # unwritten reads

Sizes are chosen for the edges where out-of-bounds tiles hide: sequence tails (T not a multiple of the chunk),
key/value widths that are not powers of two, chunk sizes 16 / 32 / 64 (the WY inverse's partial blocks),
packed sequences of 0, 1, 63, 64 and 65 tokens, sub-64-token chunks of GLA's sub-chunk kernels (strong and mild
gates: both of its paths). PyTorch's caching allocator is switched off (PYTORCH_NO_CUDA_MEMORY_CACHING=1) so
that an access past one tensor is not hidden inside the next one of the same cached segment. Each case syncs
and prints its name, so the sanitizer's report lines fall under the case that caused them; the verdict is the
sanitizer's "ERROR SUMMARY". `--flex` adds each sparse mixer's FlexAttention block (compiles: minutes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")  # before CUDA starts
os.environ.setdefault("MMEFF_TRITON_PIN", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "kernels")]

import torch  # noqa: E402
from kernel_cases import KINDS, forward_backward, make_inputs  # noqa: E402


def recurrence_cases() -> dict[str, Callable[[], object]]:
    """Forward and backward of every recurrence kind through the chunk kernels, and the fused recurrent kernel."""
    from mmeff import kernels

    cases: dict[str, Callable[[], object]] = {}
    packed = torch.tensor([0, 1, 64, 64, 127, 192, 257], dtype=torch.int32, device="cuda")  # 1, 63, 0, 63, 65, 65
    for kind in KINDS:
        gates = ["strong", "mild"] if kind == "gla" else ["strong"]
        for dtype in (torch.bfloat16, torch.float32):
            for gate in gates:
                for chunk in (64, 32, 16):
                    name = f"{kind}-{str(dtype)[6:]}-{gate}-chunk{chunk}"
                    inputs = make_inputs(kind, 2, 200, 3, 48, 40, dtype=dtype, device="cuda", gates=gate)
                    cases[name] = lambda i=inputs, c=chunk: forward_backward(kernels.linear_recurrence_triton, i, chunk_size=c)
            inputs = make_inputs(kind, 1, 257, 3, 48, 40, dtype=dtype, device="cuda", num_states=6)
            cases[f"{kind}-{str(dtype)[6:]}-packed"] = lambda i=inputs: forward_backward(kernels.linear_recurrence_triton, i, cu_seqlens=packed)
        for dk, dv in ((256, 32), (128, 256), (20, 100)):  # the widest keys, wide values, small odd widths
            inputs = make_inputs(kind, 1, 130, 2, dk, dv, dtype=torch.bfloat16, device="cuda")
            cases[f"{kind}-bf16-K{dk}-V{dv}"] = lambda i=inputs: forward_backward(kernels.linear_recurrence_triton, i)
        for delta in (False, True):  # fused recurrent (no gradients, short sequences), per-key decay with delta too
            inputs = make_inputs(kind, 1, 257, 3, 48, 40, dtype=torch.bfloat16, device="cuda", num_states=6)
            if delta:
                inputs["beta"] = torch.rand(1, 257, 3, device="cuda")
            short = torch.tensor([0, 1, 17, 17, 30], dtype=torch.int32, device="cuda")
            sliced = {n: None if t is None else (t[:4] if n == "initial_state" else t[:, :30]) for n, t in inputs.items()}

            def fused(i=sliced, c=short):
                with torch.no_grad():
                    return kernels.linear_recurrence_triton(**i, output_final_state=True, cu_seqlens=c)

            cases[f"{kind}{'+beta' if delta else ''}-fused-recurrent"] = fused
    return cases


def conv_cases() -> dict[str, Callable[[], object]]:
    """The short convolution, forward and backward: tails in both T and C, every width, with and without bias."""
    from mmeff.kernels.conv import CausalConv

    cases: dict[str, Callable[[], object]] = {}
    for batch, seqlen, channels, width in ((2, 70, 130, 4), (1, 3, 24, 4), (3, 65, 8, 2), (1, 129, 300, 3)):
        for bias in (True, False):
            def run(b=batch, t=seqlen, c=channels, w=width, with_bias=bias):
                x = torch.randn(b, t, c, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                weight = torch.randn(c, w, device="cuda", requires_grad=True)
                bias_ = torch.randn(c, device="cuda", requires_grad=True) if with_bias else None
                CausalConv.apply(x, weight, bias_, with_bias).float().sum().backward()

            cases[f"conv-B{batch}-T{seqlen}-C{channels}-W{width}{'-bias' if bias else ''}"] = run
    return cases


def moe_cases() -> dict[str, Callable[[], object]]:
    """Dispatch, combine and SwiGLU, forward and backward, widths off the 1024-column block."""
    from mmeff.kernels import moe
    from mmeff.ops import grouped

    cases: dict[str, Callable[[], object]] = {}
    for tokens, k, dim in ((33, 3, 40), (5, 1, 8), (300, 2, 1030)):
        def run(n=tokens, k=k, d=dim):
            experts = torch.randint(0, 4, (n, k), device="cuda")
            order, inv = grouped.sort_assignments(experts)
            x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            rows = moe.Dispatch.apply(x, order, inv, k)
            h = moe.SwiGLU.apply(torch.cat([rows, rows], -1))
            weights = torch.rand(n, k, device="cuda", requires_grad=True)
            moe.Combine.apply(h, order, inv, weights).float().sum().backward()

        cases[f"moe-N{tokens}-k{k}-D{dim}"] = run
    return cases


def flex_cases() -> dict[str, Callable[[], object]]:
    """Each sparse mixer's block (FlexAttention) and the MoE block, small, forward and backward."""
    import mmeff.blocks as blocks

    cases: dict[str, Callable[[], object]] = {}
    for name in ("sliding", "longformer", "sink", "bigbird", "dilated", "block_topk", "attn"):
        for causal in (True, False):
            if name == "sink" and not causal:
                continue

            def run(n=name, c=causal):
                options = {"window": 64} if n in ("sliding", "longformer", "sink", "bigbird") else {}
                block = blocks.build(n, 128, causal=c, **options).cuda()
                x = torch.randn(2, 300, 128, device="cuda", requires_grad=True)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    block(x).float().sum().backward()

            cases[f"block-{name}-{'causal' if causal else 'bidirectional'}"] = run
    return cases


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="run the cases whose name contains this (e.g. gla, conv, moe, packed)")
    p.add_argument("--unpinned", action="store_true",
                   help="autotune: every config a kernel's prune keeps runs (single configs alone: tests/gpu/bisect_dqk.py)")
    p.add_argument("--flex", action="store_true", help="also the FlexAttention blocks of the sparse mixers")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sanitize.py needs a CUDA device")
    from mmeff.kernels import utils

    utils.pin_configs(not args.unpinned)
    utils.POISON = True
    torch.manual_seed(0)
    cases = {**recurrence_cases(), **conv_cases(), **moe_cases(), **(flex_cases() if args.flex else {})}
    failed = []
    for name, case in cases.items():
        if args.only not in name:
            continue
        start = time.time()
        print(f"--- {name}", flush=True)
        try:
            case()
            torch.cuda.synchronize()
        except Exception as e:  # report each failing case and go on; a sticky CUDA error ends the run
            failed.append(name)
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            if "CUDA" in str(e):
                break
        print(f"    {time.time() - start:.1f}s", flush=True)
    print(f"{len(failed)} failed{': ' + ', '.join(failed) if failed else ''}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
