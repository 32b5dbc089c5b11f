"""Activation memory of the vision rows, counted on the CPU: bytes autograd keeps for the backward, per token and layer.

Peak training memory past the weights is what the forward keeps for the backward. This counts it exactly (every
distinct storage reaching `torch.autograd.graph.saved_tensors_hooks`, parameters and their bf16 copies excluded)
for a training forward of each `benchmarks/vision_speed.py` row under bf16 autocast, on the GPU's code path: the
Triton kernels (mmeff.kernels) run in Triton's interpreter on CPU tensors and `mmeff.ops.dispatch.on_cuda` answers
yes, so each op keeps what it keeps on the GPU. Per token: the difference between batches of 2 and 1 images, over
the tokens of an image and the 12 layers (the patch embedding and head are in it, a few bytes a token). FlashAttention
keeps O(T) per head, so softmax attention's figure holds at every resolution.

A second count, `live`: bytes of every storage allocated during the forward and still alive after it (the loss
still held, as before a backward), whether autograd saved it or something else keeps it. The saved count misses
what is kept outside the saved-tensor hooks: a hook's own closure kept gla-bi's route copies alive until 5416efe,
3.8 of its 17.2 GiB peak at 1024 px on the H200, while the saved count showed only the source streams.

`--peak`: a training step's peak beyond what the forward keeps (the backward's transient buffers: one layer's
gradients and its kernels' work tensors), from every storage's lifetime over a 2-layer model's step, batches of 8 and
4, the weights' gradients left out; the full-depth step peak per token is live x depth + transient. Against the H200's
allocator peaks at 1,024 px (vision_speed_h200.md; 65,536 tokens a step, plus about 0.6 GiB of weights, gradients,
AdamW state and the batch): timm 169.2 KiB per token here, 10.6 GiB + 0.6 against 11.3 there; attn 137.7, 8.6 + 0.6
against 9.2; gla-bi 155.4 (at 6cd3f52 there), 9.7 + 0.6 against 10.3.

A `+groups` row (`scan_tokens`, benchmarks/vision_speed.py) runs its routes in groups of the batch's images; its
census batches of 8 and 4 images, far under the row's token cap, are split into as many groups as a 1,024 px batch
is (16 images: four groups for `bi`), so that the transient counts what that step holds.

Not counted: workspace inside a kernel and the allocator's fragmentation. Mamba-2 runs mmeff's Triton SSD here; on a
GPU with mamba-ssm installed it runs mamba-ssm's kernels, which keep other tensors.

`--compiled`: also what torch.compile keeps: the tensors its backward graph takes from the forward, as Inductor's
partitioner picks them (the graphs then run uncompiled, the kernels interpreted), batches of 2 and 1. Until the
selective-checkpoint regions of mmeff.ops.recompute.compiled_recomputing it kept 19.1 (gla-bi) and 25.5 (mamba2-bi)
KiB per token and layer where eager mode keeps 11.6 and 12.8, now 11.6 and 12.5 (saved_memory_compiled_cpu.md; on the
H100 at 224 px: peaks of 12.1 and 15.6 GiB compiled against 8.0 and 9.0 eager, 8.1 and 8.8 with the regions).

`--lm`: the rows of benchmarks/lm_train_speed.py instead (causal LMs of width 1024 on rows of 128 byte tokens, mmeff
attn first): one layer's bytes per token, a 2-layer model's count less a 1-layer one's (a hybrid: 8 and 4 layers, over
4), so the embedding and the vocabulary head are out of it. `--lm --peak`: their training step's census as above, from a
2-layer model (a hybrid: its pattern's 4), rows of 128 tokens, batches of 8 and 4 rows; with `--detail`, what that step's
peak holds, by the mmeff code that allocated it (per token: the bytes at 8 rows less those at 4).

    python benchmarks/saved_memory.py                          # every row of vision_speed.py except the cross scans
    python benchmarks/saved_memory.py --rows timm attn gla-bi --detail
    python benchmarks/saved_memory.py --lm                     # every mmeff row of lm_train_speed.py
    python benchmarks/saved_memory.py --rows timm gated_deltanet-bi --peak
    python benchmarks/saved_memory.py --lm --rows attn mamba2 --peak
    python benchmarks/saved_memory.py --lm --rows attn gated_deltanet --peak --detail
    python benchmarks/saved_memory.py --rows timm gla-bi mamba2-bi --compiled
    python benchmarks/saved_memory.py --lm --rows attn gated_deltanet retnet --compiled

Writes benchmarks/results/saved_memory_cpu.{md,json,png} (records: row, kib_per_token_layer, vs_timm,
live_kib_per_token_layer, live_vs_timm, largest), with --lm saved_memory_lm_cpu.* (vs_attn, live_vs_attn).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import traceback
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported: the kernels run on CPU tensors

import torch  # noqa: E402
from torch._subclasses.fake_tensor import is_fake  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

import lm_train_speed  # noqa: E402  (benchmarks/lm_train_speed.py, beside this script)
import vision_speed  # noqa: E402  (benchmarks/vision_speed.py, beside this script)
from mmeff.ops import dispatch  # noqa: E402
from mmeff.ops.recompute import kept_when_compiled, saved_storages  # noqa: E402
from timing import save_row_bars, write_results  # noqa: E402

PX = 128  # 64 tokens an image of 16 px patches: the counts are per token; small keeps the interpreted kernels quick
LM_T = 128  # --lm: tokens a row
SMOKE_PX = 64  # --smoke: 64 tokens of 8 px
SITE_FRAMES = 3  # mmeff frames naming an allocating site (--lm --peak --detail)
SITES = 16  # the largest sites listed


def kept(model: torch.nn.Module, images: torch.Tensor) -> dict[int, tuple[int, tuple[int, ...], torch.dtype]]:
    """Storages kept for the backward of one bf16-autocast forward: {data pointer: (bytes, a shape, dtype)}."""
    with saved_storages() as found, torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)  # held to the end of the block: its graph keeps what is counted
    return {ptr: (t.untyped_storage().nbytes(), tuple(t.shape), t.dtype) for ptr, t in found.items()}


class _Allocations(TorchDispatchMode):
    """Every storage an op returns while active: {data pointer: (weak reference, bytes)}; with `track`, also each
    one's lifetime in ops (`spans`: [first op, op after which it was found freed or None, bytes, address, weak
    reference, allocating code]); the allocating code (`site`) only with `sites`, else None."""

    supports_higher_order_operators = True  # FlexAttention (the sparse rows) runs as one

    def __init__(self, track: bool = False, sites: bool = False) -> None:
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self.track, self.sites, self.ops, self.spans, self._open = track, sites, 0, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not is_fake(t):  # FlexAttention traces its masks on fake tensors
                storage = t.untyped_storage()
                seen = self.storages.get(storage.data_ptr())
                if seen is None or seen[0].expired():  # a freed storage's address reused
                    self.storages[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
                    if self.track:
                        where = site(func) if self.sites else None
                        self._open.append([self.ops, None, storage.nbytes(), storage.data_ptr(), StorageWeakRef(storage), where])
                        self.spans.append(self._open[-1])
        if self.track:  # the op's inputs it freed are gone by now
            for span in self._open:
                if span[4].expired():
                    span[1] = self.ops
            self._open = [span for span in self._open if span[1] is None]
        return out

    def __enter__(self) -> "_Allocations":
        if self.track:  # Triton's interpreter holds each launch's arguments in a reference cycle (its _to_cpu closure)
            # until the next automatic collection; a GPU launch lets them go when it returns, so collect there.
            from triton.runtime.interpreter import GridExecutor

            launch = self._launch = GridExecutor.__call__

            def collected(*args: Any, **kwargs: Any) -> Any:
                out = launch(*args, **kwargs)
                gc.collect()
                return out

            GridExecutor.__call__ = collected
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self.track:
            from triton.runtime.interpreter import GridExecutor

            GridExecutor.__call__ = self._launch
        super().__exit__(*exc)

    def peak(self, leave_out: set[int]) -> int:
        """Most bytes of the tracked storages alive at once, leaving out those still alive at `leave_out`'s addresses."""
        return self.peak_sites(leave_out)[0]

    def peak_sites(self, leave_out: set[int]) -> tuple[int, Counter]:
        """`peak` and those bytes by allocating code (empty without `sites`)."""
        spans = [span for span in self.spans if not (span[1] is None and span[3] in leave_out)]
        change = [0] * (self.ops + 2)
        for start, end, nbytes, *_ in spans:
            change[start] += nbytes
            change[self.ops + 1 if end is None else end] -= nbytes
        total = best = at = 0
        for op, c in enumerate(change):
            total += c
            if total > best:
                best, at = total, op
        by_site: Counter = Counter()
        for start, end, nbytes, _, _, where in spans:
            if where is not None and start <= at and (end is None or end > at):
                by_site[where] += nbytes
        return best, by_site


