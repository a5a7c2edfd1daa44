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
    """Small multiples of pre-binned histograms: `panels` is (title, counts, edges) per panel, all in one figure so a
    page of layers is one image, not one file per layer. Each panel has its own x range (min and max printed under
    it, a red dashed line at 0 when 0 is inside) and its own height scale. The panels share one matplotlib axes:
    a grid of subplots costs about 4x more to draw (axes and ticks dominate), which matters at 100+ layers."""
    from matplotlib.patches import Rectangle

    columns = max(1, min(columns, len(panels)))
    rows = max(1, -(-len(panels) // columns))
    fig = MplFigure(figsize=(2.75 * columns, 1.45 * rows))
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_axis_off()
    ax.set_xlim(0.0, columns)
    ax.set_ylim(-rows, 0.0)
    left, width, bottom, height = 0.05, 0.9, 0.27, 0.5  # plot area inside each unit cell, from its top-left
    for index, (title, counts, edges) in enumerate(panels):
        row, col = divmod(index, columns)
        x0, y0 = col + left, -row - bottom - height  # lower-left corner of the plot area
        counts = np.asarray(counts, dtype=np.float64)
        edges = np.asarray(edges, dtype=np.float64)
        ax.add_patch(Rectangle((x0, y0), width, height, fill=False, edgecolor=GREY, linewidth=0.6))
        ax.text(col + 0.5, -row - 0.2, _short(title, 46), ha="center", va="bottom", fontsize=7)
        if counts.size == 0 or counts.sum() == 0 or not edges[-1] > edges[0]:
            ax.text(x0 + width / 2, y0 + height / 2, "no finite values", ha="center", va="center", fontsize=7)
            continue
        xs = x0 + width * (edges - edges[0]) / (edges[-1] - edges[0])  # (bins + 1,)
        ax.stairs(y0 + height * counts / counts.max(), xs, baseline=y0, fill=True, color=BLUE, linewidth=0)
        if edges[0] < 0 < edges[-1]:
            zero = x0 + width * (0 - edges[0]) / (edges[-1] - edges[0])
            ax.plot([zero, zero], [y0, y0 + height], color=RED, linewidth=0.7, linestyle="--")
        ax.text(x0, y0 - 0.03, f"{edges[0]:.3g}", ha="left", va="top", fontsize=6, color="#444444")
        ax.text(x0 + width, y0 - 0.03, f"{edges[-1]:.3g}", ha="right", va="top", fontsize=6, color="#444444")
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
                   row_groups: Sequence[tuple] = (), xlabel: str = "input", ylabel: str = "output",
                   original_shape: Optional[tuple] = None) -> Figure:
    """A weight matrix (rows: outputs, columns: inputs) on a diverging colormap centred at 0 (RdBu_r, symmetric
    limits ±max|w|) with a colorbar. NaN cells (non-finite weights) are drawn black. `original_shape` is the
    (rows, columns) before any downsampling, so the axes count original rows and columns. `row_groups` is
    (first_row, label) per block in original rows, e.g. the q, k, v thirds of an attention in_proj_weight: a line
    and a label each. Small matrices (≤ 64 cells) also print each value."""
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
    shown_rows, shown_cols = original_shape or matrix.shape
    image = ax.imshow(np.where(finite, matrix, np.nan), cmap=cmap, vmin=-limit, vmax=limit, aspect="auto",
                      interpolation="nearest", extent=(-0.5, shown_cols - 0.5, shown_rows - 0.5, -0.5))
    for first, label in row_groups:
        if first > 0:
            ax.axhline(first - 0.5, color="black", linewidth=0.8)
        ax.text(0.01, first, label, transform=ax.get_yaxis_transform(), ha="left", va="top", fontsize=8,
                fontweight="bold", bbox=dict(facecolor="white", alpha=0.75, edgecolor="none", pad=1.0))
    if n_rows * n_cols <= 64 and (shown_rows, shown_cols) == (n_rows, n_cols):
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


def to_image_figure(fig: MplFigure, name: str, caption: str = "", dpi: int = 110,
                    image_format: str = "jpeg") -> Figure:
    """Render a figure as JPEG/WebP/PNG (`report.image_format`): photo-like figures (maps laid over images) are
    many times smaller as JPEG than as PNG."""
    FigureCanvasAgg(fig)
    fmt = image_format if image_format in ("jpeg", "png", "webp") else "jpeg"
    buffer = io.BytesIO()
    options = {"pil_kwargs": {"quality": 85}} if fmt in ("jpeg", "webp") else {}
    fig.savefig(buffer, format=fmt, dpi=dpi, bbox_inches="tight", facecolor="white", **options)
    from PIL import Image

    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    return Figure(data=data, name=name, caption=caption, format=fmt, width=width, height=height)


def overlay_grid(tiles: Sequence[Sequence[Optional[np.ndarray]]], row_labels: Sequence[str],
                 col_labels: Sequence[str], name: str, cmap: str, caption: str = "", dpi: int = 110,
                 image_format: str = "jpeg", colorbar_label: str = "") -> Figure:
    """Rows x columns of ready-made (H, W, 3) uint8 tiles (e.g. maps laid over images; None leaves a cell empty),
    row labels on the left, column labels on top, and one colorbar of `cmap` over [0, 1] for all of them."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    rows, columns = len(tiles), max((len(r) for r in tiles), default=1)
    fig = MplFigure(figsize=(1.05 * columns + 1.2, 1.08 * rows + 0.35))
    axes = fig.subplots(rows, columns, squeeze=False)
    for r in range(rows):
        for c in range(columns):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            tile = tiles[r][c] if c < len(tiles[r]) else None
            if tile is not None:
                ax.imshow(tile, interpolation="bilinear")
            if r == 0 and c < len(col_labels):
                ax.set_title(_short(col_labels[c], 16), fontsize=7)
            if c == 0 and r < len(row_labels):
                ax.set_ylabel(_short(row_labels[r], 18), fontsize=6)
    fig.subplots_adjust(wspace=0.04, hspace=0.08)
    fig.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap), ax=axes.ravel().tolist(), fraction=0.02,
                 pad=0.01, label=colorbar_label)
    return to_image_figure(fig, name, caption, dpi, image_format)


def layer_head_heatmap(values: np.ndarray, layer_labels: Sequence[str], name: str, label: str, caption: str = "",
                       dpi: int = 110, vmin: Optional[float] = None, vmax: Optional[float] = None,
                       cmap: str = "viridis", annotate: str = ".2f") -> Figure:
    """A (layers, heads) table of numbers as a heatmap, one row per layer; NaN cells (a layer with fewer heads)
    are drawn grey. Cells carry their value when the table is small enough to read."""
    from matplotlib import colormaps

    values = np.asarray(values, dtype=np.float64)
    n_layers, n_heads = values.shape
    fig = MplFigure(figsize=(float(np.clip(0.42 * n_heads + 2.4, 4.0, 12.0)), max(1.8, 0.32 * n_layers + 1.0)))
    ax = fig.add_subplot()
    palette = colormaps[cmap].with_extremes(bad="#d0d4d9")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=palette, vmin=vmin, vmax=vmax, aspect="auto",
                      interpolation="nearest")
    if annotate and n_layers * n_heads <= 400:
        finite = values[np.isfinite(values)]
        middle = (float(finite.min()) + float(finite.max())) / 2 if finite.size else 0.0
        for i in range(n_layers):
            for j in range(n_heads):
                if np.isfinite(values[i, j]):
                    ax.text(j, i, format(values[i, j], annotate), ha="center", va="center", fontsize=6,
                            color="white" if values[i, j] < middle else "black")
    ax.set_xticks(range(n_heads), labels=[str(h) for h in range(n_heads)], fontsize=7)
    ax.set_yticks(range(n_layers), labels=[_short(l, 32) for l in layer_labels], fontsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label=label)
    return to_figure(fig, name, caption, dpi)


def layer_head_scatter(values: np.ndarray, layer_labels: Sequence[str], name: str, ylabel: str, caption: str = "",
                       dpi: int = 110) -> Figure:
    """One dot per head at each layer (NaN skipped) and the layer's mean as a line: how a per-head quantity
    (e.g. mean attention distance) spreads and moves with depth."""
    values = np.asarray(values, dtype=np.float64)
    n_layers = values.shape[0]
    fig = MplFigure(figsize=(float(np.clip(0.45 * n_layers + 2.5, 4.5, 10.0)), 3.0))
    ax = fig.add_subplot()
    for i in range(n_layers):
        row = values[i][np.isfinite(values[i])]
        ax.scatter(np.full(row.shape, i), row, s=14, color=BLUE, alpha=0.7, linewidths=0)
    with np.errstate(invalid="ignore"):
        means = np.array([np.nanmean(r) if np.isfinite(r).any() else np.nan for r in values])
    ax.plot(range(n_layers), means, color=RED, linewidth=1.2, label="mean over heads")
    ax.set_xticks(range(n_layers), labels=[_short(l, 20) for l in layer_labels], rotation=45, ha="right",
                  fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    return to_figure(fig, name, caption, dpi)


def matrix_grid(matrices: Sequence[np.ndarray], titles: Sequence[str], name: str, caption: str = "",
                dpi: int = 110, cmap: str = "viridis", columns: int = 4, xlabel: str = "key token",
                ylabel: str = "query token", image_format: str = "png") -> Figure:
    """Small multiples of square matrices (e.g. token x token attention), each on its own colour scale with its own
    colorbar, since their ranges differ by orders of magnitude between layers."""
    count = max(1, len(matrices))
    columns = min(columns, count)
    rows = (count + columns - 1) // columns
    fig = MplFigure(figsize=(3.1 * columns, 2.8 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(matrices):
            ax.set_visible(False)
            continue
        image = ax.imshow(np.asarray(matrices[i], dtype=np.float64), cmap=cmap, interpolation="nearest")
        ax.set_title(_short(titles[i], 40), fontsize=8)
        ax.tick_params(labelsize=6)
        if i % columns == 0:
            ax.set_ylabel(ylabel, fontsize=7)
        if i // columns == rows - 1:
            ax.set_xlabel(xlabel, fontsize=7)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=6)
    fig.subplots_adjust(wspace=0.45, hspace=0.35)
    return to_image_figure(fig, name, caption, dpi, image_format)


def grouped_bars(values: np.ndarray, series: Sequence[str], groups: Sequence[str], name: str, ylabel: str,
                 caption: str = "", dpi: int = 110) -> Figure:
    """values (series, groups): one bar per series inside each group (e.g. per-class accuracy of each model)."""
    values = np.asarray(values, dtype=np.float64)
    n_series, n_groups = values.shape
    width = 0.8 / max(1, n_series)
    fig = MplFigure(figsize=(max(5.0, 0.5 * n_groups * max(1, n_series) ** 0.5 + 2), 3.2))
    ax = fig.add_subplot()
    positions = np.arange(n_groups)
    for i, label in enumerate(series):
        ax.bar(positions + (i - (n_series - 1) / 2) * width, np.nan_to_num(values[i]), width=width, label=label)
    ax.set_xticks(positions, labels=[_short(g) for g in groups], rotation=45 if n_groups > 6 else 0,
                  ha="right" if n_groups > 6 else "center", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return to_figure(fig, name, caption, dpi)
