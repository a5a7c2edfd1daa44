"""numpy in, report Figure out. Matplotlib through Figure objects and the Agg canvas only (no pyplot state), so
plotting is thread-safe and never opens a window."""
from __future__ import annotations

import io
from typing import List, Optional, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure

from reportgen.report.elements import Figure

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
                     caption: str = "", dpi: int = 110, ylabel: str = "true (folder)") -> Figure:
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
    ax.set_ylabel(ylabel)
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
                   original_shape: Optional[tuple] = None, saturate_percentile: float = 99.0) -> Figure:
    """A weight matrix (rows: outputs, columns: inputs) on a diverging colormap centred at 0 (RdBu_r) with a
    colorbar. The limits are symmetric, ±(the `saturate_percentile` percentile of |w|): one outlier weight would
    otherwise wash every other cell out to white; cells beyond it saturate (the colorbar shows arrows). NaN cells
    (non-finite weights) are drawn black. `original_shape` is the (rows, columns) before any downsampling, so the
    axes count original rows and columns. `row_groups` is (first_row, label) per block in original rows, e.g. the
    q, k, v thirds of an attention in_proj_weight: a line and a label each. Small matrices (≤ 64 cells) also print
    each value."""
    from matplotlib import colormaps

    matrix = np.asarray(matrix, dtype=np.float64)
    finite = np.isfinite(matrix)
    magnitude = np.abs(matrix[finite])
    peak = float(magnitude.max()) if magnitude.size else 0.0
    limit = float(np.percentile(magnitude, saturate_percentile)) if magnitude.size else 0.0
    limit = limit if limit > 0 else (peak if peak > 0 else 1.0)
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
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03, label="weight",
                 extend="both" if peak > limit else "neither")
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
                    image_format: str = "jpeg", tight: bool = True) -> Figure:
    """Render a figure as JPEG/WebP/PNG (`report.image_format`): photo-like figures (maps laid over images) are
    many times smaller as JPEG than as PNG. `tight=False` keeps the figure's own layout (one draw, not two)."""
    FigureCanvasAgg(fig)
    fmt = image_format if image_format in ("jpeg", "png", "webp") else "jpeg"
    buffer = io.BytesIO()
    options = {"pil_kwargs": {"quality": 85}} if fmt in ("jpeg", "webp") else {}
    fig.savefig(buffer, format=fmt, dpi=dpi, bbox_inches="tight" if tight else None, facecolor="white",
                **options)
    from PIL import Image

    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    return Figure(data=data, name=name, caption=caption, format=fmt, width=width, height=height)


