"""Training plots from a run's metrics.jsonl: loss (train + validation), learning rate, tokens/s/GPU.

    python -m nemotune.recipes.plots <run_dir>          (writes <run_dir>/loss.png, lr.png, throughput.png)

Multi-stage runs keep one metrics.jsonl per stage (<run_dir>/<stage>/metrics.jsonl); every stage is drawn
on one time axis (``global_step``), with a dashed line where each later stage starts.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

METRICS_FILE = "metrics.jsonl"
FIGSIZE = (8.0, 4.5)  # inches
DPI = 100  # -> 800 x 450 pixel PNGs


@dataclass(frozen=True)
class PlotSpec:
    filename: str
    title: str
    ylabel: str
    series: tuple[tuple[str, str], ...]  # (metrics key, legend label)


PLOTS = (
    PlotSpec("loss.png", "Loss", "loss (answer tokens)", (("train/loss", "train"), ("val/loss", "validation"))),
    PlotSpec("lr.png", "Learning-rate schedule", "learning rate", (("train/lr", "lr"),)),
    PlotSpec("throughput.png", "Throughput", "tokens / s / GPU",
             (("train/tokens_per_sec_per_gpu", "tokens/s/GPU"),)),
    PlotSpec("reward.png", "GRPO reward", "mean reward", (("rl/reward_mean", "reward"),)),
    PlotSpec("kl.png", "GRPO KL to the reference", "KL per token", (("rl/kl", "KL"),)),
    PlotSpec("dpo.png", "DPO preference accuracy", "accuracy", (("dpo/accuracy", "accuracy"),)),
)


def metrics_files(run_dir: str | Path) -> list[Path]:
    """The run's metrics.jsonl plus one per stage subdir."""
    run_dir = Path(run_dir)
    files = [run_dir / METRICS_FILE] if (run_dir / METRICS_FILE).is_file() else []
    files += sorted(p for p in run_dir.glob(f"*/{METRICS_FILE}") if p.is_file())
    return files


def load_metrics(run_dir: str | Path) -> list[dict]:
    """All metric rows of a run on one axis ``x`` (global_step, else step), sorted.

    A resumed run re-logs the steps after its last checkpoint: the last row logged for a (stage, x, kind)
    wins, so the plot shows what the finished run did.
    """
    files = metrics_files(run_dir)
    if not files:
        raise FileNotFoundError(f"{run_dir}: no {METRICS_FILE} (neither in the run dir nor in stage subdirs); "
                                "point at the run's output dir (run.output_dir of the training config)")
    latest: dict[tuple, dict] = {}
    for path in files:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    continue
                row = json.loads(line)
                x = row.get("global_step", row.get("step"))
                if x is None:
                    continue
                kind = "val" if any(k.startswith("val/") for k in row) else "train"
                stage = row.get("stage") or (path.parent.name if path.parent != Path(run_dir) else "")
                latest[(stage, x, kind)] = {**row, "x": x, "stage": stage, "kind": kind}
    return sorted(latest.values(), key=lambda r: (r["x"], r["kind"] == "val"))


def stage_starts(rows: Sequence[dict]) -> list[tuple[str, float]]:
    """(stage, first x) of every stage, in time order."""
    first: dict[str, float] = {}
    for row in rows:
        first.setdefault(row["stage"], row["x"])
    return sorted(first.items(), key=lambda kv: kv[1])


def make_plots(run_dir: str | Path) -> list[Path]:
    """Write one PNG per plot that has data into ``run_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    rows = load_metrics(run_dir)
    starts = stage_starts(rows)
    written = []
    for spec in PLOTS:
        series = []
        for key, label in spec.series:
            points = [(r["x"], r[key], r["stage"]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                series.append((label, points))
        if not series:
            continue
        fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
        try:
            for i, (label, points) in enumerate(series):
                # One segment per stage, same colour: no line is drawn across a stage boundary.
                segments = [[(x, y) for x, y, st in points if st == stage] for stage, _ in starts]
                for k, seg in enumerate(s for s in segments if s):
                    xs, ys = zip(*seg)
                    ax.plot(xs, ys, color=f"C{i}", marker="o" if len(points) < 30 else None, markersize=3,
                            label=label if k == 0 else None)
            for stage, x in starts[1:]:
                ax.axvline(x, color="gray", linestyle="--", linewidth=1)
                ax.annotate(stage, (x, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                            textcoords="offset points", fontsize=8, color="gray")
            ax.set_title(spec.title + (f" ({', '.join(s for s, _ in starts)})" if len(starts) > 1 else ""))
            ax.set_xlabel("global step" if len(starts) > 1 else "step")
            ax.set_ylabel(spec.ylabel)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
            if len(series) > 1:
                ax.legend()
            fig.tight_layout()
            path = run_dir / spec.filename
            fig.savefig(path, dpi=DPI)
        finally:
            plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nemotune.recipes.plots",
        description="Plot a run's metrics.jsonl (train/val loss, LR schedule, tokens/s/GPU) as PNGs in the run dir; "
        "multi-stage runs (<run_dir>/<stage>/metrics.jsonl) share one global-step axis.",
    )
    parser.add_argument("run_dir", help="the training run's output dir (run.output_dir)")
    args = parser.parse_args(argv)
    try:
        paths = make_plots(args.run_dir)
    except FileNotFoundError as err:
        print(f"plots: error: {err}")
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
