"""numpy in, report Figure out. Matplotlib through Figure objects and the Agg canvas only (no pyplot state), so
plotting is thread-safe and never opens a window."""
from __future__ import annotations

import io
from typing import List, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure

from reportgen.report import Figure

BLUE, RED, GREY = "#3b6fb6", "#c8453a", "#9aa3ad"


def to_figure(fig: MplFigure, name: str, caption: str = "", dpi: int = 110) -> Figure:
    """Render a matplotlib figure to PNG bytes with its pixel size."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    data = buffer.getvalue()
    width, height = _png_size(data)
    return Figure(data=data, name=name, caption=caption, format="png", width=width, height=height)


def _png_size(data: bytes) -> tuple[int, int]:
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def confusion_matrix(counts: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], name: str,
                     caption: str = "", dpi: int = 110) -> Figure:
    """Heatmap of counts (rows: true class, columns: predicted), each row normalised to fractions so classes of
    different sizes compare; the count is printed in each non-empty cell when the matrix is small enough."""
    counts = np.asarray(counts, dtype=np.int64)
    row_sums = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, np.maximum(row_sums, 1))
    n_rows, n_cols = counts.shape
    size = max(3.5, min(14.0, 0.45 * max(n_rows, n_cols) + 2.0))
    fig = MplFigure(figsize=(size * max(1.0, n_cols / max(n_rows, 1)) ** 0.5, size))
    ax = fig.add_subplot()
    image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(n_cols), labels=[_short(c) for c in col_labels], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n_rows), labels=[_short(r) for r in row_labels], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (folder)")
    if n_rows * n_cols <= 400:
        for i in range(n_rows):
            for j in range(n_cols):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if fractions[i, j] > 0.6 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the row")
    return to_figure(fig, name, caption, dpi)


def horizontal_bars(values: Sequence[float], labels: Sequence[str], name: str, xlabel: str, caption: str = "",
                    xlim: Optional[tuple] = None, dpi: int = 110, highlight_below: Optional[float] = None) -> Figure:
    """One bar per label (e.g. per-class accuracy); bars under `highlight_below` drawn in red."""
    values = np.asarray(values, dtype=np.float64)
    fig = MplFigure(figsize=(6.0, max(1.6, 0.28 * len(values) + 0.8)))
    ax = fig.add_subplot()
    colours = [RED if highlight_below is not None and v < highlight_below else BLUE for v in values]
    positions = np.arange(len(values))
    ax.barh(positions, values, color=colours)
    ax.set_yticks(positions, labels=[_short(l) for l in labels], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    if xlim is not None:
        ax.set_xlim(*xlim)
    ax.grid(axis="x", alpha=0.3)
    return to_figure(fig, name, caption, dpi)


def stacked_histogram(counts: List[np.ndarray], edges: np.ndarray, labels: List[str], name: str, xlabel: str,
                      caption: str = "", dpi: int = 110) -> Figure:
    """Pre-binned histograms (fixed edges, so shard counts add up) drawn stacked."""
    fig = MplFigure(figsize=(6.0, 2.8))
    ax = fig.add_subplot()
    bottom = np.zeros(len(edges) - 1)
    colours = [BLUE, RED, GREY]
    for i, (c, label) in enumerate(zip(counts, labels)):
        ax.bar(edges[:-1], c, width=np.diff(edges), align="edge", bottom=bottom, color=colours[i % 3],
               label=label, edgecolor="white", linewidth=0.4)
        bottom = bottom + c
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    ax.set_xlim(edges[0], edges[-1])
    if len(labels) > 1:
        ax.legend(frameon=False, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return to_figure(fig, name, caption, dpi)


def _short(text: str, limit: int = 28) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"
