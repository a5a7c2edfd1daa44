"""The one place that knows Jinja2: turns a data-only Page into `report/index.html` plus `report/assets/`.

Figures and thumbnails are written as files (small JPEG/PNG) and referenced by relative paths, so the page stays
light and loads lazily. The folder is built under a temporary name and renamed at the end, so a killed run never
leaves a report that looks complete. Autoescape is on for every template: file names, labels and config values are
always text, never markup.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup
from PIL import Image

from reportgen.inputs.resources import resource_dir
from reportgen.report.elements import Figure, Gallery, Graph, ImageStrip, Page, Scatter, Table

log = logging.getLogger("reportgen")
TEMPLATES = resource_dir("templates")  # the checkout's templates/, or the installed package's copy
IMAGE_SUFFIX = {"jpeg": ".jpg", "png": ".png", "webp": ".webp"}


def environment() -> Environment:
    return Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=True, undefined=StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True)


def render_report(page: Page, report_dir: Path, image_format: str = "jpeg", single_file: bool = False) -> Path:
    """Write the page and its assets into `report_dir` (atomically replacing it); returns index.html's path.
    With `single_file`, also `<report_dir>/../report.html` with every asset inlined, and return that path."""
    report_dir = Path(report_dir)
    partial = report_dir.with_name(report_dir.name + f".partial-{os.getpid()}")
    if partial.exists():
        shutil.rmtree(partial)
    (partial / "assets").mkdir(parents=True)
    writer = _AssetWriter(partial / "assets", image_format)
    # template-facing copies of the sections: the caller's page is left as it was
    sections = [dataclasses.replace(section, elements=[_view(e, section.id, writer) for e in section.elements])
                for section in page.sections]
    html = environment().get_template("base.html").render(page=dataclasses.replace(page, sections=sections))
    (partial / "index.html").write_text(html, encoding="utf-8")
    if report_dir.exists():
        shutil.rmtree(report_dir)
    os.replace(partial, report_dir)
    if single_file:
        return write_single_file(report_dir, report_dir.parent / "report.html")
    return report_dir / "index.html"


SINGLE_FILE_WARN_BYTES = 50 * 1024 * 1024
_MIME = {".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp", ".svg": "image/svg+xml"}


def write_single_file(report_dir: Path, out_path: Path) -> Path:
    """One self-contained HTML file: every `assets/...` reference replaced by a data: URI, for mailing.
    Links to results/ still point beside it (they work where the run folder travels with it)."""
    html = (report_dir / "index.html").read_text(encoding="utf-8")

    def inline(match: "re.Match[str]") -> str:
        path = report_dir / "assets" / match.group(2)
        if not path.is_file():
            return match.group(0)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'{match.group(1)}="data:{_MIME.get(path.suffix, "application/octet-stream")};base64,{data}"'

    html = re.sub(r'\b(src|href)="assets/([A-Za-z0-9._-]+)"', inline, html)
    html = html.replace('href="../results/', 'href="results/')
    tmp = out_path.with_name(out_path.name + f".tmp-{os.getpid()}")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, out_path)
    size = out_path.stat().st_size
    if size > SINGLE_FILE_WARN_BYTES:
        log.warning("single-file report %s is %.0f MB: mail clients and browsers struggle past ~50 MB; lower "
                    "report.gallery_size or share the report folder instead", out_path, size / 2**20)
    return out_path


class _AssetWriter:
    """Names and writes asset files; names come from section ids and counters, never from user strings."""

    def __init__(self, folder: Path, image_format: str):
        self.folder = folder
        self.image_format = image_format if image_format in IMAGE_SUFFIX else "jpeg"
        self.counter = 0

    def next_number(self) -> int:
        """A number no other asset or element of this page has (asset names, table ids)."""
        self.counter += 1
        return self.counter

    def write(self, stem: str, data: bytes, suffix: str) -> str:
        name = f"{_slug(stem)}-{self.next_number()}{suffix}"
        (self.folder / name).write_bytes(data)
        return f"assets/{name}"

    def write_image(self, stem: str, image: np.ndarray) -> str:
        buffer = io.BytesIO()
        pil = Image.fromarray(np.ascontiguousarray(image))
        if self.image_format == "jpeg":
            pil.save(buffer, format="JPEG", quality=85)
        else:
            pil.save(buffer, format=self.image_format.upper())
        return self.write(stem, buffer.getvalue(), IMAGE_SUFFIX[self.image_format])


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "asset"


def _view(element: Any, section_id: str, writer: _AssetWriter) -> Any:
    """The template-facing form of an element: assets written, cells formatted."""
    if isinstance(element, Figure):
        src = writer.write(f"{section_id}-{element.name}", element.data, "." + element.format)
        return _Obj(kind="figure", src=src, caption=element.caption, width=element.width, height=element.height)
    if isinstance(element, Gallery):
        items = []
        for item in element.items:
            src = writer.write_image(f"{section_id}-img", item.image)
            full = writer.write_image(f"{section_id}-full", item.full) if item.full is not None else src
            items.append(_Obj(src=src, full=full, title=item.title, lines=list(item.lines), status=item.status,
                              width=item.image.shape[1], height=item.image.shape[0]))
        return _Obj(kind="gallery", title=element.title, note=element.note, items=items)
    if isinstance(element, Graph):
        src = writer.write(f"{section_id}-{element.name}", element.svg, ".svg") if element.svg else None
        return _Obj(kind="graph", title=element.title, src=src, dot_file=element.dot_file, caption=element.caption,
                    note=element.note, width=element.width, height=element.height)
    if isinstance(element, Table):
        return _table_view(element, f"{section_id}-table-{writer.next_number()}")
    if isinstance(element, ImageStrip):
        panels = []
        for item in element.panels:
            src = writer.write_image(f"{section_id}-strip", item.image) if item.image is not None else None
            panels.append(_Obj(src=src, title=item.title, lines=list(item.lines), status=item.status,
                               width=item.image.shape[1] if src else 0, height=item.image.shape[0] if src else 0))
        return _Obj(kind="strip", title=element.title, lines=list(element.lines), panels=panels)
    if isinstance(element, Scatter):
        return _scatter_view(element, f"{section_id}-scatter-{writer.next_number()}", section_id, writer)
    return element


def _scatter_view(scatter: Scatter, scatter_id: str, section_id: str, writer: _AssetWriter) -> "_Obj":
    """A scatter's sprite sheets written as assets (so the single-file report inlines them like any image) and its
    points as one JSON object for a <script type="application/json"> block: coordinates, codes and values as
    base64 little-endian typed arrays (exact, about 5.3 characters per float32), names as a list of strings.
    `<`, `>` and `&` are escaped as \\u00XX inside the JSON, so no name can end the script block."""
    sheets = []
    for sheet in scatter.sheets:
        src = writer.write_image(f"{section_id}-sprite", sheet)
        sheets.append(_Obj(src=src, width=sheet.shape[1], height=sheet.shape[0],
                           bytes=(writer.folder / Path(src).name).stat().st_size))
    tile = int(scatter.tile)
    columns = scatter.sheets[0].shape[1] // tile if scatter.sheets and tile else 0
    per_sheet = columns * (scatter.sheets[0].shape[0] // tile) if columns else 0
    data = {
        "x": _b64(scatter.x, "<f4"), "y": _b64(scatter.y, "<f4"), "names": [str(n) for n in scatter.names],
        "colourings": [{"name": c.name, "categories": [str(k) for k in c.categories], "colours": list(c.colours),
                        **_codes(np.asarray(c.codes), len(c.categories))} for c in scatter.colourings],
        "values": [{"name": v.name, "values": _b64(v.values, "<f4"), "percent": bool(v.percent)}
                   for v in scatter.values],
        "tiles": _b64(scatter.tiles, "<i4") if scatter.tiles is not None and sheets else None,
        "tile": tile, "columns": columns, "perSheet": per_sheet,
    }
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    thumbnails = int((np.asarray(scatter.tiles) >= 0).sum()) if scatter.tiles is not None and sheets else 0
    return _Obj(kind="scatter", id=scatter_id, title=scatter.title, caption=scatter.caption, data=Markup(text),
                points=len(scatter.x), thumbnails=thumbnails, tile=tile, sheets=sheets,
                data_bytes=len(text.encode("utf-8")), sheet_bytes=sum(s.bytes for s in sheets),
                colourings=[c.name for c in scatter.colourings], xlabel=scatter.xlabel, ylabel=scatter.ylabel)


def _b64(values: Any, dtype: str) -> str:
    """An array as base64 of its little-endian bytes (JavaScript reads it back as a typed array)."""
    return base64.b64encode(np.ascontiguousarray(np.asarray(values).astype(dtype)).tobytes()).decode("ascii")


def _codes(codes: np.ndarray, categories: int) -> Dict[str, str]:
    """Category codes in the smallest signed type that holds them (-1 included), with that type's name."""
    for name, dtype, top in (("i1", "<i1", 127), ("i2", "<i2", 32767), ("i4", "<i4", 2**31 - 1)):
        if categories <= top:
            return {"type": name, "codes": _b64(codes, dtype)}
    raise ValueError(f"{categories} categories is too many for one colouring")