def site(func: Any) -> str:
    """The mmeff code allocating through `func`: its innermost frames in mmeff (file:line function), innermost first."""
    frames = [f for f in traceback.extract_stack() if "/mmeff/" in f.filename][-SITE_FRAMES:]
    name = func.__name__.split(".")[0]
    return " < ".join(f"{f.filename.split('/mmeff/')[-1]}:{f.lineno} {f.name}" for f in reversed(frames)) + f" ({name})" if frames else name


def compiled_kept(model: torch.nn.Module, images: torch.Tensor) -> int:
    """Bytes of the tensors torch.compile's backward graphs take from the forward of one bf16-autocast training step
    (the saved activations and weights as Inductor's partitioner picks them; the graphs run uncompiled)."""
    kept = kept_when_compiled(model, images, autocast=torch.bfloat16)
    model.zero_grad(set_to_none=True)
    return sum(t.numel() * t.element_size() for t in kept)


def live(model: torch.nn.Module, images: torch.Tensor) -> int:
    """Bytes allocated by one bf16-autocast forward (and its loss) and still alive after it."""
    with _Allocations() as allocations, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(images).float().square().mean()
    gc.collect()
    alive = sum(n for ref, n in allocations.storages.values() if not ref.expired())
    del loss
    return alive


def step_peak(model: torch.nn.Module, images: torch.Tensor) -> int:
    """Most bytes live at once of those one bf16-autocast training step (forward, loss, backward) allocates, the
    weights' gradients left out (the same at every batch, they would hide the activations' peak at small ones)."""
    return step_peak_sites(model, images, False)[0]


