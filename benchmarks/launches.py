"""Launches of one eager training step, counted on the CPU: the ops a GPU step enqueues from the host.

The eager vision steps at 224 px wait on the host (on the H200, gla-bi's GPU time was 52.3 ms a step and its eager
step 104.6 ms; with the forward and backward replayed as CUDA graphs 53.6): every op and kernel launch costs host time.
This counts them for one training step of each row (forward, loss, backward, fused AdamW; bf16 autocast) on the GPU's
code path: `mmeff.ops.dispatch.on_cuda` answers yes and the Triton kernels run in Triton's interpreter on CPU tensors.
Counted: every aten op that is not a view or metadata op (each launches one kernel or more on CUDA) and every Triton
kernel launch (the ops the interpreter runs for a launch are not counted). The sizes are tiny (2 images of 32 px, or
2 rows of 16 tokens) and the widths and depths the speed scripts': the count per step does not depend on the tokens.
The GPU launches more kernels than this counts (cuBLAS split-K reductions, memsets, several kernels for one op: the
H200's profiler counted 986 for timm's step and 1,577 for gla-bi's at 42b10a2); the count is of the ops the host
issues, each with its Python and dispatch cost.

`--traffic` counts instead the bytes that those aten ops read and write, outside matmuls, softmax attention and the
optimizer, per token and layer: the elementwise glue that lm_train_speed.py's `--profile` files under "other" GPU
time (each op's tensors' sizes, inputs and outputs; a view read whole counts whole). One forward, loss and backward
of models of one and two times the row's pattern on 1 and 2 inputs (rows of 128 tokens, or images of 128 px): the
difference over the tokens and the pattern's layers leaves out the weights', the embedding's and the head's part.
Beside the glue it counts the Triton kernels' bytes the same way: each launch's distinct addresses loaded plus those
stored (masks respected, an address once a launch), what the launch must move to and from memory at least; over the
kernel's time in a GPU profile, the bandwidth it reaches. `--px` sets the vision rows' image size (the recurrence's
bytes per token depend on the sequence's chunks).

    python benchmarks/launches.py                          # the vision rows: timm, attn, the bidirectional mixers
    python benchmarks/launches.py --lm                     # the LM rows of lm_train_speed.py and HF Llama
    python benchmarks/launches.py --lm --traffic --rows attn mamba2 gated_deltanet
    python benchmarks/launches.py --traffic --rows timm attn gla-bi mamba2-bi
    python benchmarks/launches.py --traffic --px 224 --rows timm attn gla-bi mamba2-bi gated_deltanet-bi retnet-bi

Writes benchmarks/results/launches_cpu.{md,json,png} (records: row, aten_ops, triton_launches, launches,
vs_<first row>), with --lm launches_lm_cpu.*, with --traffic traffic_cpu.* and with --lm --traffic traffic_lm_cpu.*
(records: row, kib_per_token_layer, vs_<first row>, ops: KiB per token and layer by aten op,
kernel_kib_per_token_layer, kernels: KiB per token and layer by Triton kernel).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported: the kernels run on CPU tensors

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton.runtime.autotuner as autotuner  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

import lm_train_speed  # noqa: E402  (benchmarks/lm_train_speed.py, beside this script)
import vision_speed  # noqa: E402  (benchmarks/vision_speed.py, beside this script)
from mmeff.ops import dispatch  # noqa: E402
from timing import save_row_bars, write_results  # noqa: E402

VISION_ROWS = ["timm", "attn", "linear_attn-bi", "gla-bi", "retnet-bi", "mamba2-bi", "gated_deltanet-bi", "hybrid-bi"]
LM_ROWS = ["attn", "hf_llama", "gla", "retnet", "deltanet", "mamba2", "gated_deltanet", "hybrid_gla", "hybrid_mamba2"]
PX, T = 32, 16
# Ops that launch nothing on CUDA: views, metadata, allocation without a fill.
QUIET = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "split_with_sizes", "split", "unsqueeze",
         "squeeze", "select", "as_strided", "detach", "alias", "unbind", "_reshape_alias", "unflatten", "reshape",
         "flatten", "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "promote_types",
         "lift_fresh", "_record_function_enter_new", "_record_function_exit", "is_same_size"}  # fmt: skip


class _Launches(TorchDispatchMode):
    """Counts aten ops that launch (outside Triton launches) and Triton kernel launches while active."""

    def __init__(self) -> None:
        super().__init__()
        self.aten: Counter = Counter()
        self.triton: Counter = Counter()
        self._inside = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.__name__.split(".")[0]
        if not self._inside and name not in QUIET:
            self.aten[name] += 1
        return func(*args, **(kwargs or {}))

    def launching(self, name: str, launch: Callable[[], Any]) -> Any:
        """Run one Triton launch, counted once (its own tensor traffic in the interpreter not)."""
        if not self._inside:
            self.triton[name] += 1
        self._inside += 1
        try:
            return launch()
        finally:
            self._inside -= 1


# Ops whose GPU time lm_train_speed.py --profile files under matmul, softmax attention or the optimizer.
NOT_GLUE = {"mm", "bmm", "addmm", "linear", "_fused_adamw_", "_scaled_dot_product_flash_attention_for_cpu",
            "_scaled_dot_product_flash_attention_for_cpu_backward"}  # fmt: skip
TRAFFIC_T = 128  # --lm --traffic: tokens a row
TRAFFIC_PX = 128  # --traffic: 64 tokens an image


class _Traffic(_Launches):
    """Also sums the bytes of the tensors (inputs and outputs) of every counted aten op outside NOT_GLUE, by op, and
    the bytes each Triton launch reads and writes, by kernel: its distinct addresses loaded plus those stored (masks
    respected; each address once a launch, however often its programs touch it: what the launch must move to and
    from memory at least, were its caches perfect; atomics not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: Counter = Counter()
        self.kernels: Counter = Counter()
        self._accesses: dict[bool, list[tuple[Any, int]]] = {False: [], True: []}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if not self._inside and name not in QUIET and name not in NOT_GLUE and not name.startswith("_foreach"):
            tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            self.bytes[name] += sum(t.numel() * t.element_size() for t in tensors)
        return out

    def launching(self, name: str, launch: Callable[[], Any]) -> Any:
        if self._inside:  # an autotuner's launch of its kernel: counted as the outer launch
            return super().launching(name, launch)
        self._accesses = {False: [], True: []}
        try:
            return super().launching(name, launch)
        finally:
            self.kernels[name] += sum(_distinct_bytes(a) for a in self._accesses.values())

    def access(self, ptrs: Any, mask: Any, store: bool) -> None:
        """One interpreted load or store of a launch: the addresses its mask lets through."""
        if self._inside:
            size = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
            self._accesses[store].append((ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)], size))


