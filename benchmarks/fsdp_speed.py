"""FSDP2 on one rank (what `trainer.strategy: fsdp` applies: mmeff.strategies.shard_model, one unit per backbone
layer, bf16 parameters, fp32 gradient reduce) against plain single-device training of the same LM: tokens/s and peak
GPU memory, with and without activation checkpointing (`backbone.checkpoint`) and CPU offload (`trainer.fsdp.cpu_offload`).

Models (`--models`): `lm_gla` and `lm_attn`, the 12-layer width-1024 byte LMs of lm_train_speed.py (SwiGLU 2736);
`hybrid_1b`, [gla, gla, gla, attn] at width 2048, 24 layers, SwiGLU 5472 (1.2B parameters; gla 8 heads with K 128,
V 256; attn 32 heads of 64). Variants (`--variants`):
- `plain`: the model on the device, fp32 weights under bf16 autocast, fused AdamW (the peer: no FSDP);
- `fsdp`, `fsdp_ckpt`, `fsdp_offload`, `fsdp_ckpt_offload`: the model sharded over a one-rank world (nccl), no
  autocast (FSDP's policy casts), AdamW fused on the device, foreach on the CPU when offloaded (its optimizer
  step then runs on the CPU, as FSDP2's offload does).
One step = forward, next-token cross-entropy, backward, AdamW on B x T tokens (B = max(1, --tokens // T)); median of
`--iters` steps after `--warmup`; peak = torch.cuda.max_memory_allocated over the timed steps (the offloaded shards,
gradients and optimizer state live in host memory and are not counted).

Records (JSON): model, variant, checkpoint, offload, T, B, params_m, tok_s, ms, peak_gib, vs_plain (tok/s over the
plain row of the same model and T), loss0 (the loss of the untrained model on the step's tokens, before timing: the
same weights and tokens in every variant, so the variants agree to bf16 rounding, a check that the sharded Triton
mixers compute what the plain ones do), note; merged into `--out`.{md,json} (default benchmarks/results/fsdp_<device>)
by (model, variant, T), both files rewritten after every record.

    MMEFF_TRITON_PIN=1 TRITON_CACHE_AUTOTUNING=1 python benchmarks/fsdp_speed.py --T 4096
    python benchmarks/fsdp_speed.py --device cpu --out /tmp/fsdp_smoke   # tiny sizes: every variant builds and steps
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from lm_train_speed import REAL, SMOKE, Shape, autocast, run_config, train_step, versions  # beside this script
from mmeff.config import FSDPConfig
from mmeff.strategies import shard_model
from mmeff.tasks import build_model
from timing import device_tag, error_note, free, median_ms, run_id, write_results

MODELS: dict[str, tuple[str, Shape]] = {  # name: (lm_train_speed row, shape)
    "lm_gla": ("gla", REAL),
    "lm_attn": ("attn", REAL),
    "hybrid_1b": ("hybrid_gla", replace(REAL, dim=2048, depth=24, ffn_hidden=5472)),
}
SMOKE_MODELS = {name: (row, SMOKE) for name, (row, _) in MODELS.items()}
VARIANTS = {  # name: (FSDP, activation checkpointing, CPU offload)
    "plain": (False, False, False),
    "fsdp": (True, False, False),
    "fsdp_ckpt": (True, True, False),
    "fsdp_offload": (True, False, True),
    "fsdp_ckpt_offload": (True, True, True),
}
DEFAULT_MODELS = ["lm_gla", "hybrid_1b"]


def init_world(device: torch.device) -> Any:
    """A one-rank process group (nccl on CUDA, gloo on the CPU) and its device mesh."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return init_device_mesh(device.type, (1,))