def step_peak_sites(model: torch.nn.Module, images: torch.Tensor, sites: bool) -> tuple[int, Counter]:
    """`step_peak` and, with `sites`, those bytes by allocating code."""
    model.zero_grad(set_to_none=True)
    with _Allocations(track=True, sites=sites) as allocations, torch.autocast("cpu", dtype=torch.bfloat16):
        model(images).float().square().mean().backward()
    grads = {p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return allocations.peak_sites(grads)


def transient(row: str, shape: vision_speed.Shape, px: int) -> float:
    """KiB per token that a training step's peak holds beyond what the forward keeps: the backward's own buffers
    (one layer's gradients and its kernels' work tensors at a time), from a 2-layer model, batches of 8 and 4 (at
    fewer tokens the weights' transient gradients move the peak)."""
    torch.manual_seed(0)
    shape = replace(shape, depth=2)
    model, example = vision_speed.timm_model(px, shape) if row == "timm" else vision_speed.build(row, px, shape)
    tokens = (px // shape.patch) ** 2
    extra = []
    for n in (4, 8):
        x = example.expand(n, *example.shape[1:]).clone()
        groups_as_at_1024(model, n, tokens)
        extra.append(step_peak(model, x) - live(model, x))
    return (extra[1] - extra[0]) / 4 / tokens / 1024


def groups_as_at_1024(model: torch.nn.Module, images: int, tokens: int) -> None:
    """Set each grouped scan mixer's token cap (`scan_tokens`) so that a batch of `images` of `tokens` runs in as many
    groups as vision_speed.py's 1,024 px batch does under the row's cap."""
    from mmeff.blocks.scan import ScanMixer

    for module in model.modules():
        routes = module.routes if isinstance(module, ScanMixer) else None
        if routes is not None and routes.max_tokens and routes.scan in ROUTES:
            stacked = vision_speed.SIZES[1024] * ROUTES[routes.scan] * (1024 // 16) ** 2
            groups = stacked // max(routes.max_tokens, stacked // vision_speed.SIZES[1024])
            routes.max_tokens = images * ROUTES[routes.scan] * tokens // groups


ROUTES = {"bi": 2, "cross": 4}  # routes a scan stacks along the batch (what its groups' token caps count)


def measure(row: str, shape: vision_speed.Shape, px: int, detail: bool, peak: bool, compiled: bool = False) -> dict[str, Any]:
    """One record: KiB kept per token and layer (and the largest kinds of tensor with `detail`; with `peak`, the
    backward's transient KiB per token and the step's peak per token at the full depth; with `compiled`, what
    torch.compile keeps per token and layer)."""
    torch.manual_seed(0)
    model, example = vision_speed.timm_model(px, shape) if row == "timm" else vision_speed.build(row, px, shape)
    tokens = (px // shape.patch) ** 2
    counts = [kept(model, example.expand(n, *example.shape[1:]).clone()) for n in (1, 2)]
    per_image = sum(b for b, _, _ in counts[1].values()) - sum(b for b, _, _ in counts[0].values())
    record: dict[str, Any] = {"row": row, "kib_per_token_layer": per_image / tokens / shape.depth / 1024}
    alive = [live(model, example.expand(n, *example.shape[1:]).clone()) for n in (1, 2)]
    record["live_kib_per_token_layer"] = (alive[1] - alive[0]) / tokens / shape.depth / 1024
    if compiled:
        counted = [compiled_kept(model, example.expand(n, *example.shape[1:]).clone()) for n in (1, 2)]
        record["compiled_kib_per_token_layer"] = (counted[1] - counted[0]) / tokens / shape.depth / 1024
    if peak:
        record["transient_kib_per_token"] = transient(row, shape, px)
        record["peak_kib_per_token"] = record["live_kib_per_token_layer"] * shape.depth + record["transient_kib_per_token"]
    if detail:
        kinds: Counter = Counter()
        for nbytes, dims, dtype in counts[1].values():
            kinds[f"{list(dims)} {str(dtype).removeprefix('torch.')}"] += nbytes
        record["largest"] = [[kind, n / (2 * tokens * shape.depth)] for kind, n in kinds.most_common(12)]
    return record


def lm_transient(row: str, shape: lm_train_speed.Shape, T: int, sites: bool = False) -> tuple[float, float, list]:
    """KiB per token that an LM row's training step peaks at beyond what its forward keeps (as `transient`): a model of
    two layers (a hybrid: its pattern's), rows of T tokens, batches of 8 and 4 rows. At 2 rows the weights' bf16 copies
    and their gradients' work buffers set the step's peak, not the activations: since the pre-norms' outputs are made
    again (checkpoint: norm), attn's transient counted from 4 and 2 rows came out negative (-9.7 KiB per token), from
    8 and 4 rows 4.3. Also the 2-layer step's whole peak per token (embedding and vocabulary head included) and, with
    `sites`, what it holds by allocating code, KiB per token (the bytes at 8 rows less those at 4: the weights' bf16
    copies drop out), largest first."""
    torch.manual_seed(0)
    model, _ = lm_train_speed.build(row, replace(shape, depth=max(2, len(lm_train_speed.pattern_of(row)))), T)
    rows = [torch.randint(0, 256, (n, T), generator=torch.Generator().manual_seed(n)) for n in (4, 8)]
    peaks = [step_peak_sites(model, x, sites) for x in rows]
    extra = [peak - live(model, x) for (peak, _), x in zip(peaks, rows)]
    by_site = peaks[1][1]
    by_site.subtract(peaks[0][1])
    largest = [[where, n / 4 / T / 1024] for where, n in by_site.most_common(SITES) if n > 0]
    return (extra[1] - extra[0]) / 4 / T / 1024, (peaks[1][0] - peaks[0][0]) / 4 / T / 1024, largest


def measure_lm(row: str, shape: lm_train_speed.Shape, T: int, peak: bool, compiled: bool = False,
               detail: bool = False) -> dict[str, Any]:  # fmt: skip
    """One record of an lm_train_speed row: KiB one layer keeps (and leaves live) per token, from models of two and one
    times its pattern's layers (a hybrid's mean over its pattern) on rows of T tokens, batches of 2 and 1 rows; with
    `peak`, the step's transient and its peak per token at the row's full depth, as `measure` (with `detail`, what the
    2-layer step's peak holds by allocating code); with `compiled`, what torch.compile keeps per token and layer,
    counted the same way."""
    unit = len(lm_train_speed.pattern_of(row))
    per_token = []
    for depth in (unit, 2 * unit):
        torch.manual_seed(0)
        model, _ = lm_train_speed.build(row, replace(shape, depth=depth), T)
        rows = [torch.randint(0, 256, (n, T), generator=torch.Generator().manual_seed(n)) for n in (1, 2)]
        counts = [[sum(b for b, _, _ in kept(model, x).values()) for x in rows], [live(model, x) for x in rows]]
        if compiled:  # after the eager counts: the kernels are imported by then, as on a GPU (dispatch.preload_kernels)
            counts.append([compiled_kept(model, x) for x in rows])
        per_token.append([(c[1] - c[0]) / T for c in counts])
    names = ["kib_per_token_layer", "live_kib_per_token_layer", "compiled_kib_per_token_layer"]
    record = {"row": row, **{n: (two - one) / unit / 1024 for n, one, two in zip(names, *per_token)}}
    if peak:
        record["transient_kib_per_token"], whole, at_peak = lm_transient(row, shape, T, detail)
        if detail:
            record["two_layer_peak_kib_per_token"], record["at_peak"] = whole, at_peak
        record["peak_kib_per_token"] = record["live_kib_per_token_layer"] * shape.depth + record["transient_kib_per_token"]
    return record


def table(records: list[dict[str, Any]], command: str, setting: str, base: str) -> str:
    """Markdown: KiB per token and layer, against the first row's (`base`), under the command that counted them."""
    lines = [f"`{command}` (CPU, torch {torch.__version__}; {setting}, bf16 autocast, the GPU code path with the "
             "Triton kernels interpreted). Per token and layer: the bytes autograd keeps for the backward (saved) and "
             "the bytes the forward allocated that are still live after it (live).", "",
             f"| row | saved: KiB per token and layer | vs {base} | live after the forward: KiB per token and layer "
             f"| vs {base} |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {r['row']} | {r['kib_per_token_layer']:.2f} | {r[f'vs_{base}']:.2f}x | "
              f"{r['live_kib_per_token_layer']:.2f} | {r[f'live_vs_{base}']:.2f}x |" for r in records]  # fmt: skip
    if any("peak_kib_per_token" in r for r in records):
        lines += ["", "A training step's peak (`--peak`), KiB per token: the backward's transient bytes (the peak of a "
                  "2-layer model's step less what its forward keeps: one layer's gradients and kernel buffers at a time) "
                  "and the step's peak at the full depth (live after the forward x depth + transient).", "",
                  f"| row | transient KiB per token | step peak KiB per token | vs {base} |", "|---|---:|---:|---:|"]
        lines += [f"| {r['row']} | {r['transient_kib_per_token']:.1f} | {r['peak_kib_per_token']:.1f} | "
                  f"{r[f'peak_vs_{base}']:.2f}x |" for r in records if "peak_kib_per_token" in r]  # fmt: skip
    if any("compiled_kib_per_token_layer" in r for r in records):
        lines += ["", "Compiled (`--compiled`): the tensors torch.compile's backward graphs take from the forward, as "
                  "Inductor's partitioner picks them, KiB per token and layer, beside eager mode's saved count.", "",
                  "| row | compiled | eager (saved) | compiled / eager |", "|---|---:|---:|---:|"]
        lines += [f"| {r['row']} | {r['compiled_kib_per_token_layer']:.2f} | {r['kib_per_token_layer']:.2f} | "
                  f"{r['compiled_kib_per_token_layer'] / r['kib_per_token_layer']:.2f}x |"
                  for r in records if "compiled_kib_per_token_layer" in r]  # fmt: skip
    for r in records:
        if r.get("at_peak"):
            lines += ["", f"{r['row']}: live at the 2-layer step's peak ({r['two_layer_peak_kib_per_token']:.1f} KiB "
                      f"per token) by allocating code (innermost mmeff frames; the forward's kept tensors of both layers "
                      f"and the backward's buffers), KiB per token, the {SITES} largest:", "", "| KiB per token | allocated by |", "|---:|---|"]
            lines += [f"| {n:.2f} | {where} |" for where, n in r["at_peak"]]
        if r.get("largest"):
            lines += ["", f"{r['row']}, bytes per token and layer by kind of tensor (batch of 2; weights' bf16 copies included):", ""]
            lines += [f"- {kind}: {n:,.0f}" for kind, n in r["largest"]]
    return "\n".join(lines) + "\n"


def plot(records: list[dict[str, Any]], path: Path, base: str) -> None:
    """KiB per token and layer of each row, the first row's (`base`) marked (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 3.6))
    x = range(len(records))
    ax.bar([i - 0.2 for i in x], [r["kib_per_token_layer"] for r in records], 0.4, color="tab:blue", label="saved")
    ax.bar([i + 0.2 for i in x], [r["live_kib_per_token_layer"] for r in records], 0.4, color="tab:orange",
           label="live after the forward")  # fmt: skip
    ax.axhline(records[0]["live_kib_per_token_layer"], color="grey", linewidth=0.8, label=f"{base}, live")
    save_row_bars(fig, ax, [r["row"] for r in records], "KiB per token and layer",
                  "Activations of one forward (bf16 autocast, GPU code path, counted on CPU)", path)  # fmt: skip


LM_ROWS = ["attn", "gla", "retnet", "deltanet", "mamba2", "gated_deltanet", "hybrid_gla", "hybrid_mamba2"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    rows = [r for r in vision_speed.row_names() if not r.endswith("-cross")]
    p.add_argument("--rows", nargs="+", help=f"rows of vision_speed.py (default: {' '.join(rows)}); with --lm, of "
                                             f"lm_train_speed.py (default: {' '.join(LM_ROWS)})")  # fmt: skip
    p.add_argument("--lm", action="store_true", help="the causal LMs of lm_train_speed.py, against mmeff attn")
    p.add_argument("--detail", action="store_true", help="also list each row's largest kinds of kept tensor (vision); "
                   "with --lm --peak, what the step's peak holds by allocating code")
    p.add_argument("--peak", action="store_true", help="also the backward's transient bytes and the step's peak per token "
                   "(a 2-layer model's training step each row; a hybrid LM's pattern)")
    p.add_argument("--compiled", action="store_true", help="also what torch.compile keeps for the backward")
    p.add_argument("--smoke", action="store_true", help="the tiny models of the speed scripts (a check that rows run)")
    p.add_argument("--out", type=Path, help="file stem (default benchmarks/results/saved_memory_cpu, --lm: saved_memory_lm_cpu)")
    args = p.parse_args()
    out = args.out or Path(__file__).parent / "results" / ("saved_memory_lm_cpu" if args.lm else "saved_memory_cpu")
    if args.lm:
        rows = args.rows or LM_ROWS
        unknown = [r for r in rows if not lm_train_speed.pattern_of(r)]
        if unknown or rows[0] != "attn":
            raise SystemExit(f"saved_memory --lm: rows start with attn and are mmeff rows of lm_train_speed.py "
                             f"({' '.join(lm_train_speed.PATTERNS)}, each may end in "
                             f"{' or '.join(lm_train_speed.CHECKPOINT)}); got {' '.join(rows)}")  # fmt: skip
        # --smoke: the smoke LM's own length (one chunk a row: the interpreted kernels run half the programs of 128)
        shape, lm_t = (lm_train_speed.SMOKE, lm_train_speed.SMOKE.lengths[0]) if args.smoke else (lm_train_speed.REAL, LM_T)
        base, setting = "attn", f"width {shape.dim}, rows of {lm_t} tokens"
    else:
        try:
            rows = vision_speed.select(args.rows or rows)  # timm first; a mixer's name selects its rows; +ckpt, +ckpt_mixer
        except SystemExit as e:
            raise SystemExit(f"saved_memory: {str(e).removeprefix('vision_speed: ')}") from None
        shape, px = (vision_speed.SMOKE, SMOKE_PX) if args.smoke else (vision_speed.REAL, PX)
        base, setting = "timm", f"{px} px images"
    dispatch.on_cuda = lambda x: True  # the GPU path: each op keeps what its fast path keeps (this process only)
    # At the GPU's 65k tokens a step the heads sharing SSD's q and k take one program a group in the backward (their
    # dq and dk summed there: mmeff.kernels.chunk_o.head_splits); the census's few chunks would take a head a program.
    from mmeff.kernels import chunk_o

    chunk_o.GROUP_PROGRAMS = 1
    records = []
    for row in rows:
        records.append(measure_lm(row, shape, lm_t, args.peak, args.compiled, args.detail) if args.lm
                       else measure(row, shape, px, args.detail, args.peak, args.compiled))
        for r in records:
            r[f"vs_{base}"] = r["kib_per_token_layer"] / records[0]["kib_per_token_layer"]
            r[f"live_vs_{base}"] = r["live_kib_per_token_layer"] / records[0]["live_kib_per_token_layer"]
            if "peak_kib_per_token" in r:
                r[f"peak_vs_{base}"] = r["peak_kib_per_token"] / records[0]["peak_kib_per_token"]
        command = "python benchmarks/saved_memory.py " + " ".join(sys.argv[1:])
        scale = {"T": lm_t} if args.lm else {"px": px}
        write_results(out, {**scale, "command": command, "records": records}, table(records, command, setting, base))
        plot(records, out.with_name(out.name + ".png"), base)
        peak = f", step peak {records[-1]['peak_kib_per_token']:.1f} KiB per token" if args.peak else ""
        print(f"{row}: {records[-1]['kib_per_token_layer']:.2f} KiB per token and layer saved, "
              f"{records[-1]['live_kib_per_token_layer']:.2f} live{peak}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
