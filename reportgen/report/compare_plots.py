"""The comparison page's figures: accuracy against cost with the Pareto front, the classes × runs heatmap,
per-layer lines for checkpoints, the per-image scores of two runs against each other and the histogram of per-image
count differences. numpy in, report Figure out (matplotlib Figure objects, no pyplot state)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
from matplotlib.figure import Figure as MplFigure

from reportgen.report.elements import Figure
from reportgen.report.plots import BLUE, GREY, RED, _short, to_figure


def accuracy_vs_cost(names: Sequence[str], cost: Sequence[float], accuracy: Sequence[float],
                     intervals: Sequence[Tuple[float, float]], front: Sequence[bool], name: str, xlabel: str,
                     caption: str, log_x: bool = False) -> Optional[Figure]:
    """One point per run with its 95 % interval as an error bar; the Pareto front joined by a line and drawn red.
    None when fewer than one run has both numbers."""
    cost = np.asarray(cost, dtype=np.float64)
    accuracy = np.asarray(accuracy, dtype=np.float64)
    known = np.isfinite(cost) & np.isfinite(accuracy)
    if not known.any():
        return None
    fig = MplFigure(figsize=(6.4, 3.8))
    ax = fig.add_subplot()
    for i in np.flatnonzero(known):
        low, high = intervals[i]
        colour = RED if front[i] else BLUE
        ax.errorbar(cost[i], 100 * accuracy[i], yerr=[[100 * (accuracy[i] - low)], [100 * (high - accuracy[i])]],
                    fmt="o", color=colour, ecolor=GREY, capsize=3, markersize=6)
        ax.annotate(_short(names[i], 32), (cost[i], 100 * accuracy[i]), textcoords="offset points", xytext=(6, 4),
                    fontsize=7)
    on_front = [i for i in np.flatnonzero(known) if front[i]]
    if len(on_front) > 1:
        order = sorted(on_front, key=lambda i: cost[i])
        ax.plot(cost[order], 100 * accuracy[order], color=RED, linewidth=1, linestyle="--", label="Pareto front")
        ax.legend(frameon=False, fontsize=7, loc="lower right")
    if log_x and (cost[known] > 0).all() and cost[known].max() / max(cost[known].min(), 1e-12) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    return to_figure(fig, name, caption)


def class_heatmap(values: np.ndarray, classes: Sequence[str], runs: Sequence[str], name: str,
                  caption: str) -> Figure:
    """values (classes, runs) in [0, 1]: per-class accuracy, one row per class, the value printed in each cell
    when the grid is small enough to read."""
    n_classes, n_runs = values.shape
    fig = MplFigure(figsize=(min(12.0, 2.5 + 1.3 * n_runs), min(16.0, 1.2 + 0.28 * n_classes)))
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_yticks(range(n_classes), labels=[_short(c, 30) for c in classes], fontsize=7)
    ax.set_xticks(range(n_runs), labels=[_short(r, 24) for r in runs], rotation=30 if n_runs > 2 else 0,
                  ha="right" if n_runs > 2 else "center", fontsize=7)
    if n_classes * n_runs <= 300:
        for i in range(n_classes):
            for j in range(n_runs):
                if np.isfinite(values[i, j]):
                    ax.text(j, i, f"{100 * values[i, j]:.0f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="top-1 accuracy")
    return to_figure(fig, name, caption)


def layer_lines(layers: Sequence[str], series: Sequence[Tuple[str, Sequence[float]]], name: str, ylabel: str,
                caption: str, log_y: bool = False) -> Figure:
    """A value per layer (in model order) as lines with markers, one line per (label, values)."""
    count = len(layers)
    fig = MplFigure(figsize=(float(np.clip(0.3 * count + 3.0, 5.0, 11.0)), 3.0))
    ax = fig.add_subplot()
    colours = [BLUE, RED, "#e0a030", GREY, "#2e8b57"]
    for i, (label, values) in enumerate(series):
        ax.plot(range(count), np.asarray(values, dtype=np.float64), marker="o", markersize=3, linewidth=1.1,
                color=colours[i % len(colours)], label=_short(label, 40))
    step = max(1, count // 40)
    ax.set_xticks(range(0, count, step), labels=[_short(l, 28) for l in layers[::step]], rotation=60, ha="right",
                  fontsize=6)
    if log_y:
        ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(frameon=False, fontsize=7)
    return to_figure(fig, name, caption)


def paired_scatter(x: Sequence[float], y: Sequence[float], name: str, xlabel: str, ylabel: str,
                   caption: str) -> Optional[Figure]:
    """One point per image, run a's score (x) against run b's (y) on [0, 1] axes with the diagonal: points above it
    are images b does better on. None without points."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if not len(x):
        return None
    fig = MplFigure(figsize=(4.2, 4.0))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color=GREY, linewidth=1, linestyle="--")
    colours = np.where(y > x, BLUE, np.where(y < x, RED, GREY))
    ax.scatter(x, y, s=10 if len(x) > 200 else 18, c=colours, alpha=0.7, linewidths=0)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_aspect("equal")
    ax.set_xlabel(_short(xlabel, 40))
    ax.set_ylabel(_short(ylabel, 40))
    ax.grid(alpha=0.3)
    return to_figure(fig, name, caption)


def difference_histogram(differences: Sequence[int], name: str, xlabel: str, caption: str) -> Optional[Figure]:
    """One bar per integer difference b − a (images with that difference): below zero (blue) the images where b
    has the lower count (does better), above (red) where a does, zero grey. None without differences."""
    values = np.asarray(differences, dtype=np.int64)
    if not len(values):
        return None
    low, high = int(min(values.min(), 0)), int(max(values.max(), 0))
    bins = np.arange(low, high + 1)
    counts = np.bincount(values - low, minlength=len(bins))
    fig = MplFigure(figsize=(float(np.clip(0.25 * len(bins) + 3.0, 4.5, 9.0)), 3.0))
    ax = fig.add_subplot()
    ax.bar(bins, counts, width=0.8, color=[BLUE if b < 0 else RED if b > 0 else GREY for b in bins])
    if len(bins) <= 25:
        ax.set_xticks(bins)
    ax.set_xlabel(_short(xlabel, 60))
    ax.set_ylabel("images")
    ax.grid(axis="y", alpha=0.3)
    return to_figure(fig, name, caption)
