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

Not counted: workspace inside a kernel and the allocator's fragmentation. Mamba-2 runs mmeff's Triton SSD here; on a
GPU with mamba-ssm installed it runs mamba-ssm's kernels, which keep other tensors.

    python benchmarks/saved_memory.py                          # every row of vision_speed.py except the cross scans
    python benchmarks/saved_memory.py --rows timm attn gla-bi --detail

Writes benchmarks/results/saved_memory_cpu.{md,json,png} (records: row, kib_per_token_layer, vs_timm,
live_kib_per_token_layer, live_vs_timm, largest).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported: the kernels run on CPU tensors

import torch  # noqa: E402
from torch._subclasses.fake_tensor import is_fake  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

import vision_speed  # noqa: E402  (benchmarks/vision_speed.py, beside this script)
from mmeff.ops import dispatch  # noqa: E402
from timing import save_figure, write_results  # noqa: E402

PX = 128  # 64 tokens an image of 16 px patches: the counts are per token; small keeps the interpreted kernels quick
SMOKE_PX = 64  # --smoke: 64 tokens of 8 px


def kept(model: torch.nn.Module, images: torch.Tensor) -> dict[int, tuple[int, tuple[int, ...], torch.dtype]]:
    """Storages kept for the backward of one bf16-autocast forward: {data pointer: (bytes, a shape, dtype)}."""
    found: dict[int, tuple[int, tuple[int, ...], torch.dtype]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        found.setdefault(storage.data_ptr(), (storage.nbytes(), tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(images)
    return found


class _Allocations(TorchDispatchMode):
    """Every storage an op returns while active: {data pointer: (weak reference, bytes)}."""

    supports_higher_order_operators = True  # FlexAttention (the sparse rows) runs as one

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not is_fake(t):  # FlexAttention traces its masks on fake tensors
                storage = t.untyped_storage()
                seen = self.storages.get(storage.data_ptr())
                if seen is None or seen[0].expired():  # a freed storage's address reused
                    self.storages[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        return out


def live(model: torch.nn.Module, images: torch.Tensor) -> int:
    """Bytes allocated by one bf16-autocast forward (and its loss) and still alive after it."""
    with _Allocations() as allocations, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(images).float().square().mean()
    gc.collect()
    alive = sum(n for ref, n in allocations.storages.values() if not ref.expired())
    del loss
    return alive


def measure(row: str, shape: vision_speed.Shape, px: int, detail: bool) -> dict[str, Any]:
    """One record: KiB kept per token and layer (and the largest kinds of tensor with `detail`)."""
    torch.manual_seed(0)
    model, example = vision_speed.timm_model(px, shape) if row == "timm" else vision_speed.build(row, px, shape)
    tokens = (px // shape.patch) ** 2
    counts = [kept(model, example.expand(n, *example.shape[1:]).clone()) for n in (1, 2)]
    per_image = sum(b for b, _, _ in counts[1].values()) - sum(b for b, _, _ in counts[0].values())
    record: dict[str, Any] = {"row": row, "kib_per_token_layer": per_image / tokens / shape.depth / 1024}
    alive = [live(model, example.expand(n, *example.shape[1:]).clone()) for n in (1, 2)]
    record["live_kib_per_token_layer"] = (alive[1] - alive[0]) / tokens / shape.depth / 1024
    if detail:
        kinds: Counter = Counter()
        for nbytes, dims, dtype in counts[1].values():
            kinds[f"{list(dims)} {str(dtype).removeprefix('torch.')}"] += nbytes
        record["largest"] = [[kind, n / (2 * tokens * shape.depth)] for kind, n in kinds.most_common(12)]
    return record


def table(records: list[dict[str, Any]], command: str, px: int) -> str:
    """Markdown: KiB per token and layer, against timm's, under the command that counted them."""
    lines = [f"`{command}` (CPU, torch {torch.__version__}; {px} px images, bf16 autocast, the GPU code path with the "
             "Triton kernels interpreted). Per token and layer: the bytes autograd keeps for the backward (saved) and "
             "the bytes the forward allocated that are still live after it (live).", "",
             "| row | saved: KiB per token and layer | vs timm | live after the forward: KiB per token and layer "
             "| vs timm |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {r['row']} | {r['kib_per_token_layer']:.2f} | {r['vs_timm']:.2f}x | "
              f"{r['live_kib_per_token_layer']:.2f} | {r['live_vs_timm']:.2f}x |" for r in records]  # fmt: skip
    for r in records:
        if r.get("largest"):
            lines += ["", f"{r['row']}, bytes per token and layer by kind of tensor (batch of 2; weights' bf16 copies included):", ""]
            lines += [f"- {kind}: {n:,.0f}" for kind, n in r["largest"]]
    return "\n".join(lines) + "\n"


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """KiB per token and layer of each row, timm's marked (skipped without matplotlib)."""
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
    ax.axhline(records[0]["live_kib_per_token_layer"], color="grey", linewidth=0.8, label="timm ViT-S, live")
    ax.set_xticks(list(x), [r["row"] for r in records])
    ax.set_ylabel("KiB per token and layer")
    ax.set_title("Activations of one forward (bf16 autocast, GPU code path, counted on CPU)", fontsize=9)
    ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    rows = [r for r in vision_speed.row_names() if not r.endswith("-cross")]
    p.add_argument("--rows", nargs="+", default=rows, help=f"rows of vision_speed.py (default: {' '.join(rows)})")
    p.add_argument("--detail", action="store_true", help="also list each row's largest kinds of kept tensor")
    p.add_argument("--smoke", action="store_true", help="vision_speed's tiny model (a check that the rows run)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "saved_memory_cpu", help="file stem")
    args = p.parse_args()
    try:
        rows = vision_speed.select(args.rows)  # timm first; a mixer's name selects its rows; +ckpt, +ckpt_mixer
    except SystemExit as e:
        raise SystemExit(f"saved_memory: {str(e).removeprefix('vision_speed: ')}") from None
    dispatch.on_cuda = lambda x: True  # the GPU path: each op keeps what its fast path keeps (this process only)
    shape, px = (vision_speed.SMOKE, SMOKE_PX) if args.smoke else (vision_speed.REAL, PX)
    records = []
    for row in rows:
        records.append(measure(row, shape, px, args.detail))
        for r in records:
            r["vs_timm"] = r["kib_per_token_layer"] / records[0]["kib_per_token_layer"]
            r["live_vs_timm"] = r["live_kib_per_token_layer"] / records[0]["live_kib_per_token_layer"]
        command = "python benchmarks/saved_memory.py " + " ".join(sys.argv[1:])
        write_results(args.out, {"px": px, "command": command, "records": records}, table(records, command, px))
        plot(records, args.out.with_name(args.out.name + ".png"))
        print(f"{row}: {records[-1]['kib_per_token_layer']:.2f} KiB per token and layer saved, "
              f"{records[-1]['live_kib_per_token_layer']:.2f} live", flush=True)


if __name__ == "__main__":
    sys.exit(main())