def overlay_grid(tiles: Sequence[Sequence[Optional[np.ndarray]]], row_labels: Sequence[str],
                 col_labels: Sequence[str], name: str, cmap: str, caption: str = "", dpi: int = 110,
                 image_format: str = "jpeg", colorbar_label: str = "") -> Figure:
    """Rows x columns of ready-made (H, W, 3) uint8 tiles (e.g. maps laid over images; None leaves a cell empty)
    as one mosaic at the tiles' own resolution, row labels on the left, column labels on top, and one colorbar of
    `cmap` over [0, 1] for all of them. One image in one Axes: fast however many tiles there are."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    gap = 4
    rows, columns = len(tiles), max((len(r) for r in tiles), default=1)
    present = [t for r in tiles for t in r if t is not None]
    tile_h = max((t.shape[0] for t in present), default=1)
    tile_w = max((t.shape[1] for t in present), default=1)
    mosaic = np.full((rows * (tile_h + gap) - gap, columns * (tile_w + gap) - gap, 3), 255, dtype=np.uint8)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            if tile is not None:
                top, left = r * (tile_h + gap), c * (tile_w + gap)
                mosaic[top: top + tile.shape[0], left: left + tile.shape[1]] = tile
    height, width = mosaic.shape[0] / dpi, mosaic.shape[1] / dpi  # inches at one mosaic pixel per output pixel
    tops = [_short(l, 16) for l in list(col_labels)[:columns]] + [""] * (columns - len(col_labels))
    longest = max((len(t) for t in tops), default=0) * 0.055  # inches of 7 pt text
    rotate = longest > tile_w / dpi  # labels wider than a tile would overlap: slant them
    top = 0.15 + (longest * 0.71 if rotate else 0.2)
    fig = MplFigure(figsize=(width + 1.6, height + top + 0.05))
    total_h = height + top + 0.05
    ax = fig.add_axes((1.2 / (width + 1.6), 0.05 / total_h, width / (width + 1.6), height / total_h))
    ax.imshow(mosaic, interpolation="nearest")
    ax.xaxis.tick_top()
    ax.set_xticks([c * (tile_w + gap) + tile_w / 2 for c in range(columns)], labels=tops, fontsize=7,
                  rotation=45 if rotate else 0, ha="left" if rotate else "center",
                  rotation_mode="anchor" if rotate else "default")
    ax.set_yticks([r * (tile_h + gap) + tile_h / 2 for r in range(rows)],
                  labels=[_short(l, 22) for l in list(row_labels)[:rows]] + [""] * (rows - len(row_labels)),
                  fontsize=6)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    bar = fig.add_axes((1.0 - 0.32 / (width + 1.6), 0.15, 0.08 / (width + 1.6), 0.7))
    fig.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap), cax=bar, label=colorbar_label)
    bar.tick_params(labelsize=6)
    bar.yaxis.label.set_size(7)
    return to_image_figure(fig, name, caption, dpi, image_format, tight=False)


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
        low, high = image.get_clim()  # text colour from the cell's place on the colour scale, not the data range
        for i in range(n_layers):
            for j in range(n_heads):
                if np.isfinite(values[i, j]):
                    dark = (values[i, j] - low) < 0.5 * (high - low)
                    ax.text(j, i, format(values[i, j], annotate), ha="center", va="center", fontsize=6,
                            color="white" if dark else "black")
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


def _fit_tile(image: np.ndarray, height: int, width: int, smooth: bool = True) -> np.ndarray:
    """(h, w, 3) uint8 -> (height, width, 3) uint8, aspect kept, centred on white; `smooth` False: nearest
    neighbour (feature-map cells stay crisp squares)."""
    from PIL import Image

    image = np.ascontiguousarray(image)
    scale = min(height / image.shape[0], width / image.shape[1])
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))  # (w, h) for PIL
    method = Image.Resampling.BILINEAR if smooth else Image.Resampling.NEAREST
    resized = np.asarray(Image.fromarray(image).resize(size, method))
    out = np.full((height, width, 3), 255, dtype=np.uint8)
    top, left = (height - resized.shape[0]) // 2, (width - resized.shape[1]) // 2
    out[top:top + resized.shape[0], left:left + resized.shape[1]] = resized
    return out


def _mosaic_figure(mosaic: np.ndarray, dpi: int, margins: tuple) -> tuple:
    """A figure showing `mosaic` pixel for pixel inside (left, right, top, bottom) margins in pixels; returns
    (figure, axes) with the axes in mosaic pixel coordinates. One axes for a whole grid of pictures: drawing
    hundreds of small axes is what makes matplotlib slow."""
    left, right, top, bottom = margins
    height, width = mosaic.shape[:2]
    total_w, total_h = width + left + right, height + top + bottom
    fig = MplFigure(figsize=(total_w / dpi, total_h / dpi))
    ax = fig.add_axes((left / total_w, bottom / total_h, width / total_w, height / total_h))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_axis_off()
    return fig, ax


def activation_rows(rows: Sequence[tuple], name: str, caption: str = "", dpi: int = 110,
                    image_format: str = "jpeg", cmap: str = "viridis", overlay_label: str = "channel mean",
                    title: str = "") -> Figure:
    """Feature maps of a few images at one layer, one row per image: the input, a map laid over it, and a block of
    channel maps (two rows of tiles when more than 8), each tile labelled with its channel index. Every channel map
    of the figure shares one colour scale (1st to 99.5th percentile of the drawn values) and one colorbar, so tiles
    compare across channels and images. `rows`: (label, image (H, W, 3) uint8, overlay (H, W, 3) uint8 or None,
    maps (N, h, w), channel ids (N,)). Drawn as one mosaic image (fast at any number of tiles)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    n_maps = max([len(r[3]) for r in rows] + [1])
    tile_rows = 2 if n_maps > 8 else 1
    tile_cols = -(-n_maps // tile_rows)
    tile, gap, row_gap = 60, 3, 10
    big = 2 * tile + gap  # input and overlay side, pixels
    side = tile if tile_rows == 2 else big  # channel tile side
    start = 2 * big + 2 * gap + 8  # x of the first channel tile
    width = start + tile_cols * (side + gap) - gap
    height = len(rows) * (big + row_gap) - row_gap
    values = np.concatenate([np.asarray(r[3], dtype=np.float64).ravel() for r in rows] + [np.zeros(0)])
    values = values[np.isfinite(values)]
    low, high = (np.percentile(values, [1.0, 99.5]) if values.size else (0.0, 1.0))
    high = high if high > low else low + 1e-6
    norm = Normalize(float(low), float(high))
    palette = colormaps[cmap]
    mosaic = np.full((height, width, 3), 255, dtype=np.uint8)
    labels = []  # (x, y, text) of channel indices
    for i, (_, image, overlay, maps, channel_ids) in enumerate(rows):
        y0 = i * (big + row_gap)
        mosaic[y0:y0 + big, 0:big] = _fit_tile(image, big, big)
        if overlay is not None:
            mosaic[y0:y0 + big, big + gap:2 * big + gap] = _fit_tile(overlay, big, big)
        for j, (channel_map, channel) in enumerate(zip(maps, channel_ids)):
            r, c = divmod(j, tile_cols)
            rgb = (palette(norm(np.nan_to_num(np.asarray(channel_map, dtype=np.float64))))[..., :3] * 255 + 0.5)
            x, y = start + c * (side + gap), y0 + r * (side + gap)
            mosaic[y:y + side, x:x + side] = _fit_tile(rgb.astype(np.uint8), side, side, smooth=False)
            labels.append((x + 2, y + 2, str(int(channel))))
    fig, ax = _mosaic_figure(mosaic, dpi, (22, 70, 34 if title else 18, 2))
    if title:
        ax.text(-20, -20, title, ha="left", va="bottom", fontsize=8, fontweight="bold")
    for x, y, text in labels:
        ax.text(x, y, text, ha="left", va="top", fontsize=5, color="white",
                bbox=dict(facecolor="black", alpha=0.55, edgecolor="none", pad=0.5))
    for i, row in enumerate(rows):
        ax.text(-4, i * (big + row_gap) + big / 2, _short(row[0], 24), rotation=90, ha="right", va="center",
                fontsize=6)
    for x, text, align in ((big / 2, "input", "center"), (big + gap + big / 2, overlay_label, "center"),
                           (start, "strongest channels of each image (by mean); channel index in the corner",
                            "left")):
        ax.text(x, -4, text, ha=align, va="bottom", fontsize=6.5)
    total_w, total_h = fig.get_figwidth() * dpi, fig.get_figheight() * dpi
    bar_h = min(height, 2 * big + row_gap)
    top = 34 if title else 18
    cax = fig.add_axes(((width + 22 + 10) / total_w, (total_h - top - bar_h) / total_h, 9 / total_w, bar_h / total_h))
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax, extend="both")
    bar.ax.tick_params(labelsize=6)
    bar.set_label("activation", fontsize=6.5)
    return to_image_figure(fig, name, caption, dpi, image_format)