def _table_view(table: Table, table_id: str) -> "_Obj":
    rows = table.rows
    cut = 0
    if table.max_rows is not None and len(rows) > table.max_rows:
        cut = len(rows) - table.max_rows
        rows = rows[: table.max_rows]
    keep = [i for i in range(len(table.columns)) if i != table.indent]
    shown_rows = []
    for row in rows:
        depth = int(row[table.indent]) if table.indent is not None else 0
        shown_rows.append(_Obj(depth=depth, cells=[_cell(row[i]) for i in keep]))
    max_depth = max((r.depth for r in shown_rows), default=1)
    return _Obj(kind="table", id=table_id, caption=table.caption, collapsed=table.collapsed, indent=table.indent,
                shown_columns=[table.columns[i] for i in keep], shown_rows=shown_rows, cut=cut, csv=table.csv,
                max_depth=max(1, max_depth), default_depth=max(1, max_depth))


def _cell(value: Any) -> "_Obj":
    if isinstance(value, bool) or value is None:
        return _Obj(text="" if value is None else str(value), value="" if value is None else str(value), numeric=False)
    if isinstance(value, (int, np.integer)):
        return _Obj(text=f"{int(value):,}", value=int(value), numeric=True)
    if isinstance(value, (float, np.floating)):
        text = f"{value:.4g}" if np.isfinite(value) else str(value)
        return _Obj(text=text, value=float(value), numeric=True)
    return _Obj(text=str(value), value=str(value), numeric=False)


