"""Data-only report elements: what a section says, with no HTML in it.

Analyses build these from numbers and arrays; `render.py` alone turns them into files and HTML. Every element has a
`kind` that names its template in `templates/elements/<kind>.html`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np


@dataclass
class Alert:
    """Something a reader must not miss; shown in the alerts block at the top and in its section."""

    level: str  # error | warning | info
    message: str
    details: List[str] = field(default_factory=list)  # e.g. the failed file names (the page collapses long lists)
    kind: str = "alert"


@dataclass
class KeyValues:
    """A short list of facts (label -> value)."""

    items: List[Tuple[str, Any]]
    kind: str = "keyvalues"


@dataclass
class Text:
    """A paragraph of plain text (escaped; no markup)."""

    text: str
    kind: str = "text"


@dataclass
class Table:
    """Rows of cells under column headers; sortable by clicking a header. `indent` (a column index) indents the
    first column by that column's integer value, for module trees."""

    columns: List[str]
    rows: List[List[Any]]
    caption: str = ""
    max_rows: Optional[int] = None  # rows beyond this are cut, with a note pointing to `csv`
    csv: Optional[str] = None  # name of the results file with every row, e.g. "summary.csv"
    indent: Optional[int] = None  # column holding a depth; that column is hidden, the first column indented
    collapsed: bool = False  # start folded (<details>)
    kind: str = "table"


@dataclass
class Figure:
    """A rendered figure (PNG or SVG bytes) with a caption."""

    data: bytes
    name: str  # file stem in assets/, unique within the section
    caption: str = ""
    format: str = "png"  # png | svg
    width: int = 0  # pixels, so the page can reserve space before the image loads
    height: int = 0
    kind: str = "figure"


@dataclass
class Graph:
    """A graphviz drawing shown in a pan/zoom viewer, with its DOT source in results/. `svg` is None when it could
    not be drawn (no graphviz, too large, timed out); `note` then says why.

    The page shows it as `<img src="assets/....svg">`, not inline: an SVG loaded as an image runs no script and
    fetches nothing whatever a module name contains, and a 1000-node drawing stays out of the page's DOM. The viewer
    zooms by resizing the image in a scrolling box (templates/script.js), so it stays sharp. The price: the browser's
    find does not search text inside the drawing."""

    title: str
    svg: Optional[bytes]  # sanitized SVG (see reportgen/dot.py), written to assets/ by render.py
    name: str  # file stem in assets/, unique within the section
    dot_file: str  # DOT source in results/, e.g. "graph_modules.dot" (empty when there is none)
    caption: str = ""
    note: str = ""
    width: int = 0  # natural size in CSS pixels, so the viewer can fit it before the image loads
    height: int = 0
    kind: str = "graph"


@dataclass
class GalleryItem:
    """One thumbnail with its caption lines; `status` colours the frame (ok | bad | neutral)."""

    image: np.ndarray  # (H, W, 3) uint8
    title: str
    lines: Sequence[str] = ()
    status: str = "neutral"
    full: Optional[np.ndarray] = None  # (H, W, 3) uint8 shown on click (e.g. the whole model input); None: image


@dataclass
class Gallery:
    """A bounded grid of thumbnails; a click opens the image full-size."""

    title: str
    items: List[GalleryItem]
    note: str = ""
    kind: str = "gallery"


@dataclass
class ImageStrip:
    """One item seen several ways, side by side (an image and each run's map of it), with lines under each panel;
    `status` colours a panel's frame (ok | bad | neutral). A panel without an image shows its lines only."""

    title: str
    lines: Sequence[str]  # about the item (e.g. its folder class)
    panels: List[GalleryItem]  # GalleryItem.image may be None here: the panel says why there is no picture
    kind: str = "strip"


@dataclass
class ScatterColouring:
    """One way to colour a scatter's points: `codes[i]` indexes `categories` (-1: none of them, drawn grey)."""

    name: str  # the colour menu's entry and the tooltip line's key, e.g. "label"
    categories: List[str]  # legend entries, in code order
    codes: np.ndarray  # (N,) int, -1 where the point has no category
    colours: List[str] = field(default_factory=list)  # a CSS colour per category ("" or none: the palette's)


@dataclass
class ScatterValue:
    """A number per point shown in the tooltip (NaN: not shown for that point)."""

    name: str  # e.g. "probability"
    values: np.ndarray  # (N,) float
    percent: bool = False  # shown as a percentage


@dataclass
class Scatter:
    """An interactive 2-D map of many points, drawn on a canvas: pan, zoom, colour by any of `colourings`, hover
    for the point's thumbnail (a tile of a sprite sheet) and facts, click to enlarge. Every value is embedded in the
    page and every sheet is an <img> in assets/, so it works from file:// with no request and in the single-file
    report (templates/elements/scatter.html, templates/script.js)."""

    title: str
    x: np.ndarray  # (N,) float, data coordinates
    y: np.ndarray  # (N,) float
    names: List[str]  # (N,) the tooltip's title per point (e.g. its path)
    colourings: List[ScatterColouring]  # the colour menu, first one shown first (at least one)
    values: List[ScatterValue] = field(default_factory=list)
    tiles: Optional[np.ndarray] = None  # (N,) int, the point's tile in `sheets` (-1: no thumbnail)
    sheets: List[np.ndarray] = field(default_factory=list)  # sprite sheets (H, W, 3) uint8, tiles row-major
    tile: int = 0  # side of one square tile, pixels
    xlabel: str = ""
    ylabel: str = ""
    caption: str = ""
    kind: str = "scatter"


@dataclass
class Section:
    """One analysis's part of the report."""

    id: str  # anchor, unique in the page
    title: str
    elements: List[Any] = field(default_factory=list)
    alerts: List[Alert] = field(default_factory=list)
    summary: str = ""  # one line under the title


@dataclass
class Page:
    """The whole report: overview facts first, then every alert, then one section per analysis."""

    title: str
    subtitle: str
    overview: KeyValues
    versions: KeyValues
    command: str  # the command line that reproduces the run
    generated: str  # timestamp
    version: str  # reportgen version
    banners: List[str] = field(default_factory=list)  # unmissable warnings (e.g. random weights)
    alerts: List[Alert] = field(default_factory=list)
    sections: List[Section] = field(default_factory=list)
