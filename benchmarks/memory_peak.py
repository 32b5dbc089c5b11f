"""What is live at the peak of a CUDA allocator history (`vision_speed.py --memory`'s pickles), by the code that
allocated it: a text table to read without a browser (pytorch.org/memory_viz draws the same history).

The history replays allocations ("alloc") and frees ("free_completed") from the start of recording; the bytes
allocated before it (weights, optimizer state, the batch) are the snapshot's allocated bytes at its end less the
history's net change. Each allocation live at the peak is charged to its first Python frame in mmeff,
timm or benchmarks/ (else its first frame; allocations of autograd's backward thread carry none).

    python benchmarks/memory_peak.py benchmarks/results/memory_gla-bi_1024.pickle [--top 25]
"""

from __future__ import annotations

import argparse
import pickle
from collections import defaultdict
from pathlib import Path
from typing import Any

OWN = ("mmeff/", "timm/", "benchmarks/")
MIB = 2**20


def origin(frames: list[dict[str, Any]]) -> str:
    """The frame an allocation is charged to, as 'file:line (function)'."""
    if not frames:
        return "(no Python frame: autograd's backward thread or C++)"
    own = [f for f in frames if any(part in f["filename"] for part in OWN)]
    f = (own or frames)[0]
    path = f["filename"]
    for part in OWN:
        if part in path:
            path = part + path.split(part, 1)[1]
            break
    return f"{path}:{f['line']} ({f['name']})"


def peak(snapshot: dict[str, Any], device: int = 0) -> dict[str, Any]:
    """Bytes of `device`'s history at its peak: {"peak", "older" (live then, allocated before the history), "end",
    "live": {origin: [bytes, count]} of the history's allocations live then}."""
    live: dict[int, tuple[int, str]] = {}
    current = best = 0
    best_live: dict[int, tuple[int, str]] = {}
    for e in snapshot["device_traces"][device]:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], origin(e.get("frames") or []))
            current += e["size"]
            if current > best:
                best, best_live = current, dict(live)
        elif e["action"] == "free_completed":  # also of blocks allocated before the history
            current -= e["size"]
            live.pop(e["addr"], None)
    end = sum(b["size"] for s in snapshot["segments"] if s.get("device", 0) == device for b in s["blocks"]
              if b["state"] == "active_allocated")  # fmt: skip
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, where in best_live.values():
        groups[where][0] += size
        groups[where][1] += 1
    top = end - current + best  # the allocated bytes at the history's peak
    return {"peak": top, "older": top - sum(size for size, _ in best_live.values()), "end": end, "live": dict(groups)}


def report(found: dict[str, Any], top: int) -> str:
    """Text table of `peak`'s result."""
    lines = [f"peak {found['peak'] / MIB:,.1f} MiB: {found['older'] / MIB:,.1f} MiB allocated before the history "
             f"(weights, optimizer state, the batch), {(found['peak'] - found['older']) / MIB:,.1f} MiB during it, "
             f"live then as below; {found['end'] / MIB:,.1f} MiB at its end", "",
             f"{'MiB':>10} {'count':>6}  allocated at"]  # fmt: skip
    for where, (size, count) in sorted(found["live"].items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{size / MIB:10,.1f} {count:6d}  {where}")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("snapshot", type=Path, help="a pickle of torch.cuda.memory._dump_snapshot")
    p.add_argument("--top", type=int, default=25, help="rows of the table")
    p.add_argument("--device", type=int, default=0)
    args = p.parse_args()
    try:
        with args.snapshot.open("rb") as f:
            snapshot = pickle.load(f)  # the allocator's own dump, written by benchmarks/vision_speed.py --memory
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise SystemExit(f"memory_peak: cannot read the snapshot {args.snapshot}: {e}") from None
    traces = snapshot.get("device_traces") if isinstance(snapshot, dict) else None
    if traces is None:
        raise SystemExit(f"memory_peak: {args.snapshot} is not a CUDA allocator snapshot (no 'device_traces')")
    if not 0 <= args.device < len(traces):
        raise SystemExit(f"memory_peak: --device {args.device}: the snapshot has devices 0 to {len(traces) - 1}")
    print(report(peak(snapshot, args.device), args.top), end="")


if __name__ == "__main__":
    main()