class _Obj:
    """Attribute bag for templates."""

    def __init__(self, **kwargs: Any):
        self.__dict__.update(kwargs)


def render_index(sweep_dir: Path, rows: List[Any], figures: List[Figure], shared_overrides: str = "",
                 comparison: str | None = None) -> Path:
    """Write a sweep's comparison page `<sweep_dir>/index.html` (figures into `<sweep_dir>/index_assets/`)."""
    import datetime as dt

    sweep_dir = Path(sweep_dir)
    assets = sweep_dir / "index_assets"
    assets.mkdir(exist_ok=True)
    writer = _AssetWriter(assets, "png")
    views = [_view(f, "index", writer) for f in figures]
    for view in views:
        view.src = f"index_assets/{Path(view.src).name}"
    html = environment().get_template("index.html").render(
        title=f"Sweep {sweep_dir.parent.name}/{sweep_dir.name}", rows=rows, figures=views,
        ok=sum(r.status == "ok" for r in rows), generated=dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
        shared_overrides=shared_overrides, comparison=comparison)
    tmp = sweep_dir / f"index.html.tmp-{os.getpid()}"
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, sweep_dir / "index.html")
    return sweep_dir / "index.html"


def render_comparison(out_dir: Path, context: Dict[str, Any]) -> Path:
    """Write a comparison page `<out_dir>/index.html` with its images in `<out_dir>/assets/` (templates/compare.html).

    `context` holds plain values and report elements; every element, also inside lists and dicts, is turned into
    its template-facing form (assets written) in place."""
    out_dir = Path(out_dir)
    assets = out_dir / "assets"
    if assets.exists():
        shutil.rmtree(assets)
    assets.mkdir(parents=True)
    writer = _AssetWriter(assets, "jpeg")

    def view(value: Any) -> Any:
        if isinstance(value, list):
            return [view(v) for v in value]
        if isinstance(value, dict):
            return {k: view(v) for k, v in value.items()}
        if isinstance(value, (Figure, Table, Gallery, ImageStrip)):
            return _view(value, "compare", writer)
        return value

    html = environment().get_template("compare.html").render(**{k: view(v) for k, v in context.items()})
    tmp = out_dir / f"index.html.tmp-{os.getpid()}"
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, out_dir / "index.html")
    return out_dir / "index.html"