def crop_grid(tiles: Sequence[Sequence[Optional[tuple]]], row_labels: Sequence[str], name: str, caption: str = "",
              dpi: int = 110, image_format: str = "jpeg", title: str = "") -> Figure:
    """Rows of image crops (e.g. the images that excite one channel most, best first): each tile is (image
    (h, w, 3) uint8, caption (up to two short lines), marker (y, x) in tile pixels or None), drawn as one mosaic
    with the caption under each tile and the marker as a ring."""
    rows = max(1, len(tiles))
    columns = max([len(r) for r in tiles] + [1])
    side, gap, caption_h = 84, 4, 20
    width = columns * (side + gap) - gap
    height = rows * (side + caption_h + gap) - gap
    mosaic = np.full((height, width, 3), 255, dtype=np.uint8)
    marks, texts = [], []
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            if tile is None:
                continue
            image, text, marker = tile
            x, y = c * (side + gap), r * (side + caption_h + gap)
            mosaic[y:y + side, x:x + side] = _fit_tile(image, side, side)
            texts.append((x + side / 2, y + side + 1, text))
            if marker is not None:
                scale = min(side / image.shape[0], side / image.shape[1])
                offset_y = (side - round(image.shape[0] * scale)) // 2
                offset_x = (side - round(image.shape[1] * scale)) // 2
                marks.append((x + offset_x + (marker[1] + 0.5) * scale - 0.5,
                              y + offset_y + (marker[0] + 0.5) * scale - 0.5))
    fig, ax = _mosaic_figure(mosaic, dpi, (16, 2, 18 if title else 2, 2))
    if title:
        ax.text(-14, -4, title, ha="left", va="bottom", fontsize=8, fontweight="bold")
    if marks:
        points = np.array(marks)
        ax.scatter(points[:, 0], points[:, 1], s=60, facecolors="none", edgecolors="#00e5ff", linewidths=1.2)
    for x, y, text in texts:
        ax.text(x, y, text, ha="center", va="top", fontsize=5.5, linespacing=1.1)
    for r, label in enumerate(row_labels[:rows]):
        ax.text(-4, r * (side + caption_h + gap) + side / 2, _short(label, 22), rotation=90, ha="right",
                va="center", fontsize=6)
    return to_image_figure(fig, name, caption, dpi, image_format)


