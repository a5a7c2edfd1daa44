"""Class maps drawn for people: one colour per class (the PASCAL VOC colour map, which users of VOC-style palettes
already read), class maps laid over their pictures, masks brought to thumbnail size, and a legend of the colours.

Every function works on uint8 RGB arrays or integer class maps, ready for a Gallery; the legend is a Figure."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
from matplotlib.figure import Figure as MplFigure
from matplotlib.patches import Rectangle

from reportgen.report.elements import Figure
from reportgen.report.overlays import HEATMAP_ALPHA
from reportgen.report.plots import _short, to_figure

# pixels that are not scored (dataset.ignore_index): white, a colour the VOC map never gives a class (its channels
# stop at 224)
IGNORE_COLOUR = (255, 255, 255)


def class_colours(num_classes: int) -> np.ndarray:
    """(K, 3) uint8 colour of each class: the PASCAL VOC devkit colour map (class 0 black, 1 (128, 0, 0),
    2 (0, 128, 0), 3 (128, 128, 0) ...), whose bits of the class id are spread over the high bits of red, green
    and blue in turn. It has 256 colours; classes beyond them reuse them in order (class 256 is black again)."""
    ids = np.arange(256, dtype=np.int64)  # (256,)
    colours = np.zeros((256, 3), dtype=np.int64)  # (256, 3)
    code = ids.copy()
    for shift in range(7, -1, -1):  # bits of the id, three at a time, from the top bit of each channel down
        for channel in range(3):
            colours[:, channel] |= ((code >> channel) & 1) << shift
        code >>= 3
    return colours[np.arange(int(num_classes)) % 256].astype(np.uint8)


def colourise(mask: np.ndarray, colours: np.ndarray, ignore_index: int) -> np.ndarray:
    """(h, w) class ids -> (h, w, 3) uint8, each class in its colour (`colours` (K, 3) uint8) and ignore_index
    pixels in IGNORE_COLOUR. Any other id outside [0, K) is an error (a mask is checked before it is drawn)."""
    mask = np.asarray(mask)
    colours = np.asarray(colours, dtype=np.uint8)
    ignored = mask == ignore_index  # (h, w) bool
    outside = ~ignored & ((mask < 0) | (mask >= len(colours)))
    if outside.any():
        raise ValueError(f"class ids {np.unique(mask[outside])[:8].tolist()} are outside 0..{len(colours) - 1} "
                         f"and not the ignore index {ignore_index}")
    out = colours[np.where(ignored, 0, mask)]  # (h, w, 3)
    out[ignored] = IGNORE_COLOUR
    return out


def blend(image: np.ndarray, coloured: np.ndarray, alpha: float = HEATMAP_ALPHA,
          where: Optional[np.ndarray] = None) -> np.ndarray:
    """(h, w, 3) uint8 picture and (h, w, 3) uint8 class colours -> (h, w, 3) uint8 `(1 - alpha) * image + alpha *
    coloured`, rounded; the alpha of every other overlay of the report, so pictures compare.

    Where `where` ((h, w) bool) is False the picture is left as it is: pass `mask != ignore_index` to show ignored
    pixels (borders, void) unblended, so the class colours cover only what is scored. None blends everywhere."""
    if image.shape != coloured.shape:
        raise ValueError(f"image {image.shape} and colours {coloured.shape} must have one shape")
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * coloured.astype(np.float32)  # (h, w, 3)
    out = (np.clip(mixed, 0.0, 255.0) + 0.5).astype(np.uint8)
    if where is not None:
        out = np.where(np.asarray(where, dtype=bool)[..., None], out, image)
    return out


def resize_mask(mask: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """(H, W) class ids -> (h, w) for `size` = (h, w), nearest neighbour (class ids are never interpolated): output
    pixel i takes source pixel floor((i + 0.5) * H / h), the pixel under its centre, in exact integer arithmetic
    (the same as torch's `nearest-exact`). Brings full-resolution masks to thumbnail size."""
    mask = np.asarray(mask)
    height, width = mask.shape
    new_h, new_w = int(size[0]), int(size[1])
    rows = (2 * np.arange(new_h) + 1) * height // (2 * new_h)  # (h,)
    cols = (2 * np.arange(new_w) + 1) * width // (2 * new_w)  # (w,)
    return mask[rows[:, None], cols[None, :]]


def legend(names: Sequence[str], colours: np.ndarray, class_ids: Sequence[int], name: str, dpi: int = 110,
           caption: str = "") -> Figure:
    """A compact key of the classes shown: one square swatch in the class's exact colour (no alpha, no
    antialiasing, so the picture holds that very RGB value) and "id name" per class, in columns of up to 12.
    `names` and `colours` are indexed by class id; a class without a name shows its id only."""
    colours = np.asarray(colours, dtype=np.uint8)
    ids = [int(c) for c in class_ids]
    per_column = min(12, max(1, len(ids)))
    columns = max(1, -(-len(ids) // per_column))
    labels = [f"{c} {_short(names[c], 24)}" if c < len(names) else str(c) for c in ids]
    column_width = 0.32 + 0.075 * max([len(label) for label in labels] + [4])  # inches: swatch + text
    row_height = 0.22  # inches
    fig = MplFigure(figsize=(columns * column_width, per_column * row_height))
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_axis_off()
    ax.set_xlim(0.0, columns * column_width)
    ax.set_ylim(per_column * row_height, 0.0)  # rows from the top, axes units = inches
    for position, (class_id, label) in enumerate(zip(ids, labels)):
        column, row = divmod(position, per_column)
        x, y = column * column_width, row * row_height
        ax.add_patch(Rectangle((x + 0.03, y + 0.03), 0.16, 0.16, facecolor=colours[class_id] / 255.0,
                               edgecolor="none", linewidth=0, antialiased=False))
        ax.text(x + 0.25, y + row_height / 2, label, ha="left", va="center", fontsize=7)
    return to_figure(fig, name, caption, dpi)
