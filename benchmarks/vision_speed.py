"""Training speed of ViT-S/16-shaped backbones: timm's ViT against every bidirectional mmeff token mixer, images and audio.

One step = forward, cross-entropy over 1,000 classes, backward, fused AdamW; bf16 autocast, fp32 weights. Width 384,
depth 12, 6 heads, patch 16, 3 channels, MLP ratio 4, LayerNorm, mean pooling; about 65k tokens per step: batch
256 / 64 / 16 / 4 at 224 / 512 / 1024 / 2048 px. `--px audio` is an AST-shaped input: a 10 s clip, 128 mel bins x
1,000 frames, 16x16 patches at stride 10 (12 x 99 = 1,188 tokens), batch 55.

Rows (`--rows`; a mixer's name selects all its scan rows):
- `timm`: timm.create_model("vit_small_patch16_224", img_size=px, num_classes=1000, global_pool="avg",
  class_token=False): mean pooling over the same 196 / 1,024 / ... tokens as mmeff (timm's default class token and
  token pooling would add one token); for audio the same ViT with AST's strided patch conv. Added to every run: the
  other rows' `vs_timm` is their img/s over timm's in the same process.
- mmeff, built by `mmeff.tasks.build_model` from a RunConfig (image or audio encoder + Backbone + classify head:
  what `mmeff fit` trains): `attn` (the ViT's layer: GELU MLP, LayerNorm, qkv bias), `sliding` (window 256),
  `block_topk`, `<mixer>-bi` / `<mixer>-cross` (`scan: bi` / `scan: cross`) for linear_attn, gla, retnet, mamba2,
  gated_deltanet and `hybrid` ([gla, gla, gla, attn]), and `linear_attn-global` (`scan: global`: the non-causal
  form, no scan); `linear_attn-global+local` and `gla-bi+local` add `local_conv: 3` (a 3x3 depthwise conv of v over
  the grid). `+ckpt` after any mmeff row (`mamba2-bi+ckpt`) sets `backbone.checkpoint: true` (each layer's
  activations recomputed in the backward instead of kept), `+ckpt_mixer` sets `backbone.checkpoint: mixer` (the token
  mixer's only), `+ckpt_norm` sets `backbone.checkpoint: norm` (the pre-norms' outputs only: the default, which a
  row without a suffix takes), `+no_ckpt` sets `backbone.checkpoint: false`. `+groups` after a scan
  row (`gated_deltanet-bi+groups`, before any `+ckpt...`) sets `scan_tokens: 32768` (GROUP_TOKENS): the batch's
  sequences run their routes in groups of at most that many route-stacked tokens, one group's backward at a time.
  `+no_recurrence` after a linear-recurrence row (`gla-bi+no_recurrence`, after any `+groups`, before any `+ckpt...`)
  replaces each mixer's recurrence by a stand-in (`no_recurrence`): the step without the recurrence's kernels, at
  the row's own FLOP count, so its `of ceiling` is the most a faster recurrence kernel could give that row.
  `+routes` after a `-bi` row (`gla-bi+routes`, before any `+no_recurrence` or `+ckpt...`) runs `scan: bi` on the
  scan routes where one op would take both directions (`ScanMixer.both_routes`; GLA: mmeff.ops.bidirectional_gla),
  so that both forms are timed in one process.

Per record (JSON): row, px, tokens, batch, img_s, ms (median step), peak_gib, vs_timm, compiled, graphs, params_m,
flops_per_img (matmul and attention FLOPs of one forward + backward, counted by torch's FlopCounterMode on the
plain-PyTorch references, MMEFF_FORCE_REFERENCE=1, since it cannot see inside Triton kernels; sliding and
block_topk references compute dense scores, so theirs is the dense count), floor_ms (those FLOPs for the batch at
the bf16 matmul rate measured in the same run), ceiling_img_s (the FLOP-matched ceiling: timm's img/s x timm's
FLOPs / the row's FLOPs) and note (OOM, errors, the row limit). A row's FLOPs are counted once: a later run takes
them from an earlier record of the same row, size and parameter count (the references take minutes at 2048 px);
`--recount` counts again. `--row-limit S` ends a row that runs past S seconds (its record notes it) and goes on
with the next (the mamba2 rows need more than 90 s on a fresh H200 where mamba-ssm is installed: its kernels
autotune in their first step; runs 33 and 35 stopped there). `--compile` runs every model, timm's too, through torch.compile
(nn.Module.compile, as `trainer.compile: true`); `--compile reduce-overhead` (or another torch.compile mode) in that
mode, as `trainer.compile: reduce-overhead` (record field `compile_mode`; the tables' mode `compiled-reduce-overhead`).
`--graphs` replays each model's forward and backward as CUDA graphs
through mmeff.tasks.graphs.GraphedTraining, what `trainer.cuda_graphs: true` runs (torch.cuda.make_graphed_callables;
the optimizer step stays eager), timm's too: the step without the host's per-kernel launch cost, which the eager
mmeff rows pay for their many small kernels (record field `graphs`). Results merge into benchmarks/results/vision_speed_<device>.{md,json,png}
by (row, px, compiled, graphs), written after every row, so a run cut short keeps its rows and several runs (eager,
`--compile`, a few sizes at a time) build one table.

`--backend OP=NAME` (repeatable) pins an mmeff op's backend for every mmeff row of the run, e.g.
`--backend depthwise_conv2d=torch` (cuDNN instead of mmeff's grid-conv kernel); those rows are recorded as
`row[OP=NAME]`, beside the default rows, against the same run's timm row: an in-step A/B of one op's implementations.
`--chunk-size N` builds the scan mixers with chunks of N tokens (default 64; a 224 px image's 196 tokens fill 4
chunks of 64 to 77%, 7 of 32 to 88%); those rows are recorded as `row[chunk_size=N]`.

`--memory` writes each row's allocator history over one step (memory_<row>_<px>.pickle beside the results: every
allocation and free with its Python stack; where a peak comes from, for rows above timm's peak memory):
`python benchmarks/memory_peak.py memory_<row>_<px>.pickle` prints what is live at the peak, by allocating code.

Triton autotunes each mmeff kernel on its first call; `TRITON_CACHE_AUTOTUNING=1` (Triton >= 3.4) keeps the choice
in the on-disk cache, so a second run, or the compiled run after the eager one, does not tune again:

    TRITON_CACHE_AUTOTUNING=1 python benchmarks/vision_speed.py --px 224 512
    TRITON_CACHE_AUTOTUNING=1 python benchmarks/vision_speed.py --px 224 512 --compile
    python benchmarks/vision_speed.py --smoke        # CPU, tiny sizes, fp32: checks every row builds and steps
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmeff import config, ops
from mmeff.blocks.scan import ScanMixer
from mmeff.tasks import build_model
from mmeff.tasks.graphs import GraphedTraining
from mmeff.trainer import compile_options
from timing import CHECKPOINT, add_compile_argument, compile_fields, compile_label, device_tag, error_note, free, matmul_rate, median_ms, replays_graphs, run_id, save_figure, unchecked, write_results  # benchmarks/timing.py, beside this script

SIZES = {224: 256, 512: 64, 1024: 16, 2048: 4}  # px -> batch: about 65k tokens per step
# --chunk-size: the chunk lengths mmeff's chunked kernels run (mmeff.kernels.pack rounds any other to one of these, so
# a row named by another would not run at it on the GPU).
CHUNK_SIZES = (16, 32, 64)
SCANNED = ("linear_attn", "gla", "retnet", "mamba2", "gated_deltanet", "hybrid")
HYBRID = ["gla", "gla", "gla", "attn"]
GROUP_TOKENS = 32768  # `+groups` rows: scan_tokens (at 1,024 px four groups of 4 images, bi)
FLOP_MATCHED = ("gla-bi", "mamba2-bi")  # rows whose FLOP-matched ceiling the issue sets a goal for (at 224 px)
STUBBED = "+no_recurrence"  # a row suffix: the row with its recurrence replaced by `no_recurrence`
ROUTED = "+routes"  # a row suffix: `scan: bi` on the scan routes, not through an op of both directions


@dataclass(frozen=True)
class Shape:
    """Model and input sizes: the real benchmark, or `--smoke`'s tiny CPU one."""

    dim: int = 384
    depth: int = 12
    heads: int = 6
    patch: int = 16
    classes: int = 1000
    tokens: int = 65536  # per step, for the audio batch
    mels: int = 128
    frames: int = 1000
    audio_stride: int = 10
    window: int = 256
    block: int = 64
    chunk: int | None = None  # the scan mixers' chunk_size (None: theirs)