def percentile_bars(labels: Sequence[str], quantiles: np.ndarray, means: np.ndarray, name: str, xlabel: str,
                    caption: str = "", dpi: int = 110, linthresh: float = 1e-2) -> Figure:
    """One row per layer: a whisker from the 1st to the 99th percentile, a box from the 25th to the 75th, a tick
    at the median and a dot at the mean (`quantiles` (L, 5) in that order), on a symmetric-log axis so layers of
    very different scales share one figure."""
    quantiles = np.asarray(quantiles, dtype=np.float64)
    count = len(labels)
    fig = MplFigure(figsize=(6.4, max(1.6, 0.3 * count + 0.9)))
    ax = fig.add_subplot()
    for i in range(count):
        p01, p25, p50, p75, p99 = quantiles[i]
        if not np.all(np.isfinite(quantiles[i])):
            continue
        ax.plot([p01, p99], [i, i], color=GREY, linewidth=1.0, solid_capstyle="butt")
        ax.barh(i, p75 - p25, left=p25, height=0.55, color=BLUE, alpha=0.8)
        ax.plot([p50, p50], [i - 0.3, i + 0.3], color="black", linewidth=1.2)
        if np.isfinite(means[i]):
            ax.plot(means[i], i, "o", color=RED, markersize=3)
    ax.set_xscale("symlog", linthresh=linthresh)
    ax.set_yticks(range(count), labels=[_short(l, 30) for l in labels], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.axvline(0.0, color=GREY, linewidth=0.6, linestyle=":")
    ax.grid(axis="x", alpha=0.3)
    ax.tick_params(axis="x", labelsize=7)
    return to_figure(fig, name, caption, dpi)


def fraction_lines(labels: Sequence[str], series: Sequence[tuple], name: str, ylabel: str, caption: str = "",
                   dpi: int = 110) -> Figure:
    """Fractions (0..1) per layer in call order as lines with markers, one line per (label, values) in `series`;
    the y axis in percent."""
    count = len(labels)
    fig = MplFigure(figsize=(float(np.clip(0.45 * count + 3.0, 5.0, 10.0)), 2.9))
    ax = fig.add_subplot()
    colours = [RED, BLUE, "#e0a030", GREY]
    for i, (label, values) in enumerate(series):
        ax.plot(range(count), 100.0 * np.asarray(values, dtype=np.float64), marker="o", markersize=3.5,
                linewidth=1.2, color=colours[i % len(colours)], label=label)
    slanted = count > 4 or max([len(str(l)) for l in labels] + [0]) > 10
    ax.set_xticks(range(count), labels=[_short(l, 30) for l in labels], rotation=35 if slanted else 0,
                  ha="right" if slanted else "center", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-3, 103)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(frameon=False, fontsize=7)
    return to_figure(fig, name, caption, dpi)


def line_series(series: Sequence[tuple], name: str, xlabel: str, ylabel: str, caption: str = "", dpi: int = 110,
                marker: Optional[tuple] = None) -> Figure:
    """Lines of (label, x, y) on [0, 1] axes (precision-recall curves, metrics against a threshold), at most 12
    labelled in the legend; `marker` (x, y) is drawn as a red point (e.g. the best F1)."""
    fig = MplFigure(figsize=(5.6, 3.6))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["tab10"]
    for i, (label, x, y) in enumerate(series):
        ax.plot(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), linewidth=1.3,
                color=cmap(i % 10), label=_short(str(label), 24) if i < 12 else None)
    if marker is not None:
        ax.plot([marker[0]], [marker[1]], marker="o", markersize=7, color=RED, zorder=5)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(frameon=False, fontsize=7, loc="best")
    return to_figure(fig, name, caption, dpi)


def embedding_scatter(points: np.ndarray, groups: np.ndarray, group_names: Sequence[str], name: str, xlabel: str,
                      ylabel: str, caption: str = "", dpi: int = 110, legend_title: str = "") -> Figure:
    """2-D points (e.g. PCA of features), coloured by group (class index; -1 grey "none"); a legend up to 20
    groups. Rasterised, so a folder of 100k images stays a small PNG."""
    from matplotlib import colormaps

    points = np.asarray(points, dtype=np.float64)
    groups = np.asarray(groups)
    present = sorted(int(g) for g in np.unique(groups))
    palette = colormaps["tab10" if len(present) <= 10 else "tab20"]
    size = float(np.clip(1200.0 / max(len(points), 1) ** 0.5, 2.0, 22.0))
    fig = MplFigure(figsize=(6.4, 4.6))
    ax = fig.add_subplot()
    for i, group in enumerate(present):
        mask = groups == group
        colour = GREY if group < 0 else palette(i % palette.N)
        label = "none" if group < 0 else (group_names[group] if group < len(group_names) else str(group))
        ax.scatter(points[mask, 0], points[mask, 1], s=size, color=colour, alpha=0.75, linewidths=0,
                   label=_short(label, 24), rasterized=True)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.25)
    if len(present) <= 20:
        ax.legend(frameon=False, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), title=legend_title or None,
                  title_fontsize=7, markerscale=max(1.0, 20.0 / size) ** 0.5)
    return to_figure(fig, name, caption, dpi)