def _distinct_bytes(accesses: list[tuple[Any, int]]) -> int:
    """Bytes at the distinct addresses of `accesses` ((addresses, element size) pairs), per element size."""
    sizes = {size for _, size in accesses}
    return sum(size * np.unique(np.concatenate([a for a, s in accesses if s == size])).size for size in sizes)


def traffic(counter: list[_Launches | None], steps: Callable[[int, int], Callable[[], None]], unit: int,
            tokens: int) -> dict[str, Any]:
    """KiB per token and layer moved by the glue and by the Triton kernels of one forward, loss and backward:
    `steps(depth, n)` is that step of a model of `depth` layers on n inputs of `tokens` tokens; models of one and two
    times the row's pattern (`unit` layers) on 1 and 2 inputs, whose difference leaves out the weights', the
    embedding's and the head's part."""
    counts: dict[tuple[int, int], tuple[Counter, Counter]] = {}
    for depth in (unit, 2 * unit):
        for n in (1, 2):
            step = steps(depth, n)
            step()  # process-wide caches (the rope tables) filled before the counted step
            counted = counter[0] = _Traffic()
            try:
                with counted:
                    step()
                counts[depth, n] = counted.bytes, counted.kernels
            finally:
                counter[0] = None

    def per_token_layer(which: int) -> Counter:
        parts = [counts[key][which] for key in ((2 * unit, 2), (2 * unit, 1), (unit, 2), (unit, 1))]
        per = Counter()
        for name in set().union(*parts):
            per[name] = (parts[0][name] - parts[1][name] - parts[2][name] + parts[3][name]) / tokens / unit / 1024
        return per

    def largest(per: Counter) -> dict[str, float]:
        return {name: kib for name, kib in per.most_common() if abs(kib) >= 0.05}

    glue, kernels = per_token_layer(0), per_token_layer(1)
    return {"kib_per_token_layer": sum(glue.values()), "ops": largest(glue),
            "kernel_kib_per_token_layer": sum(kernels.values()), "kernels": largest(kernels)}


