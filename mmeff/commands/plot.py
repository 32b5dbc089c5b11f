"""`mmeff plot RUN_DIR`: training curves (loss, accuracy, learning rate, throughput) from a run's CSV logs as a PNG."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from mmeff.commands import command
from mmeff.config import ConfigError

def _base(column: str) -> str:
    """A logged column's metric name: 'train/acc_step' -> 'acc', 'val/token_acc' -> 'token_acc'."""
    return column.rsplit("/", 1)[-1].removesuffix("_step").removesuffix("_epoch")


# Panel -> test on a logged column name (Lightning's CSVLogger columns: "train/loss_step", "val/acc", "lr-AdamW", ...).
PANELS = {
    "loss": lambda c: "loss" in _base(c) or _base(c) in ("bpb", "ppl"),
    "accuracy": lambda c: _base(c).endswith("acc") or _base(c) in ("exact", "bleu", "f1", "map"),
    "learning rate": lambda c: c.startswith("lr-"),
    "throughput": lambda c: "per_sec" in c or "throughput" in c or c.endswith("/s"),
}


def read_logs(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every logged column of the run's `metrics.csv` files (all versions, i.e. resumed runs) as (step, value)."""
    files = sorted(run.rglob("metrics.csv"))
    if not files:
        raise ConfigError(f"{run}: no metrics.csv below it (trainer.logger csv writes <run_dir>/logs/version_N/metrics.csv)")
    series: dict[str, list[tuple[int, float]]] = {}
    for file in files:
        with file.open(newline="") as f:
            for row in csv.DictReader(f):
                step = row.get("step")
                for key, value in row.items():
                    if key not in ("step", "epoch") and value not in ("", None) and step not in ("", None):
                        series.setdefault(key, []).append((int(float(step)), float(value)))
    return {k: sorted(v) for k, v in series.items()}


def plot_run(run: Path, out: Path) -> list[str]:
    """Write the curves of run folder `run` to `out` (PNG), one panel per kind of metric; return the panels drawn."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    series = read_logs(run)
    panels = {name: sorted(c for c in series if test(c)) for name, test in PANELS.items()}
    panels = {name: cols for name, cols in panels.items() if cols}
    if not panels:
        raise ConfigError(f"{run}: its logs hold no loss, accuracy, lr or throughput columns (found: {', '.join(sorted(series))})")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), layout="constrained", squeeze=False)
    for ax, (name, cols) in zip(axes[0], panels.items()):
        for col in cols:
            steps, values = zip(*series[col])
            ax.plot(steps, values, label=col, marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set(title=name, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(run.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return list(panels)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder (runs/<name>), or any folder holding Lightning CSV logs")
    p.add_argument("--out", help="PNG to write (default: RUN/curves.png)")


@command(
    "plot", "plot a run's loss, accuracy, learning rate and throughput curves from its CSV logs (PNG)", _arguments,
    examples=["mmeff plot runs/digits", "mmeff plot runs/python_docs_gla --out gla.png"],
)
def plot(args: argparse.Namespace) -> int:
    run = Path(args.run)
    if not run.is_dir():
        raise FileNotFoundError(f"no run folder at {run}")
    out = Path(args.out) if args.out else run / "curves.png"
    panels = plot_run(run, out)
    print(f"{', '.join(panels)} curves written to {out}")
    return 0
