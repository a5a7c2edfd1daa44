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


def histogram_grid(panels: Sequence[tuple], name: str, caption: str = "", dpi: int = 110,
                   columns: int = 4) -> Figure:
    """Small multiples of pre-binned histograms: `panels` is (title, counts, edges) per panel, all drawn into one
    figure so a page of layers is one image, not one file per layer. A dashed line marks 0 inside the range; a
    panel without counts (e.g. only non-finite values) says so."""
    from matplotlib.ticker import MaxNLocator

    columns = max(1, min(columns, len(panels)))
    rows = max(1, -(-len(panels) // columns))
    fig = MplFigure(figsize=(2.7 * columns, 1.75 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax, (title, counts, edges) in zip(axes.flat, panels):
        counts = np.asarray(counts, dtype=np.float64)
        edges = np.asarray(edges, dtype=np.float64)
        ax.set_title(_short(title, 44), fontsize=7)
        ax.tick_params(labelsize=6, length=2)
        ax.set_yticks([])
        if counts.size == 0 or counts.sum() == 0:
            ax.text(0.5, 0.5, "no finite values", ha="center", va="center", fontsize=7, transform=ax.transAxes)
            ax.set_xticks([])
            continue
        ax.stairs(counts, edges, fill=True, color=BLUE, linewidth=0)
        if edges[0] < 0 < edges[-1]:
            ax.axvline(0.0, color=RED, linewidth=0.6, linestyle="--")
        ax.set_xlim(edges[0], edges[-1])
        ax.xaxis.set_major_locator(MaxNLocator(4))
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    fig.subplots_adjust(hspace=0.75, wspace=0.12)
    return to_figure(fig, name, caption, dpi)


def filter_grid(tiles: np.ndarray, name: str, caption: str = "", dpi: int = 110, title: str = "") -> Figure:
    """Convolution filters as one mosaic of tiles (row-major, 1-pixel white gaps).

    (N, 3, kh, kw): colour tiles, each filter min-max normalised on its own, so a tile shows the filter's pattern and
    colour preference, not its magnitude; non-finite entries are drawn black.
    (N, kh, kw): grey tiles on one symmetric scale shared by all tiles (mid-grey is 0, ±max|w|) with a colorbar,
    so magnitudes compare across filters; non-finite entries are drawn red.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    tiles = np.asarray(tiles, dtype=np.float64)
    rgb = tiles.ndim == 4
    count, kh, kw = tiles.shape[0], tiles.shape[-2], tiles.shape[-1]
    columns = int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / columns))
    mosaic = np.ones((rows * (kh + 1) - 1, columns * (kw + 1) - 1, 3))  # (H, W, 3) white gaps
    norm = None
    if rgb:
        low = np.nanmin(np.where(np.isfinite(tiles), tiles, np.nan), axis=(1, 2, 3), keepdims=True)  # (N, 1, 1, 1)
        high = np.nanmax(np.where(np.isfinite(tiles), tiles, np.nan), axis=(1, 2, 3), keepdims=True)
        span = np.where(high > low, high - low, 1.0)
        scaled = np.where(np.isfinite(tiles), (tiles - low) / span, 0.0)  # (N, 3, kh, kw) in [0, 1]
        scaled = np.where(high > low, scaled, 0.5)
        coloured = np.nan_to_num(scaled).transpose(0, 2, 3, 1)  # (N, kh, kw, 3)
    else:
        finite = np.isfinite(tiles)
        limit = float(np.abs(tiles[finite]).max()) if finite.any() else 1.0
        limit = limit if limit > 0 else 1.0
        norm = Normalize(-limit, limit)
        coloured = colormaps["gray"](norm(np.where(finite, tiles, 0.0)))[..., :3]  # (N, kh, kw, 3)
        coloured[~finite] = (0.85, 0.1, 0.1)
    for index in range(count):
        r, c = divmod(index, columns)
        mosaic[r * (kh + 1): r * (kh + 1) + kh, c * (kw + 1): c * (kw + 1) + kw] = coloured[index]
    width = float(np.clip(0.55 * columns + 1.5, 3.0, 6.0))
    fig = MplFigure(figsize=(width, max(1.6, width * mosaic.shape[0] / mosaic.shape[1] * 0.85 + 0.4)))
    ax = fig.add_subplot()
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(_short(title, 60), fontsize=8)
    if norm is not None:
        fig.colorbar(ScalarMappable(norm=norm, cmap="gray"), ax=ax, fraction=0.046, pad=0.03, label="weight")
    return to_figure(fig, name, caption, dpi)


def weight_heatmap(matrix: np.ndarray, name: str, caption: str = "", dpi: int = 110, title: str = "",
                   row_groups: Sequence[tuple] = (), xlabel: str = "input", ylabel: str = "output") -> Figure:
    """A weight matrix (rows: outputs, columns: inputs) on a diverging colormap centred at 0 (RdBu_r, symmetric
    limits ±max|w|) with a colorbar. NaN cells (non-finite weights) are drawn black. `row_groups` is
    (first_row, label) per block, e.g. the q, k, v thirds of an attention in_proj_weight: a line and a label each.
    Small matrices (≤ 64 cells) also print each value."""
    from matplotlib import colormaps

    matrix = np.asarray(matrix, dtype=np.float64)
    finite = np.isfinite(matrix)
    limit = float(np.abs(matrix[finite]).max()) if finite.any() else 1.0
    limit = limit if limit > 0 else 1.0
    n_rows, n_cols = matrix.shape
    ratio = float(np.clip(n_rows / max(n_cols, 1), 0.35, 1.6))
    width = 6.0 if n_rows * n_cols > 64 else 3.6
    fig = MplFigure(figsize=(width, width * ratio * 0.82 + 0.6))
    ax = fig.add_subplot()
    cmap = colormaps["RdBu_r"].with_extremes(bad="black")
    image = ax.imshow(np.where(finite, matrix, np.nan), cmap=cmap, vmin=-limit, vmax=limit, aspect="auto",
                      interpolation="nearest")
    for first, label in row_groups:
        if first > -0.5:
            ax.axhline(first, color="black", linewidth=0.8)
        ax.text(0.01, first + 0.5, label, transform=ax.get_yaxis_transform(), ha="left", va="top", fontsize=8,
                fontweight="bold", bbox=dict(facecolor="white", alpha=0.75, edgecolor="none", pad=1.0))
    if n_rows * n_cols <= 64:
        for i in range(n_rows):
            for j in range(n_cols):
                ax.text(j, i, f"{matrix[i, j]:.3g}", ha="center", va="center", fontsize=7,
                        color="white" if not finite[i, j] or abs(matrix[i, j]) > 0.6 * limit else "black")
        ax.set_xticks(range(n_cols))
        ax.set_yticks(range(n_rows))
    ax.tick_params(labelsize=7)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    if title:
        ax.set_title(_short(title, 60), fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03, label="weight")
    return to_figure(fig, name, caption, dpi)


def map_grid(maps: List[np.ndarray], titles: List[str], name: str, cmap: str = "inferno", caption: str = "",
             columns: int = 6, dpi: int = 110) -> Figure:
    """Small multiples of 2-D maps on one shared [0, 1] colour scale (e.g. mean CAM per class), one colorbar."""
    count = max(1, len(maps))
    columns = min(columns, count)
    rows = (count + columns - 1) // columns
    fig = MplFigure(figsize=(1.7 * columns + 0.8, 1.8 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    image = None
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < len(maps):
            image = ax.imshow(maps[i], cmap=cmap, vmin=0.0, vmax=1.0, interpolation="bilinear")
            ax.set_title(_short(titles[i], 22), fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.025, pad=0.02)
    return to_figure(fig, name, caption, dpi)
