"""Plot a run's logged metrics (the CSV logger's metrics.csv) for a model card.

    .venv/bin/python tools/plot_training.py logs/<run> data/<name>-training.png [--keys train/loss_simple_step ...]
    .venv/bin/python tools/plot_training.py logs/<stage 1>@4000 logs/<stage 2> data/<name>-training.png

Each key gets its own panel against global_step; the raw points are faint and a running mean (window --smooth)
is drawn over them. The lr panel shows the warm-up. Several runs are drawn one after the other (a stage that starts
from the previous one's weights restarts its step count); RUN@STEP keeps that run's steps up to STEP (the step of
the checkpoint the next stage started from), and a dashed line marks where each later stage begins.
"""
from __future__ import annotations

import argparse
import csv
import glob
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_metrics(run: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """key -> (steps, values), merged over the run's CSV folders (a resumed run writes a new one). A resumed run
    logs again the steps between its checkpoint and where the earlier process stopped: the later log wins."""
    series: dict[str, dict[float, float]] = {}
    for path in sorted(glob.glob(os.path.join(run, "csv_*", "metrics.csv"))):
        with open(path) as f:
            for row in csv.DictReader(f):
                step = row.get("step") or row.get("global_step")
                for key, value in row.items():
                    if value not in ("", None) and key not in ("epoch", "step", "global_step") and step:
                        series.setdefault(key, {})[float(step)] = float(value)
    return {k: (np.array(sorted(v)), np.array([v[s] for s in sorted(v)])) for k, v in series.items()}


def read_stages(runs: list[str]) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[float]]:
    """Metrics of consecutive stages on one step axis, and the steps where stages 2, 3, ... begin."""
    merged: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    offset, boundaries = 0.0, []
    for i, spec in enumerate(runs):
        run, _, last = spec.partition("@")
        if not os.path.isdir(run):
            raise SystemExit(f"plot_training: {run!r} is not a run folder")
        metrics = read_metrics(run)
        if i:
            boundaries.append(offset)
        for key, (steps, values) in metrics.items():
            keep = steps <= float(last) if last else np.ones_like(steps, dtype=bool)
            merged.setdefault(key, []).append((steps[keep] + offset, values[keep]))
        offset += float(last) if last else max((s.max() for s, _ in metrics.values() if len(s)), default=0.0)
    return {k: tuple(np.concatenate(parts) for parts in zip(*v)) for k, v in merged.items()}, boundaries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN[@STEP]")
    parser.add_argument("out")
    parser.add_argument("--keys", nargs="+", default=["train/loss_simple_step", "val/loss_simple_ema", "lr-AdamW"])
    parser.add_argument("--smooth", type=int, default=10)
    parser.add_argument("--title", default=None)
    args = parser.parse_args()
    metrics, boundaries = read_stages(args.runs)
    keys = [k for k in args.keys if k in metrics]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        steps, values = metrics[key]
        order = np.argsort(steps, kind="stable")
        steps, values = steps[order], values[order]
        ax.plot(steps, values, ".", alpha=0.25, markersize=3)
        if len(values) > args.smooth and "lr" not in key:
            kernel = np.ones(args.smooth) / args.smooth
            ax.plot(steps[args.smooth - 1:], np.convolve(values, kernel, mode="valid"), "-")
        for b in boundaries:
            ax.axvline(b, color="grey", linestyle="--", linewidth=1)
        ax.set_title(key, fontsize=9); ax.set_xlabel("step"); ax.grid(alpha=0.3)
        if "loss" in key:
            ax.set_yscale("log")
    if args.title:
        fig.suptitle(args.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out} ({', '.join(keys)})")


if __name__ == "__main__":
    main()