REAL = Shape()
SMOKE = Shape(dim=64, depth=2, heads=2, patch=8, classes=10, tokens=64, mels=32, frames=60, window=8, block=4)


def mixer_options(shape: Shape) -> dict[str, dict[str, Any]]:
    """Options of each mmeff mixer (before `scan`)."""
    attn = {"heads": shape.heads, "rope": False, "bias": True}
    return {
        "attn": attn,
        "sliding": {**attn, "window": shape.window},
        "block_topk": {**attn, "block": shape.block, "topk": 4, "query_block": shape.block},
        "linear_attn": {"heads": shape.heads},
        "gla": {"heads": shape.heads},
        "retnet": {"heads": shape.heads},
        "mamba2": {"d_state": 64, "head_dim": 64},  # as configs/vision/canvas_mamba2.yaml
        "gated_deltanet": {"heads": shape.heads},
    }


def row_names() -> list[str]:
    """Every row, timm first."""
    scans = [f"{m}-{s}" for m in SCANNED for s in ("bi", "cross")]
    return ["timm", "attn", "sliding", "block_topk", "linear_attn-global", "linear_attn-global+local"] + scans + ["gla-bi+local"]


def backbone(row: str, shape: Shape, grid: tuple[int, int]) -> dict[str, Any]:
    """The backbone section of an mmeff row."""
    options = mixer_options(shape)
    row, checkpoint = unchecked(row)
    row, *extras = row.split("+")  # +local: the 3x3 depthwise conv of v over the grid (local_conv)
    name, _, scan = row.partition("-")
    pattern = HYBRID if name == "hybrid" else [name]
    mixers = {m: dict(options[m]) for m in pattern}
    if scan:
        for m in pattern:
            if issubclass(_block(m), ScanMixer):
                mixers[m]["scan"] = scan
                if "local" in extras:
                    mixers[m]["local_conv"] = 3
                if "groups" in extras:
                    mixers[m]["scan_tokens"] = GROUP_TOKENS
                if shape.chunk:
                    mixers[m]["chunk_size"] = shape.chunk
                if "grid" in inspect.signature(ScanMixer.__init__).parameters:  # before the token layout carried it
                    mixers[m]["grid"] = list(grid)
    return {"dim": shape.dim, "depth": shape.depth, "pattern": pattern, "causal": False, "ffn": "mlp",
            "ffn_options": {"ratio": 4.0}, "norm": "layernorm", "mixers": mixers, "checkpoint": checkpoint}  # fmt: skip