def measure(model_name: str, variant: str, T: int, models: dict[str, tuple[str, Shape]], mesh: Any,
            args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One record: `model_name` trained as `variant` at length T."""
    row, shape = models[model_name]
    sharded, ckpt, offload = VARIANTS[variant]
    B = max(1, args.tokens // T)
    record: dict[str, Any] = {"model": model_name, "variant": variant, "checkpoint": ckpt, "offload": offload, "T": T, "B": B}
    try:
        cfg = run_config(row, shape, T)
        cfg.backbone.checkpoint = ckpt
        torch.manual_seed(0)
        model = build_model(cfg)
        record["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        if sharded:
            shard_model(model, mesh, FSDPConfig(cpu_offload=offload))
            precision = contextlib.nullcontext  # FSDP's mixed-precision policy casts weights and inputs itself
        else:
            model.to(device)
            precision = None  # train_step's default: bf16 autocast on CUDA
        on_device = device.type == "cuda" and not offload
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=on_device or None, foreach=None if on_device else True)
        tokens = torch.randint(0, cfg.encoder.vocab_size, (B, T + 1), device=device)
        with torch.no_grad(), (precision or (lambda: autocast(device)))():
            logits = model(tokens[:, :-1]).float()
        record["loss0"] = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()
        logits = None
        step = train_step(model, lambda x, docs: model(x, docs=docs), tokens, None, opt, precision)
        ms, peak = median_ms(step, device, args.warmup, args.iters)
        record.update(tok_s=B * T / (ms / 1e3), ms=ms, peak_gib=peak)
    except Exception as e:  # noqa: BLE001 - a row that cannot run (out of memory, ...) is noted, the others go on
        record["note"] = error_note(e)
    model = opt = step = None  # noqa: F841 - dropped before the next row is built
    free(device)
    return record


def relate(records: list[dict[str, Any]]) -> None:
    """vs_plain of each record: its tok/s over the plain row of the same model and T."""
    plain = {(r["model"], r["T"]): r.get("tok_s") for r in records if r["variant"] == "plain"}
    for r in records:
        base = plain.get((r["model"], r["T"]))
        r["vs_plain"] = r["tok_s"] / base if base and r.get("tok_s") else None


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


def table(records: list[dict[str, Any]]) -> str:
    """The markdown table of `records`, headed by the runs' device, versions and commands."""
    runs = {(r["device"], r["versions"], r["command"]) for r in records}
    lines = [f"# FSDP2 on one rank vs plain training: {', '.join(sorted({d for d, _, _ in runs}))}", ""]
    lines += [f"- {d}; {v}; `{c}`" for d, v, c in sorted(runs)]
    lines += ["", "| model | params (M) | variant | checkpoint | offload | T | B | tok/s | vs plain | ms/step | peak GiB | loss0 | note |",
              "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in records:
        lines.append(
            f"| {r['model']} | {_num(r.get('params_m'), '{:,.1f}')} | {r['variant']} | {'yes' if r['checkpoint'] else 'no'} | "
            f"{'yes' if r['offload'] else 'no'} | {r['T']} | {r['B']} | {_num(r.get('tok_s'), '{:,.0f}')} | "
            f"{_num(r.get('vs_plain'), '{:.2f}')} | {_num(r.get('ms'), '{:,.1f}')} | {_num(r.get('peak_gib'), '{:.1f}')} | "
            f"{_num(r.get('loss0'), '{:.4f}')} | {r.get('note', '')} |"
        )  # fmt: skip
    return "\n".join(lines) + "\n"


def write(records: list[dict[str, Any]], out: Path) -> None:
    """<out>.json and .md of `records` (each file replaced whole)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    models, variants = list(MODELS), list(VARIANTS)
    records.sort(key=lambda r: (models.index(r["model"]), r["T"], variants.index(r["variant"])))
    write_results(out, {"records": records}, table(records))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (`argv`, default sys.argv[1:])."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=DEFAULT_MODELS, help="models to run")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="variants to run")
    p.add_argument("--T", type=int, nargs="+", help="sequence lengths (default 4096; cpu: 64)")
    p.add_argument("--tokens", type=int, help="tokens per step: B = max(1, tokens // T) (default 16384; cpu: 128)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: tiny sizes on gloo (a smoke test)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (autotuning)")
    p.add_argument("--iters", type=int, default=5, help="timed steps; the median counts")
    p.add_argument("--out", type=Path, help="path stem of .md/.json (default benchmarks/results/fsdp_<device>)")
    args = p.parse_args(argv)
    args.tokens = args.tokens or (SMOKE.tokens if args.device == "cpu" else REAL.tokens)
    args.T = args.T or ([64] if args.device == "cpu" else [4096])
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fsdp_speed: no CUDA device; --device cpu runs the tiny smoke sizes")
    if device.type == "cuda":
        torch.cuda.set_device(0)
    models = SMOKE_MODELS if device.type == "cpu" else MODELS
    out = args.out or Path(__file__).parent / "results" / f"fsdp_{device_tag(device)}"
    out = out.with_suffix("") if out.suffix in (".md", ".json") else out
    records = json.loads(out.with_suffix(".json").read_text())["records"] if out.with_suffix(".json").is_file() else []
    run = {"run": run_id(records), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "versions": versions(), "command": " ".join(["python", *sys.argv])}  # fmt: skip
    print(f"{run['device']}: writing {out}.{{md,json}}", flush=True)
    mesh = init_world(device)
    try:
        for model_name in args.models:
            for T in args.T:
                for variant in args.variants:
                    print(f"{model_name}, T {T}, {variant}: measuring", flush=True)
                    record = {**measure(model_name, variant, T, models, mesh, args, device), **run}
                    key = (model_name, variant, T)
                    records = [r for r in records if (r["model"], r["variant"], r["T"]) != key] + [record]
                    relate(records)
                    write(records, out)
                    print(json.dumps({k: record.get(k) for k in ("model", "variant", "T", "tok_s", "vs_plain", "peak_gib", "loss0", "note")}),
                          flush=True)  # fmt: skip
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