def lm_traffic(row: str, counter: list[_Launches | None], shape: lm_train_speed.Shape, T: int) -> dict[str, Any]:
    """One --lm --traffic record: an LM row on rows of T byte tokens."""

    def steps(depth: int, rows: int) -> Callable[[], None]:
        torch.manual_seed(0)
        _, logits_of = lm_train_speed.build(row, replace(shape, depth=depth), T)
        tokens = torch.randint(0, 256, (rows, T + 1), generator=torch.Generator().manual_seed(rows))

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = logits_of(tokens[:, :-1], None)
            F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()

        return step

    unit = len(lm_train_speed.pattern_of(row) or ["attn"])  # hf_llama: one layer a unit
    return {"row": row, **traffic(counter, steps, unit, T)}


def vision_traffic(row: str, counter: list[_Launches | None], shape: vision_speed.Shape, px: int) -> dict[str, Any]:
    """One --traffic record: a vision row on images of `px` px."""

    def steps(depth: int, images: int) -> Callable[[], None]:
        torch.manual_seed(0)
        model, example = vision_speed.build(row, px, replace(shape, depth=depth))
        x, target = example.expand(images, *example.shape[1:]).clone(), torch.zeros(images, dtype=torch.long)

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(x)
            F.cross_entropy(logits.float(), target).backward()

        return step

    unit = len(vision_speed.HYBRID) if row.startswith("hybrid") else 1
    return {"row": row, **traffic(counter, steps, unit, (px // shape.patch) ** 2)}


def traffic_table(records: list[dict[str, Any]], command: str, setting: str) -> str:
    """Markdown: glue and Triton kernels' KiB per token and layer against the first row's, the largest of each."""
    base = records[0]["row"]
    lines = [f"`{command}` (CPU, torch {torch.__version__}; {setting}; one forward, loss and backward under bf16 "
             "autocast, the GPU code path with the Triton kernels interpreted). Glue: the bytes that aten ops other "
             "than views, metadata, matmuls, softmax attention and the optimizer read and write (their tensors' "
             "sizes), per token and layer. Kernels: the bytes each Triton launch reads and writes, its distinct "
             "addresses loaded plus those stored, each once a launch (what it must move to and from memory at least).",
             "", f"| row | glue: KiB per token and layer | vs {base} | largest ops (KiB) | kernels: KiB per token and "
             "layer | largest kernels (KiB) |", "|---|---:|---:|---|---:|---|"]  # fmt: skip
    for r in records:
        top = ", ".join(f"{k} {v:.1f}" for k, v in list(r["ops"].items())[:6])
        kernels = ", ".join(f"{k} {v:.1f}" for k, v in list(r.get("kernels", {}).items())[:6])
        lines.append(f"| {r['row']} | {r['kib_per_token_layer']:.1f} | {r[f'vs_{base}']:.2f}x | {top} | "
                     f"{r.get('kernel_kib_per_token_layer', 0.0):.1f} | {kernels} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _hook_triton(counter: list[_Launches | None]) -> None:
    """Route the interpreter's kernel launches (direct and through an autotuner) through the active counter."""
    getitem, run = interpreter.InterpretedFunction.__getitem__, autotuner.Autotuner.run

    def launcher(self, grid):  # type: ignore[no-untyped-def]
        launch = getitem(self, grid)
        return lambda *a, **k: launch(*a, **k) if counter[0] is None else counter[0].launching(self.fn.__name__, lambda: launch(*a, **k))

    def tuned(self, *a, **k):  # type: ignore[no-untyped-def]
        name = getattr(self.fn, "__name__", None) or self.fn.fn.__name__
        return run(self, *a, **k) if counter[0] is None else counter[0].launching(name, lambda: run(self, *a, **k))

    interpreter.InterpretedFunction.__getitem__ = launcher
    autotuner.Autotuner.run = tuned
    builder = interpreter.InterpreterBuilder
    load, store = builder.create_masked_load, builder.create_masked_store

    def loaded(self, ptrs, mask, *rest):  # type: ignore[no-untyped-def]
        if isinstance(counter[0], _Traffic):
            counter[0].access(ptrs, mask, store=False)
        return load(self, ptrs, mask, *rest)

    def stored(self, ptrs, value, mask, *rest):  # type: ignore[no-untyped-def]
        if isinstance(counter[0], _Traffic):
            counter[0].access(ptrs, mask, store=True)
        return store(self, ptrs, value, mask, *rest)

    builder.create_masked_load, builder.create_masked_store = loaded, stored


def step_of(row: str, lm: bool, smoke: bool) -> Callable[[], None]:
    """One training step of `row` as its speed script runs it (fused AdamW), at the tiny size (`smoke`: the scripts'
    smoke models too)."""
    torch.manual_seed(0)
    if lm:
        model, logits_of = lm_train_speed.build(row, lm_train_speed.SMOKE if smoke else lm_train_speed.REAL, T)
        tokens = torch.randint(0, 256, (2, T + 1))
        return lm_train_speed.train_step(model, logits_of, tokens, None)
    shape = vision_speed.SMOKE if smoke else vision_speed.REAL
    model, example = vision_speed.timm_model(PX, shape) if row == "timm" else vision_speed.build(row, PX, shape)
    return vision_speed.train_step(model, example.expand(2, *example.shape[1:]).clone(), shape.classes)


def count(row: str, lm: bool, smoke: bool, counter: list[_Launches | None]) -> dict[str, Any]:
    """One record: the launches of the row's second step (the first builds the optimizer state)."""
    step = step_of(row, lm, smoke)
    step()
    counter[0] = _Launches()
    try:
        with counter[0]:
            step()
        aten, triton = counter[0].aten, counter[0].triton
    finally:
        counter[0] = None
    return {"row": row, "aten_ops": sum(aten.values()), "triton_launches": sum(triton.values()),
            "launches": sum(aten.values()) + sum(triton.values()), "aten": dict(aten.most_common()),
            "triton": dict(triton.most_common())}  # fmt: skip


def table(records: list[dict[str, Any]], command: str, setting: str) -> str:
    """Markdown: launches per step against the first row's, under the command that counted them."""
    base = records[0]["row"]
    lines = [f"`{command}` (CPU, torch {torch.__version__}; {setting}; one training step: forward, loss, backward, "
             "fused AdamW under bf16 autocast, the GPU code path with the Triton kernels interpreted). Launches: aten "
             "ops other than views and metadata, plus Triton kernel launches.", "",
             f"| row | aten ops | Triton launches | launches | vs {base} | most Triton launches |",
             "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in records:
        top = ", ".join(f"{k} {v}" for k, v in list(r["triton"].items())[:4])
        lines.append(f"| {r['row']} | {r['aten_ops']:,} | {r['triton_launches']:,} | {r['launches']:,} | "
                     f"{r[f'vs_{base}']:.2f}x | {top} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """Stacked bars: aten ops and Triton launches per step of each row (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 3.6))
    x = list(range(len(records)))
    aten = [r["aten_ops"] for r in records]
    ax.bar(x, aten, 0.6, color="tab:blue", label="aten ops")
    ax.bar(x, [r["triton_launches"] for r in records], 0.6, bottom=aten, color="tab:orange", label="Triton launches")
    save_row_bars(fig, ax, [r["row"] for r in records], "launches per training step",
                  "Launches of one eager training step (GPU code path, counted on CPU)", path)  # fmt: skip


def save_bars(records: list[dict[str, Any]], key: str, ylabel: str, title: str, out: Path) -> None:
    """One bar per row of `key` (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.bar(range(len(records)), [r[key] for r in records], 0.6, color="tab:blue", label=ylabel)
    save_row_bars(fig, ax, [r["row"] for r in records], ylabel, title, out.with_name(out.name + ".png"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", help=f"rows (default {' '.join(VISION_ROWS)}; a -bi row may end in {vision_speed.ROUTED}; --lm: {' '.join(LM_ROWS)})")
    p.add_argument("--lm", action="store_true", help="rows of lm_train_speed.py instead of vision_speed.py")
    p.add_argument("--smoke", action="store_true", help="the speed scripts' tiny models (a check that rows run)")
    p.add_argument("--traffic", action="store_true", help="the glue's and the kernels' bytes per token and layer instead")
    p.add_argument("--px", type=int, default=TRAFFIC_PX, help="--traffic: the vision rows' image size")
    p.add_argument("--out", type=Path, help="file stem (default benchmarks/results/launches_cpu, --lm: launches_lm_cpu, "
                                            "--traffic: traffic_cpu, --lm --traffic: traffic_lm_cpu)")  # fmt: skip
    args = p.parse_args()
    rows = args.rows or (LM_ROWS if args.lm else VISION_ROWS)
    known = [*lm_train_speed.PATTERNS, "hf_llama"] if args.lm else vision_speed.row_names()
    unknown = [r for r in rows if (r if args.lm else r.removesuffix(vision_speed.ROUTED)) not in known]
    if unknown:
        raise SystemExit(f"launches: unknown rows {' '.join(unknown)}; rows of {'lm_train_speed' if args.lm else 'vision_speed'}.py: "
                         f"{' '.join(known)}")  # fmt: skip
    patch = (vision_speed.SMOKE if args.smoke else vision_speed.REAL).patch
    if args.px < patch or args.px % patch:
        raise SystemExit(f"launches: --px {args.px} must be a positive multiple of the patch size, {patch}")
    stem = ("traffic" if args.traffic else "launches") + ("_lm" if args.lm else "") + "_cpu"
    out = args.out or Path(__file__).parent / "results" / stem
    setting = f"width {lm_train_speed.REAL.dim}, 2 rows of {T} tokens" if args.lm else f"ViT-S/16, 2 images of {PX} px"
    dispatch.on_cuda = lambda x: True  # the GPU path (this process only)
    for script in (vision_speed, lm_train_speed):  # their steps' bf16 autocast, which they leave off on the CPU
        script.autocast = lambda device: torch.autocast("cpu", dtype=torch.bfloat16)
    counter: list[_Launches | None] = [None]
    _hook_triton(counter)
    command = " ".join(["python benchmarks/launches.py", *sys.argv[1:]])
    lm_shape = lm_train_speed.SMOKE if args.smoke else lm_train_speed.REAL
    vision_shape = vision_speed.SMOKE if args.smoke else vision_speed.REAL
    lm_t = lm_train_speed.SMOKE.lengths[0] if args.smoke else TRAFFIC_T  # smoke: one chunk a row (half the programs)
    if args.lm:
        moved = f"width {lm_shape.dim}, rows of {lm_t} tokens"
    else:
        moved = f"ViT-S/16 (width {vision_shape.dim}), images of {args.px} px; the patch embedding and head left out"
    records = []
    for row in rows:
        if args.traffic:
            records.append(lm_traffic(row, counter, lm_shape, lm_t) if args.lm else vision_traffic(row, counter, vision_shape, args.px))
            for r in records:
                r[f"vs_{records[0]['row']}"] = r["kib_per_token_layer"] / records[0]["kib_per_token_layer"]
            write_results(out, {"command": command, "setting": moved, "records": records},
                          traffic_table(records, command, moved))  # fmt: skip
            save_bars(records, "kib_per_token_layer", "glue KiB per token and layer",
                      "Bytes moved by the glue ops of one training step (GPU code path, counted on CPU)", out)  # fmt: skip
            print(f"{row}: {records[-1]['kib_per_token_layer']:.1f} KiB per token and layer of glue, "
                  f"{records[-1]['kernel_kib_per_token_layer']:.1f} of Triton kernels", flush=True)
            continue
        records.append(count(row, args.lm, args.smoke, counter))
        for r in records:
            r[f"vs_{records[0]['row']}"] = r["launches"] / records[0]["launches"]
        write_results(out, {"command": command, "setting": setting, "records": records}, table(records, command, setting))
        plot(records, out.with_name(out.name + ".png"))
        print(f"{row}: {records[-1]['launches']} launches ({records[-1]['aten_ops']} aten ops, "
              f"{records[-1]['triton_launches']} Triton)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