def _block(name: str) -> type:
    from mmeff import blocks

    return blocks.entry(name).cls


def audio_grid(shape: Shape) -> tuple[int, int]:
    """(freq, time) patches of the AST-shaped input."""
    return (shape.mels - 16) // shape.audio_stride + 1, (shape.frames - 16) // shape.audio_stride + 1


def no_recurrence(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: list[torch.Tensor], **kw: Any
) -> tuple[torch.Tensor, None]:
    """The stand-in of a `+no_recurrence` row's recurrence: o = v, with q, k and the gates kept in autograd's graph by
    one mean each (times 0), so that every projection before it still runs its backward."""
    kept = sum(t.float().reshape(*v.shape[:3], -1).mean(-1, keepdim=True) for t in (q, k, *gates))
    return v + (kept * 0).to(v.dtype), None


def stub_recurrence(model: nn.Module) -> None:
    """Every linear-recurrence mixer of `model` calls `no_recurrence` instead of its op, on the scan routes (a ValueError
    where none)."""
    from mmeff.blocks.linear import LinearMixer

    mixers = [m for m in model.modules() if isinstance(m, LinearMixer)]
    if not mixers:
        raise ValueError(f"{STUBBED}: the model has no linear-recurrence mixer (mmeff.blocks.linear.LinearMixer)")
    for m in mixers:
        m.recur = no_recurrence
    on_routes(model)  # the stand-in runs where the recurrence did: on the routes


