"""Training throughput of a 12-layer, width-1024 text LM on the GPU: gla / mamba2 / gated_deltanet vs attn at long T.

Each model: byte vocabulary, SwiGLU, fp32 weights under bf16 autocast, AdamW; one step = forward, next-token
loss, backward, optimizer step on B x T tokens. Median of `--iters` steps after `--warmup`. `--compile` runs every
model through torch.compile. `--profile` adds, per row, where one step's GPU time goes: matmuls, softmax attention,
the recurrence kernels (mmeff's or mamba-ssm's), short convolutions, the optimizer, and the rest (norms,
activations, casts, copies). The share both models pay alike bounds the speed-up a mixer can bring. `--docs 0 8`
runs each row unpacked (0: no document boundaries) and with that many packed documents per sequence (varlen: the
layout's cu_seqlens reach every mixer). `--out` is rewritten after every row, so a run cut short keeps its rows.

    python benchmarks/lm_train_speed.py --T 16384 32768 65536 --mixers attn gla --profile --out DIR/lm.md
    python benchmarks/lm_train_speed.py --T 16384 --mixers attn gla mamba2 --docs 0 8 --out DIR/varlen.md
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from mmeff import config
from mmeff.tasks.lm import LanguageModel
from timing import cuda_median_ms  # benchmarks/timing.py, beside this script

# Mixer options per row name; "type" names the block where the row is a variant of one.
MIXERS = {
    "attn": {"heads": 16},
    "gla": {"heads": 4},
    "gla_16heads": {"type": "gla", "heads": 16},
    "mamba2": {},  # mmeff.ops.ssd's auto backend: mamba-ssm's kernels where it imports
    "mamba2_mmeff": {"type": "mamba2", "backend": "triton"},  # mmeff's own SSD kernels
    "gated_deltanet": {"heads": 8},
}


def build(mixer: str, dim: int, depth: int, seq_len: int) -> LanguageModel:
    """A causal byte-level LM whose every layer is `mixer`."""
    cfg = config.parse(
        {
            "name": f"speed_{mixer}",
            "encoder": {"name": "text", "tokenizer": "byte", "seq_len": seq_len},
            "backbone": {"dim": dim, "pattern": [mixer], "depth": depth, "causal": True, "ffn": "swiglu",
                         "mixers": {mixer: MIXERS[mixer]}},
            "task": {"name": "lm"},
        }
    )
    return LanguageModel(cfg).cuda()


def train_step(model: torch.nn.Module, tokens: torch.Tensor, docs: torch.Tensor | None = None) -> Callable[[], None]:
    """One training step of `model` on `tokens` [B, T + 1] (AdamW, bf16 autocast), packed as `docs` when given."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(tokens[:, :-1], docs=docs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def mmeff_kernels() -> set[str]:
    """Names of mmeff's recurrence kernels (as the profiler lists them); the conv and MoE kernels are not."""
    import triton

    import mmeff.kernels  # noqa: F401  (imports every kernel module)

    names = set()
    for name, module in sys.modules.items():
        if name.startswith("mmeff.kernels") and name not in ("mmeff.kernels.conv", "mmeff.kernels.moe"):
            for obj in vars(module).values():
                while hasattr(obj, "fn") and not isinstance(obj, triton.runtime.JITFunction):
                    obj = obj.fn  # autotuners and heuristics wrap the JITFunction
                if isinstance(obj, triton.runtime.JITFunction):
                    names.add(obj.__name__)
    return names


CATEGORIES = [  # first match wins; the rest is "other"
    # cuDNN's SDPA runs helper kernels named cudnn::fusion::... beside its flash kernels.
    ("softmax attention", re.compile(r"flash|fmha|attention|sdpa|cudnn::fusion", re.I)),
    # The mixers' short depthwise convolutions: mmeff's kernels, or F.conv1d's native, cuDNN or implicit-GEMM ones.
    ("conv", re.compile(r"_conv_(fwd|bwd)_kernel|conv(?!ert)|cudnn|fprop|dgrad|wgrad", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|wgmma|sm90_|sm80_", re.I)),
    ("optimizer", re.compile(r"multi_tensor|adam|foreach", re.I)),
    ("recurrence kernels", re.compile(r"^_(chunk_scan|chunk_state|state_passing|bmm_chunk|chunk_cumsum)")),  # mamba-ssm
]


def breakdown(step: Callable[[], None], ours: set[str]) -> dict[str, float]:
    """GPU milliseconds of one step per kernel category (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    ms: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA or event.self_device_time_total <= 0:
            continue
        name = event.key
        kind = "recurrence kernels" if name in ours else next((k for k, rx in CATEGORIES if rx.search(name)), "other")
        ms[kind] += event.self_device_time_total / 1e3
    return ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[16384])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--mixers", nargs="+", default=list(MIXERS), choices=list(MIXERS), help="the first is the reference of 'vs'")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--docs", type=int, nargs="+", default=[0], help="packed documents per sequence (0: no boundaries)")
    p.add_argument("--profile", action="store_true", help="add the GPU time per kernel category of one step")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    ours = mmeff_kernels() if args.profile else set()
    kinds = ["matmul", "softmax attention", "recurrence kernels", "conv", "optimizer", "other"]
    columns = ["mixer", "params", "T", "docs", "ms / step", "tokens/s", f"vs {args.mixers[0]}", "peak GiB"]
    columns += [f"{k} ms" for k in kinds] if args.profile else []
    rows, base = [], {}
    for T, mixer, ndocs in itertools.product(args.T, args.mixers, args.docs):
        torch.manual_seed(0)
        model = build(mixer, args.dim, args.depth, T)
        params = sum(q.numel() for q in model.parameters()) / 1e6
        tokens = torch.randint(0, 256, (args.batch, T + 1), device="cuda")
        docs = None if not ndocs else (torch.arange(T, device="cuda") * ndocs // T).expand(args.batch, T)
        step = train_step(torch.compile(model) if args.compile else model, tokens, docs)
        try:
            ms, gib = cuda_median_ms(step, args.warmup, args.iters)
            split = breakdown(step, ours) if args.profile else {}
        except torch.cuda.OutOfMemoryError:
            rows.append(f"| {mixer} | {params:.0f}M | {T} | {ndocs} | OOM |" + " |" * (len(columns) - 5))
            continue
        finally:
            del model, step
            torch.cuda.empty_cache()
        tok_s = args.batch * T / ms * 1e3
        base.setdefault(T, tok_s)  # the first row is the reference
        cells = "".join(f" {split.get(k, 0.0):.1f} |" for k in kinds) if args.profile else ""
        rows.append(
            f"| {mixer} | {params:.0f}M | {T} | {ndocs} | {ms:.0f} | {tok_s:,.0f} | {tok_s / base[T]:.2f}x | {gib:.1f} |{cells}"
        )
        print(rows[-1], flush=True)
        if args.out:
            args.out.write_text(f"Command: `python {' '.join(sys.argv)}`\n\n{table(args, columns, rows)}\n")
    print(table(args, columns, rows))


def table(args: argparse.Namespace, columns: list[str], rows: list[str]) -> str:
    """The markdown table of the rows so far, under a line naming the device and the setting."""
    return "\n".join(
        [
            f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.depth} layers, width {args.dim}, batch "
            f"{args.batch}, bf16 autocast, AdamW{', torch.compile' if args.compile else ''}; median of {args.iters} steps.",
            "",
            "| " + " | ".join(columns) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|",
            *rows,
        ]
    )


if __name__ == "__main__":
    main()