def on_routes(model: nn.Module) -> None:
    """Every scan mixer of `model` runs `scan: bi` on its routes (ScanMixer.both_routes off)."""
    for m in model.modules():
        if isinstance(m, ScanMixer):
            m.both_routes = lambda streams, layout: None


def build(row: str, px: int | str, shape: Shape) -> tuple[nn.Module, torch.Tensor]:
    """(model, one input) of `row` at `px` (an image size, or 'audio')."""
    if row == "timm":
        return timm_model(px, shape)
    if px == "audio":
        freq, time_ = audio_grid(shape)
        encoder = {"name": "audio", "num_mel_bins": shape.mels, "frames": shape.frames, "patch_size": [16, 16],
                   "patch_stride": [shape.audio_stride] * 2, "pool": "mean"}  # fmt: skip
        grid, example = (time_, freq), torch.randn(1, shape.frames, shape.mels)  # tokens time-major (scan: time)
    else:
        encoder = {"name": "image", "image_size": px, "patch_size": shape.patch, "in_chans": 3, "pool": "mean",
                   "mean": [0.5] * 3, "std": [0.5] * 3}  # fmt: skip
        grid, example = (px // shape.patch, px // shape.patch), torch.randn(1, 3, px, px)
    cfg = config.parse(
        {"name": f"vision_speed_{row}", "encoder": encoder, "backbone": backbone(row, shape, grid),
         "task": {"name": "classify", "num_classes": shape.classes}}
    )  # fmt: skip
    model = build_model(cfg)
    if ROUTED in unchecked(row)[0]:
        on_routes(model)
    return model, example


def timm_model(px: int | str, shape: Shape) -> tuple[nn.Module, torch.Tensor]:
    """timm's ViT-S/16 at `px` (mean pooling, no class token), or the same ViT on AST's strided spectrogram patches."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    size = dict(embed_dim=shape.dim, depth=shape.depth, num_heads=shape.heads, mlp_ratio=4.0)
    common = dict(num_classes=shape.classes, global_pool="avg", class_token=False)
    if px != "audio":
        if shape == REAL:
            return timm.create_model("vit_small_patch16_224", img_size=px, **common), torch.randn(1, 3, px, px)
        return VisionTransformer(img_size=px, patch_size=shape.patch, **size, **common), torch.randn(1, 3, px, px)
    model = VisionTransformer(img_size=(shape.mels, shape.frames), patch_size=16, in_chans=1, **size, **common)
    # timm's PatchEmbed has no stride: AST's overlapping 16x16 patches at stride 10 are its conv with that stride,
    # and the position embedding is sized to their grid.
    freq, time_ = audio_grid(shape)
    model.patch_embed.proj = nn.Conv2d(1, shape.dim, 16, stride=shape.audio_stride)
    model.pos_embed = nn.Parameter(torch.zeros(1, freq * time_, shape.dim))
    return model, torch.randn(1, 1, shape.mels, shape.frames)


@contextlib.contextmanager
def references() -> Iterator[None]:
    """Every mmeff op on its plain-PyTorch reference (MMEFF_FORCE_REFERENCE=1) inside the block."""
    old = os.environ.get("MMEFF_FORCE_REFERENCE")
    os.environ["MMEFF_FORCE_REFERENCE"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["MMEFF_FORCE_REFERENCE"]
        else:
            os.environ["MMEFF_FORCE_REFERENCE"] = old


def flops_per_input(model: nn.Module, example: torch.Tensor, classes: int) -> float:
    """Matmul and attention FLOPs of one forward + backward on one input (FlopCounterMode, references forced)."""
    from torch.utils.flop_counter import FlopCounterMode

    target = torch.zeros(example.shape[0], dtype=torch.long, device=example.device)
    with references(), FlopCounterMode(display=False) as counter, autocast(example.device):
        F.cross_entropy(model(example).float(), target).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / example.shape[0]


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA; off on the CPU (`--smoke`), whose bf16 matmuls are emulated and slow."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_step(model: nn.Module, inputs: torch.Tensor, classes: int, graphs: bool = False) -> Callable[[], None]:
    """One training step of `model` on `inputs`: forward, cross-entropy, backward, fused AdamW; with `graphs` the
    forward and backward replayed as CUDA graphs, as `trainer.cuda_graphs: true` does (mmeff.tasks.graphs)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    target = torch.randint(0, classes, (inputs.shape[0],), device=inputs.device)
    forward = GraphedTraining(model) if graphs else model

    def step() -> None:
        with autocast(inputs.device):
            logits = forward(inputs)
        F.cross_entropy(logits.float(), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(
    row: str, px: int | str, shape: Shape, args: argparse.Namespace, device: torch.device, earlier: list[dict[str, Any]]
) -> dict[str, Any]:
    """One record: build, count FLOPs (or take them from an `earlier` record of the same model), (compile,) time;
    errors, OOM and the row limit become the record's note."""
    tokens = audio_grid(shape)[0] * audio_grid(shape)[1] if px == "audio" else (px // shape.patch) ** 2
    batch = max(1, shape.tokens // tokens) if px == "audio" or args.smoke else SIZES[px]
    record: dict[str, Any] = {"row": row, "px": px, "tokens": tokens, "batch": batch, **compile_fields(args.compile),
                              "graphs": args.graphs}  # fmt: skip
    torch.manual_seed(0)
    model = step = None
    if args.row_limit:
        signal.signal(signal.SIGALRM, _row_limit)
        signal.alarm(args.row_limit)
    try:
        model, example = build(row, px, replace(shape, chunk=args.chunk_size) if row != "timm" else shape)
        model = model.to(device)
        record["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        # Checkpointing recomputes and a stubbed recurrence runs less: the model's FLOPs, so its ceiling, stay.
        same = (unchecked(row)[0].removesuffix(STUBBED).removesuffix(ROUTED), px, record["params_m"])
        counted = [r["flops_per_img"] for r in earlier if (r["row"], r["px"], r.get("params_m")) == same and r.get("flops_per_img")]
        if counted and not args.recount:
            record["flops_per_img"] = counted[-1]
        else:
            record["flops_per_img"] = flops_per_input(model, example.to(device), shape.classes)
        if unchecked(row)[0].endswith(STUBBED):
            stub_recurrence(model)
        if args.compile:
            torch._dynamo.reset()  # a fresh cache per model: rows would otherwise hit dynamo's recompile limit
            model.compile(**compile_options(args.compile))
        inputs = example.to(device).expand(batch, *example.shape[1:]).clone()
        step = train_step(model, inputs, shape.classes, args.graphs)
        ms, peak = median_ms(step, device, args.warmup, args.reps)
        if args.profile:
            profile(step, args.out_dir_resolved / f"profile_{row}_{px}{mode_tag(*mode(record))}.txt", device)
        if args.memory:
            memory_snapshot(step, args.out_dir_resolved / f"memory_{row}_{px}{mode_tag(*mode(record))}.pickle")
        record.update(ms=ms, img_s=batch / ms * 1e3, peak_gib=None if replays_graphs(args.graphs, args.compile) else peak)
        record["floor_ms"] = record["flops_per_img"] * batch / args.rate * 1e3
    except torch.cuda.OutOfMemoryError:
        record["note"] = "OOM"
    except Exception as e:  # noqa: BLE001  (a row that fails is recorded, the run goes on)
        # Inductor re-raises what interrupts its compile as an InductorError caused by it (run 10's 2048 px sliding).
        stopped = any(isinstance(x, RowLimit) for x in _chain(e))
        record["note"] = f"stopped at the row limit, {args.row_limit} s" if stopped else error_note(e)
    finally:
        signal.alarm(0)
        del model, step
        free(device)
    return record


class RowLimit(Exception):
    """A row ran past --row-limit."""


def _row_limit(signum: int, frame: Any) -> None:
    raise RowLimit()


def _chain(e: BaseException | None) -> Iterator[BaseException]:
    """`e` and the exceptions it was raised from or during."""
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def profile(step: Callable[[], None], path: Path, device: torch.device) -> None:
    """Where one step's time goes, written to `path`: its GPU kernels by total time and its ops by the host's own
    time (torch.profiler; on CUDA a Python autograd.Function's backward shows as an autograd::engine::evaluate_function
    row on autograd's device thread), and the host's Python functions over three steps by own time (cProfile), the
    backward run on the calling thread (`torch.autograd.set_multithreading_enabled(False)`) so that cProfile sees
    it: on autograd's CUDA thread it showed only as run_backward."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with profiler(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        step()
        sync()
    host = cProfile.Profile()
    start = time.perf_counter()
    with torch.autograd.set_multithreading_enabled(False):
        host.runcall(lambda: [step() for _ in range(3)])
    sync()
    wall = (time.perf_counter() - start) * 1e3 / 3
    text = io.StringIO()
    pstats.Stats(host, stream=text).sort_stats("tottime").print_stats(40)
    ops = prof.key_averages()
    sections = [f"{'GPU kernels' if cuda else 'Ops'} of one step, by total {'CUDA' if cuda else 'CPU'} time:",
                ops.table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=40, max_name_column_width=90),
                "Ops of one step by the host's own time (self CPU), autograd's backward nodes among them:",
                ops.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=90),
                f"Host, 3 steps under cProfile with the backward on the calling thread ({wall:.1f} ms a step with "
                f"cProfile's overhead):", text.getvalue()]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(sections))


def memory_snapshot(step: Callable[[], None], path: Path) -> None:
    """The CUDA allocator's history over one step (every allocation and free, with its Python stack), written to
    `path`: what is live at the step's peak, for `python -m torch.cuda._memory_viz trace_plot` or pytorch.org/memory_viz."""
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python")
    try:
        step()
        torch.cuda.synchronize()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)


def relate(records: list[dict[str, Any]]) -> None:
    """Fill vs_timm and ceiling_img_s of each record from timm's record of the same run, px and compile setting."""
    timm = {(r["run"], r["px"], *mode(r)): r for r in records if r["row"] == "timm" and r.get("img_s")}
    for r in records:
        ref = timm.get((r["run"], r["px"], *mode(r)))
        if ref and r.get("img_s"):
            r["vs_timm"] = r["img_s"] / ref["img_s"]
            r["ceiling_img_s"] = ref["img_s"] * ref["flops_per_img"] / r["flops_per_img"]


def load(path: Path) -> list[dict[str, Any]]:
    """Records of earlier runs in `path` (none if it does not exist)."""
    return json.loads(path.read_text())["records"] if path.is_file() else []


def write(records: list[dict[str, Any]], out_dir: Path, name: str) -> None:
    """JSON, markdown table and plot of `records` (each file replaced atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    order = {r: i for i, r in enumerate(row_names())}
    records.sort(key=lambda r: (r["px"] == "audio", str(r["px"]).zfill(5), *mode(r), order.get(unchecked(r["row"].split("[")[0])[0], 99)))
    write_results(out_dir / name, {"records": records}, table(records))
    plot(records, out_dir / f"{name}.png")


def table(records: list[dict[str, Any]]) -> str:
    """Markdown: one table per input size, eager and compiled rows, under the runs' devices and settings."""
    runs = {(r["device"], r["torch"], f"{r['matmul_tflops']:.3g}") for r in records}
    lines = [f"Devices: {'; '.join(f'{d} (torch {t}, matmul {f} TFLOP/s measured)' for d, t, f in sorted(runs))}.",
             "One training step: forward, cross-entropy over 1,000 classes, backward, fused AdamW; bf16 autocast, fp32 "
             "weights; width 384, depth 12, patch 16, MLP ratio 4, mean pooling. vs timm: img/s over timm ViT-S in the "
             "same run. GFLOP: one image's forward + backward matmul and attention FLOPs (references; dense for "
             "sliding / block_topk); floor: the batch's FLOPs at the measured bf16 rate; ceiling: timm img/s x timm "
             "FLOPs / row FLOPs.", ""]  # fmt: skip
    columns = ["row", "mode", "batch", "img/s", "vs timm", "peak GiB", "GFLOP/img", "ms", "floor ms", "ms / floor",
               "ceiling img/s", "of ceiling", "note"]  # fmt: skip
    for px in dict.fromkeys(r["px"] for r in records):
        rows = [r for r in records if r["px"] == px]
        title = f"{px} px ({rows[0]['tokens']} tokens)" if px != "audio" else f"audio, AST-shaped ({rows[0]['tokens']} tokens)"
        lines += [f"### {title}", "", "| " + " | ".join(columns) + " |", "|---|---|" + "---:|" * (len(columns) - 3) + "---|"]
        for r in rows:
            cells = [r["row"], mode_tag(*mode(r)).strip("_") or "no", str(r["batch"])]
            if r.get("img_s"):
                cells += [f"{r['img_s']:,.1f}", _num(r.get("vs_timm"), "{:.2f}x"), _num(r.get("peak_gib"), "{:.1f}"),
                          f"{r['flops_per_img'] / 1e9:.1f}", f"{r['ms']:.1f}", f"{r['floor_ms']:.1f}",
                          f"{r['ms'] / r['floor_ms']:.2f}", _num(r.get("ceiling_img_s"), "{:,.0f}"),
                          _num(r.get("ceiling_img_s") and r["img_s"] / r["ceiling_img_s"], "{:.0%}")]  # fmt: skip
            else:
                cells += [""] * 9
            lines.append("| " + " | ".join(cells + [r.get("note", "")]) + " |")
        lines.append("")
    return "\n".join(lines)


def mode(record: dict[str, Any]) -> tuple[str, bool]:
    """(compile label: '', 'compiled' or 'compiled-<mode>'; graphs) of a record (records written before --graphs
    existed ran without)."""
    return compile_label(record), record.get("graphs", False)


def mode_tag(compiled: str, graphs: bool) -> str:
    """'', '_compiled', '_compiled-reduce-overhead', '_graphs', ...: a record's mode in file names and tables."""
    return (f"_{compiled}" if compiled else "") + ("_graphs" if graphs else "")


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """img/s relative to timm against image size, eager and compiled panels (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    images = [r for r in records if r["px"] != "audio" and r.get("vs_timm")]
    modes = sorted({mode(r) for r in images})
    if not modes:
        return
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    colors = plt.get_cmap("tab20")
    sizes = sorted({r["px"] for r in images})
    for ax, m in zip(axes[0], modes):
        for i, row in enumerate(row_names()):
            points = sorted((r["px"], r["vs_timm"]) for r in images if r["row"] == row and mode(r) == m)
            if points:
                ax.plot(*zip(*points), marker="o", label=row, color=colors(i), linestyle="--" if "cross" in row else "-")
        ax.set(title=f"{mode_tag(*m).strip('_') or 'eager'}; {records[0]['device']}", xscale="log", yscale="log",
               xlabel="image px (about 65k tokens per step)", ylabel="training img/s relative to timm ViT-S")  # fmt: skip
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.minorticks_off()
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


@contextlib.contextmanager
def pinned_backends(specs: list[str]) -> Iterator[str]:
    """Inside: each `OP=NAME` of --backend is that op's default backend; yields the suffix of the mmeff rows' names."""
    saved: list[tuple[dict[str, Any], Any]] = []
    try:
        for spec in specs:
            op, _, name = spec.partition("=")
            fn = getattr(ops, op, None) or getattr(ops.conv, op, None)
            defaults = getattr(fn, "__kwdefaults__", None) or {}
            if "backend" not in defaults:
                raise SystemExit(f"vision_speed: --backend {spec!r}: {op!r} is not an mmeff.ops op with a backend argument")
            try:
                ops.dispatch.check_backend(name)
            except ValueError as e:
                raise SystemExit(f"vision_speed: --backend {spec!r}: {e}") from None
            saved.append((defaults, defaults["backend"]))
            defaults["backend"] = name
        yield f"[{','.join(specs)}]" if specs else ""
    finally:
        for defaults, backend in reversed(saved):
            defaults["backend"] = backend


def select(names: list[str] | None) -> list[str]:
    """The rows named (a mixer's name selects its scan rows; +ckpt / +ckpt_mixer / +ckpt_norm: see CHECKPOINT),
    timm always first."""
    rows = row_names()
    if names:
        base = {n: unchecked(n)[0].removesuffix(STUBBED).removesuffix(ROUTED).removesuffix("+groups") for n in names}
        unknown = [n for n, b in base.items() if b == "timm" != n or not any(r == b or r.startswith(f"{b}-") for r in rows)]
        if unknown:
            raise SystemExit(f"vision_speed: unknown row(s) {', '.join(unknown)}; rows: {', '.join(rows)} "
                             f"(each may end in +groups, then {ROUTED}, then {STUBBED}, and in {' or '.join(CHECKPOINT)})")
        suffixes = [(b, n[len(b):]) for n, b in base.items()]
        rows = ["timm"] + [r + s for b, s in suffixes for r in rows if r != "timm" and (r == b or r.startswith(f"{b}-"))]
    return list(dict.fromkeys(rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", help=f"rows to run (default all): {', '.join(row_names())}")
    p.add_argument("--px", nargs="+", help="image sizes 224 512 1024 2048 and/or 'audio' (default all)")
    add_compile_argument(p, "timm's")
    p.add_argument("--graphs", action="store_true", help="forward + backward as CUDA graphs, every model (timm's too)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, autotuning)")
    p.add_argument("--reps", type=int, default=10, help="timed steps; the median counts")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, fp32 (a check that every row runs)")
    p.add_argument("--out-dir", type=Path, help="default: benchmarks/results (--smoke: a temporary folder)")
    p.add_argument("--name", help="file stem (default vision_speed_<device>)")
    p.add_argument("--recount", action="store_true", help="count every row's FLOPs again (default: from an earlier record)")
    p.add_argument("--row-limit", type=int, default=0, help="seconds a row may take before it is stopped (0: no limit)")
    p.add_argument("--profile", action="store_true", help="also write where each row's step goes, GPU kernels and host, "
                   "to profile_<row>_<px>.txt")
    p.add_argument("--chunk-size", type=int, choices=CHUNK_SIZES, help="the scan mixers' chunk length (default theirs, "
                   "64); rows named row[chunk_size=N]")
    p.add_argument("--backend", action="append", default=[], metavar="OP=NAME",
                   help="pin an mmeff op's backend for the mmeff rows (e.g. depthwise_conv2d=torch); rows named row[OP=NAME]")
    p.add_argument("--memory", action="store_true", help="also write each row's allocator history of one step (memory_<row>_<px>.pickle)")
    args = p.parse_args()
    shape = SMOKE if args.smoke else REAL
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    wanted = [int(x) if x.isdigit() else x for x in (args.px or [*map(str, SIZES), "audio"])]
    if any(s not in SIZES and s != "audio" for s in wanted):
        raise SystemExit(f"vision_speed: --px takes {', '.join(map(str, SIZES))} or audio, got {args.px}")
    if args.row_limit < 0:
        raise SystemExit(f"vision_speed: --row-limit takes seconds >= 0 (0: no limit), got {args.row_limit}")
    if args.graphs and device.type != "cuda":
        raise SystemExit("vision_speed: --graphs needs CUDA (CUDA graphs)")
    if args.memory and device.type != "cuda":
        raise SystemExit("vision_speed: --memory needs CUDA (the CUDA allocator's history)")
    sizes = list(dict.fromkeys(32 if args.smoke and s != "audio" else s for s in wanted))  # smoke: 32 px images
    out_dir = args.out_dir or (Path(tempfile.gettempdir()) / "vision_speed_smoke" if args.smoke else Path(__file__).parent / "results")
    name = args.name or f"vision_speed_{device_tag(device)}"
    args.out_dir_resolved = out_dir
    args.rate = matmul_rate(device, 256 if args.smoke else 8192)
    records = load(out_dir / f"{name}.json")
    run = {"run": run_id(records), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "matmul_tflops": args.rate / 1e12}  # fmt: skip
    print(f"{run['device']}: matmul {args.rate / 1e12:.3g} TFLOP/s; writing {out_dir / name}.{{md,json,png}}", flush=True)
    with pinned_backends(args.backend) as pinned:
        for px in sizes:
            for row in select(args.rows):
                record = {**measure(row, px, shape, args, device, records), **run}
                record["row"] = row if row == "timm" else row + pinned + (f"[chunk_size={args.chunk_size}]" if args.chunk_size else "")
                key = (record["row"], px, *mode(record))
                records = [r for r in records if (r["row"], r["px"], *mode(r)) != key] + [record]
                relate(records)
                write(records, out_dir, name)
                fields = ("row", "px", "img_s", "vs_timm", "peak_gib", "note")
                print(json.dumps({k: record.get(k) for k in fields}), flush=True)


if __name__ == "__main__":
    main()
