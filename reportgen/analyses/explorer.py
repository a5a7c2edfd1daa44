"""`explorer`: the folder's embedding as an interactive 2-D map in the page, and as TensorBoard Projector files.

The map is activations' embedding (results/embeddings.npz: penultimate features, or a backbone's own embedding) laid
out in 2-D: its PCA (`features_2d`, default), or UMAP / t-SNE of the shown points' features when `layout` asks and
umap-learn / openTSNE is installed. So `activations` must run too; without it the section says to add it. Each
point can be coloured by folder class, predicted class and correctness (results/predictions.csv; predictions.json
and probabilities.npy for the folder-to-class match and the label's probability), and, where those analyses ran,
strategy cluster (strategies.json: flagged clusters red), label issue (label_issues.csv) and error slice
(image_scores.csv and slices.json, whose hardness, mistakenness and uniqueness join the tooltip); the colour menu
lists only what this run has. Hover shows the point's thumbnail, label, prediction and probability; a click shows
the thumbnail enlarged with its facts (the report keeps no full-size images: the path says where the file is).

Size, bounded and stated in the section: at most `max_points` points (past that an even spread over the decoded
images, every thumbnailed image among them) and `max_thumbnails` thumbnails of `tile` x `tile` px. The pass streams
a tile of each image at the positions of an even spread over the sorted folder (`position * max_thumbnails //
images`, decided by the file's position alone, so shards and resumed runs pick the same images) to disk (RowStore);
they merge exactly. Everything else is read at finalize from the other analyses' results files.

Results: `explorer.json` (points, thumbnails, layout, colourings), and `projector/` for TensorBoard's projector
(`tensorboard --logdir <run>/results/projector`): `tensors.tsv` (the thumbnailed points' full features, or their
2-D layout), `metadata.tsv` (header, then path, label, prediction, probability, correct and the other colourings),
`sprite.png` (their tiles row-major, at most 8192 px a side) and `projector_config.pbtxt`.
"""
from __future__ import annotations

import csv
import importlib
import importlib.util
import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from reportgen.analyses.activations import MODEL_OUTPUT
from reportgen.analyses.base import Analysis, Batch, RunContext, register
from reportgen.errors import ConfigError
from reportgen.inputs.labels import folder_display_names
from reportgen.report.elements import Scatter, ScatterColouring, ScatterValue, Section, Text
from reportgen.report.thumbnails import thumbnail
from reportgen.state.files import write_atomic, write_atomic_with, write_json
from reportgen.state.streams import COPY_ROWS, RowStore, absorb_rows

LAYOUTS = {"pca": None, "umap": ("umap", "umap-learn"), "tsne": ("openTSNE", "openTSNE")}  # module, pip package
PROJECTOR = ["features", "2d", "none"]
SHEET_SIDE = 2048  # page sprite sheets are at most this many pixels a side (4,096 tiles of 32 px each)
PROJECTOR_SPRITE_SIDE = 8192  # TensorBoard's projector refuses larger sprites
BACKGROUND = 24  # grey level around a thumbnail that is not square
OK, BAD, FLAG, QUIET = "#2e8b57", "#c8453a", "#d62728", "#9aa5b1"  # correct, wrong, flagged, not flagged


@dataclass
class ExplorerConfig:
    layout: str = "pca"  # pca (activations' PCA of the embedding) | umap (pip install umap-learn) | tsne (pip
    #   install openTSNE): UMAP and t-SNE run at finalize over the shown points' full features
    max_points: int = 50_000  # points drawn in the page; past this an even spread over the folder's decoded images
    max_thumbnails: int = 10_000  # images with a thumbnail (an even spread over the sorted folder by position)
    tile: int = 32  # thumbnail side in pixels (square; a non-square input is letterboxed)
    projector: str = "features"  # tensors.tsv for TensorBoard's projector: features (full) | 2d (the layout) | none
    seed: int = 0  # random state of UMAP / t-SNE


def spread_positions(total: int, limit: int) -> np.ndarray:
    """The positions `k * total // limit` (k < limit) of an even spread of `limit` over `total` items (all of them
    when `limit` >= `total`), ascending."""
    if limit >= total:
        return np.arange(total, dtype=np.int64)
    return np.arange(limit, dtype=np.int64) * total // limit


def in_spread(positions: np.ndarray, total: int, limit: int) -> np.ndarray:
    """(B,) bool: which `positions` belong to `spread_positions(total, limit)`, decided from each position alone."""
    positions = np.asarray(positions, dtype=np.int64)
    if limit >= total or limit <= 0:
        return np.full(len(positions), limit > 0, dtype=bool)
    k = (positions * limit + total - 1) // total  # the first k with k * total // limit >= position
    return (k < limit) & (k * total // limit == positions)


def square_tile(image: torch.Tensor, side: int) -> np.ndarray:
    """(C, H, W) uint8 -> (side, side, 3) uint8: the thumbnail centred on a dark square (C = 1 is repeated)."""
    if image.shape[0] == 1:
        image = image.repeat(3, 1, 1)  # (3, H, W)
    small = thumbnail(image[:3], side)  # (h, w, 3), longest side <= side
    if small.shape[0] == small.shape[1] == side:
        return small
    if max(small.shape[:2]) < side:  # an input smaller than the tile: scaled up to fill it
        scale = side / max(small.shape[:2])
        size = (max(1, round(small.shape[1] * scale)), max(1, round(small.shape[0] * scale)))
        small = np.asarray(Image.fromarray(small).resize(size, Image.BILINEAR))
    out = np.full((side, side, 3), BACKGROUND, dtype=np.uint8)
    top, left = (side - small.shape[0]) // 2, (side - small.shape[1]) // 2
    out[top:top + small.shape[0], left:left + small.shape[1]] = small
    return out


def sprite_sheets(tiles: np.ndarray, max_side: int) -> List[np.ndarray]:
    """(T, t, t, 3) tiles -> sheets of at most `max_side` px a side, tiles row-major, every sheet as wide as the
    first (the last one may be shorter); empty for no tiles."""
    if not len(tiles):
        return []
    side = tiles.shape[1]
    columns = max(1, min(max_side // side, math.ceil(math.sqrt(len(tiles)))))
    rows_per_sheet = max(1, max_side // side)
    sheets = []
    for first in range(0, len(tiles), columns * rows_per_sheet):
        chunk = tiles[first:first + columns * rows_per_sheet]
        rows = math.ceil(len(chunk) / columns)
        sheet = np.zeros((rows * side, columns * side, 3), dtype=np.uint8)
        for j, pixels in enumerate(chunk):
            r, c = divmod(j, columns)
            sheet[r * side:(r + 1) * side, c * side:(c + 1) * side] = pixels
        sheets.append(sheet)
    return sheets


def read_npz_rows(path: Path, name: str, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` (ascending) of member `name` of an .npz, read by streaming through it `COPY_ROWS` rows at a time,
    so a folder's full features never sit in memory at once."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{name}.npy") as member:
        major, _ = np.lib.format.read_magic(member)
        reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = reader(member)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        out = np.empty((len(rows), *shape[1:]), dtype=dtype)
        done = 0
        for first in range(0, shape[0], COPY_ROWS):
            if done == len(rows):
                break
            last = min(first + COPY_ROWS, shape[0])
            chunk = np.frombuffer(member.read((last - first) * row_bytes), dtype=dtype).reshape(-1, *shape[1:])
            stop = int(np.searchsorted(rows, last))
            out[done:stop] = chunk[rows[done:stop] - first]
            done = stop
    return out


def _tsv_cell(value: Any) -> str:
    return " ".join(str(value).split()) if value is not None else ""


@register("explorer")
class Explorer(Analysis):
    Config = ExplorerConfig
    title = "Embedding explorer"
    tasks = frozenset({"classification", "embedding"})
    why_not = ("it maps one embedding per image (a classifier's penultimate features or a backbone's output), "
               "and their outputs are per pixel or per box")
    reads = ("activations", "predictions", "strategies", "label_issues", "slices")
    oom_safe = True  # only copies the batch's uint8 input to the CPU; nothing on the device

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        layout = str(cfg.layout)
        if layout not in LAYOUTS:
            raise ConfigError("analysis.explorer.layout", layout, "a 2-D layout", sorted(LAYOUTS))
        if LAYOUTS[layout] is not None and importlib.util.find_spec(LAYOUTS[layout][0]) is None:
            raise ConfigError("analysis.explorer.layout", layout,
                              f"a layout whose package is installed (pip install {LAYOUTS[layout][1]})",
                              [name for name, need in LAYOUTS.items()
                               if need is None or importlib.util.find_spec(need[0]) is not None])
        if str(cfg.projector) not in PROJECTOR:
            raise ConfigError("analysis.explorer.projector", cfg.projector, "what tensors.tsv holds", PROJECTOR)
        for key, low in (("max_points", 1), ("max_thumbnails", 0), ("tile", 4)):
            if int(getattr(cfg, key)) < low:
                raise ConfigError(f"analysis.explorer.{key}", getattr(cfg, key), f"an integer >= {low}")
        if int(cfg.tile) > 256:
            raise ConfigError("analysis.explorer.tile", cfg.tile, "at most 256 pixels (a tile of a sprite sheet)")
        if int(cfg.max_thumbnails) > int(cfg.max_points):
            raise ConfigError("analysis.explorer.max_thumbnails", cfg.max_thumbnails,
                              f"at most analysis.explorer.max_points ({cfg.max_points}): every thumbnail is a point")

    def __init__(self, cfg: Any, ctx: RunContext):
        super().__init__(cfg, ctx)
        self.check_config(cfg)
        self.store: Optional[RowStore] = None  # per thumbnailed image: its path and tile

    def _capacity(self) -> int:
        """Rows the store needs here: the thumbnailed positions a slice of `row_capacity` files can hold."""
        total, limit, rows = self.ctx.num_images, int(self.cfg.max_thumbnails), self.ctx.row_capacity
        return rows if limit >= total else min(rows, math.ceil(rows * limit / max(total, 1)) + 1)

    def update(self, batch: Batch, outputs: Any, captures: Any) -> None:
        positions = batch.indices.cpu().numpy()  # (B,)
        chosen = np.flatnonzero(in_spread(positions, self.ctx.num_images, int(self.cfg.max_thumbnails)))
        if not len(chosen):
            return
        side = int(self.cfg.tile)
        tiles = np.stack([square_tile(batch.images[int(i)], side) for i in chosen])  # (b, t, t, 3)
        if self.store is None:
            self.store = RowStore(self.ctx.results_dir / ".explorer", self._capacity(),
                                  {"tiles": ((side, side, 3), np.uint8)})
        self.store.append([batch.paths[int(i)] for i in chosen], tiles=tiles)

    def state_dict(self) -> Dict[str, Any]:
        return {"store": self.store.ref() if self.store is not None else None}

    def merge(self, state: Dict[str, Any]) -> None:
        self.store = absorb_rows(self.store, state["store"], self.ctx.results_dir / ".explorer", self._capacity())

    # --- finalize ----------------------------------------------------------------------------------------------

    def finalize(self) -> Optional[Section]:
        section = Section(id="explorer", title=self.title)
        thumb_paths, tiles = self._take_tiles()
        embeddings = self.ctx.results_dir / "embeddings.npz"
        if not embeddings.is_file():
            section.elements.append(Text("The explorer maps the embedding that the activations analysis saves "
                                         "(results/embeddings.npz), and this run has none: add activations to the "
                                         "analysis list, e.g. analysis=[predictions,activations,explorer]."))
            return section
        with np.load(embeddings) as npz:
            if "features_2d" not in npz.files:
                section.elements.append(Text("Fewer than 2 images have an embedding, so there is no map."))
                return section
            paths = [str(p) for p in npz["paths"]]
            pca = npz["features_2d"].astype(np.float32)  # (N, 2)
            labels = npz["labels"].astype(np.int64)  # (N,)
            ratio = npz["explained_variance_ratio"] if "explained_variance_ratio" in npz.files else None
            layer = str(npz["layer"]) if "layer" in npz.files else ""
        row_of = {path: row for row, path in enumerate(paths)}
        finite = np.isfinite(pca).all(axis=1)  # (N,)
        tile_rows = np.array([row_of.get(p, -1) for p in thumb_paths], dtype=np.int64)  # (T,) embedding row
        keep = (tile_rows >= 0) & finite[tile_rows.clip(min=0)] if len(tile_rows) else np.zeros(0, bool)
        tile_rows, tiles = tile_rows[keep], tiles[keep]
        rows = self._choose_rows(finite, tile_rows)  # (n,) embedding rows shown, ascending
        tile_of = np.full(len(paths), -1, dtype=np.int64)
        tile_of[tile_rows] = np.arange(len(tile_rows))
        point_tiles = tile_of[rows]  # (n,) tile index per point, -1 without
        used = np.flatnonzero(point_tiles >= 0)  # points with a tile, in point order (the sprite order)
        tiles = tiles[point_tiles[used]]
        point_tiles[used] = np.arange(len(used))
        xy, xlabel, ylabel, layout_text = self._layout(embeddings, rows, pca, ratio)
        names = [paths[r] for r in rows]
        classes = folder_display_names(list(self.ctx.dataset_classes), list(self.ctx.loaded.class_names),
                                       list(self.ctx.loaded.synsets))
        point_labels = labels[rows]
        colourings = [ScatterColouring("label", classes if classes else ["no label"],
                                       point_labels if classes else np.full(len(rows), -1))]
        values: List[ScatterValue] = []
        meta: Dict[str, List[str]] = {"label": [classes[c] if c >= 0 else "" for c in point_labels]}
        predicted = self._predictions(names, point_labels, colourings, values, meta)
        extras = self._extra_colourings(names, colourings, values, meta)
        scatter = Scatter(
            title="Embedding map", x=xy[:, 0], y=xy[:, 1], names=names, colourings=colourings, values=values,
            tiles=point_tiles, sheets=sprite_sheets(tiles, SHEET_SIDE), tile=int(self.cfg.tile),
            xlabel=xlabel, ylabel=ylabel,
            caption=(f"Every point is an image: {layout_text} of "
                     + ("the model's embedding" if layer in ("", MODEL_OUTPUT) else f"the features of {layer}")
                     + ". Colour by " + ", ".join(c.name for c in colourings) + "; hover for the image, click to "
                     "enlarge it (the thumbnail; the path says where the file is)."))
        projector = self._write_projector(embeddings, rows, used, xy, tiles, names, meta)
        dropped = int((~finite).sum())
        summary = {"points": len(rows), "images": len(paths), "nonfinite": dropped, "thumbnails": int(len(used)),
                   "tile": int(self.cfg.tile), "layout": str(self.cfg.layout), "layer": layer,
                   "colourings": [c.name for c in colourings], "predicted_classes": predicted,
                   "optional_colourings": extras, "projector": projector}
        write_json(self.ctx.results_dir / "explorer.json", summary)
        section.summary = (f"{len(rows):,} of {len(paths):,} images as points, {len(used):,} with a thumbnail; "
                           f"{layout_text}")
        if dropped:
            section.elements.append(Text(f"{dropped} images have non-finite features and are not on the map."))
        section.elements.append(scatter)
        if projector:
            section.elements.append(Text(
                f"TensorBoard projector files for the {len(used):,} thumbnailed points are in results/projector/ "
                f"({projector}); open them with: tensorboard --logdir <run folder>/results/projector"))
        return section

    def _take_tiles(self) -> Tuple[List[str], np.ndarray]:
        """The streamed thumbnails' paths and tiles (T, t, t, 3), the store closed."""
        side = int(self.cfg.tile)
        if self.store is None or not self.store.count:
            return [], np.zeros((0, side, side, 3), dtype=np.uint8)
        store = self.store
        store.ref()  # flushed: the rows and paths on disk are complete
        tiles = store.read("tiles", 0, store.count).copy()
        with open(store.folder / "paths.jsonl", encoding="utf-8") as handle:
            paths = [json.loads(next(handle)) for _ in range(store.count)]
        for stored in store.fields.values():
            stored.handle.close()
        store._paths.close()  # RowStore has no close() of its own; the folder goes with the finished run
        self.store = None
        return paths, tiles

    def _choose_rows(self, finite: np.ndarray, tile_rows: np.ndarray) -> np.ndarray:
        """Embedding rows to draw: every finite one up to `max_points`, else the thumbnailed ones and an even spread
        over the others."""
        candidates = np.flatnonzero(finite)
        limit = int(self.cfg.max_points)
        if len(candidates) <= limit:
            return candidates
        has_tile = np.zeros(len(finite), dtype=bool)
        has_tile[tile_rows] = True
        others = candidates[~has_tile[candidates]]
        extra = others[spread_positions(len(others), max(0, limit - len(tile_rows)))]
        return np.sort(np.concatenate([tile_rows, extra]))

    def _layout(self, embeddings: Path, rows: np.ndarray, pca: np.ndarray, ratio: Optional[np.ndarray]
                ) -> Tuple[np.ndarray, str, str, str]:
        """(n, 2) coordinates of the shown points with axis titles and a phrase saying how they were made."""
        layout = str(self.cfg.layout)
        if layout == "pca":
            axes = [f"PC{i + 1}" + (f" ({ratio[i]:.1%} of variance)" if ratio is not None else "") for i in (0, 1)]
            return pca[rows], axes[0], axes[1], "PCA to 2-D"
        features = read_npz_rows(embeddings, "features", rows).astype(np.float32)  # (n, D)
        seed = int(self.cfg.seed)
        if layout == "umap":
            module = importlib.import_module("umap")
            xy = module.UMAP(n_components=2, random_state=seed).fit_transform(features)
            text = f"UMAP (umap-learn {getattr(module, '__version__', '')}, seed {seed}) of the shown points"
        else:
            module = importlib.import_module("openTSNE")
            xy = module.TSNE(n_components=2, random_state=seed).fit(features)
            text = f"t-SNE (openTSNE {getattr(module, '__version__', '')}, seed {seed}) of the shown points"
        return np.asarray(xy, dtype=np.float32).reshape(len(rows), 2), f"{layout} 1", f"{layout} 2", text

    # --- what colours the points ---------------------------------------------------------------------------------

    def _predictions(self, names: List[str], labels: np.ndarray, colourings: List[ScatterColouring],
                     values: List[ScatterValue], meta: Dict[str, List[str]]) -> int:
        """Prediction, probability and correctness colourings from results/predictions.csv (probabilities.npy for
        the probability of the label); returns how many predicted classes the points have (0: no predictions).
        A predicted class that a folder class matches gets that folder class's colour."""
        csv_path = self.ctx.results_dir / "predictions.csv"
        if not csv_path.is_file():
            return 0
        wanted = {name: i for i, name in enumerate(names)}
        n = len(names)
        top1, prob, csv_row = np.full(n, -1, np.int64), np.full(n, np.nan, np.float32), np.full(n, -1, np.int64)
        top1_names: Dict[int, str] = {}
        with open(csv_path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            column = {name: i for i, name in enumerate(next(reader, []))}
            if not {"path", "top1_index", "top1_name", "top1_prob"} <= set(column):
                return 0
            for row_number, row in enumerate(reader):
                point = wanted.get(row[column["path"]])
                if point is None:
                    continue
                top1[point] = int(row[column["top1_index"]])
                top1_names.setdefault(int(top1[point]), row[column["top1_name"]])
                prob[point] = float(row[column["top1_prob"]])
                csv_row[point] = row_number
        if not (top1 >= 0).any():
            return 0
        mapping = self._folder_targets()  # (n_folder,) or None
        order: List[int] = []  # the output of each prediction category
        categories: List[str] = []
        for i, output in enumerate(mapping if mapping is not None else []):  # folder class i's colour is code i
            fresh = output >= 0 and int(output) not in order
            order.append(int(output) if fresh else -1)
            categories.append(top1_names.get(int(output), self.ctx.dataset_classes[i]) if fresh
                              else f"({self.ctx.dataset_classes[i]}: no model class)")
        for output in sorted(set(top1_names) - set(order)):
            order.append(output)
            categories.append(top1_names[output])
        code = {output: i for i, output in enumerate(order) if output >= 0}
        colourings.append(ScatterColouring("prediction", categories,
                                           np.array([code.get(int(c), -1) for c in top1], dtype=np.int64)))
        values.append(ScatterValue("probability", prob, percent=True))
        meta["prediction"] = [top1_names.get(int(c), "") for c in top1]
        meta["probability"] = [f"{p:.6f}" if np.isfinite(p) else "" for p in prob]
        if mapping is not None and (mapping >= 0).any():
            targets = np.where(labels >= 0, mapping[labels.clip(min=0)], -1)  # (n,) -1: no label or no match
            correct = np.where(targets < 0, -1, np.where(top1 == targets, 0, 1))
            colourings.append(ScatterColouring("correctness", ["correct", "wrong"], correct, colours=[OK, BAD]))
            meta["correct"] = ["" if c < 0 else "yes" if c == 0 else "no" for c in correct]
            label_prob = self._label_probabilities(csv_row, targets)
            if label_prob is not None:
                values.append(ScatterValue("probability of the label", label_prob, percent=True))
        return len(top1_names)

    def _folder_targets(self) -> Optional[np.ndarray]:
        """(n_folder,) the probability column each folder class matches, as predictions' accuracy maps it (-1:
        none); None for a multi-label head (no single right answer), an unlabelled folder or no predictions.json."""
        from reportgen.analyses.predictions import folder_targets

        totals_path = self.ctx.results_dir / "predictions.json"
        if not totals_path.is_file() or not self.ctx.dataset_classes:
            return None
        mode = str(json.loads(totals_path.read_text(encoding="utf-8")).get("activation", "softmax"))
        if mode == "multi-label":
            return None
        probabilities = self.ctx.results_dir / "probabilities.npy"
        columns = (int(np.load(probabilities, mmap_mode="r").shape[1]) if probabilities.is_file()
                   else len(self.ctx.loaded.class_names))
        return np.asarray(folder_targets(list(self.ctx.dataset_classes), self.ctx.loaded, mode,
                                         1 if mode == "binary" else columns), dtype=np.int64)

    def _label_probabilities(self, csv_row: np.ndarray, targets: np.ndarray) -> Optional[np.ndarray]:
        """(n,) each point's probability of its folder class from results/probabilities.npy (NaN: none)."""
        path = self.ctx.results_dir / "probabilities.npy"
        if not path.is_file():
            return None
        table = np.load(path, mmap_mode="r")  # (N, K), read a row at a time
        out = np.full(len(csv_row), np.nan, dtype=np.float32)
        for point in np.flatnonzero((csv_row >= 0) & (targets >= 0) & (targets < table.shape[1])):
            out[point] = table[csv_row[point], targets[point]]
        return out

    def _extra_colourings(self, names: List[str], colourings: List[ScatterColouring], values: List[ScatterValue],
                          meta: Dict[str, List[str]]) -> List[str]:
        """Strategy cluster, label issue and slice colourings (and the per-image scores beside slices) from those
        analyses' results files, where this run has them; returns what was added or why a file was not read."""
        index = {name: i for i, name in enumerate(names)}
        added = []
        for name, reader in (("strategy", self._strategies), ("label issue", self._label_issues),
                             ("slice", self._slices)):
            try:
                found = reader(index, values, meta)
            except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:  # another version's file
                added.append(f"{name}: unreadable ({type(exc).__name__}: {exc})")
                continue
            if found is None:
                continue
            colourings.append(found)
            meta[name] = [found.categories[c] if c >= 0 else "" for c in found.codes]
            added.append(name)
        return added

    def _strategies(self, index: Dict[str, int], values: List[ScatterValue], meta: Dict[str, List[str]]
                    ) -> Optional[ScatterColouring]:
        """results/strategies.json: each class's Grad-CAM clusters and their member paths; a flagged cluster (a
        possible shortcut) is red."""
        path = self.ctx.results_dir / "strategies.json"
        if not path.is_file():
            return None
        report = json.loads(path.read_text(encoding="utf-8"))
        categories: List[str] = []
        colours: List[str] = []
        codes = np.full(len(index), -1, dtype=np.int64)
        for class_name, entry in report.get("classes", {}).items():
            for cluster in entry.get("clusters", []):
                flagged = bool(cluster.get("flagged"))
                categories.append(f"{class_name} · cluster {cluster['cluster']}" + (" · flagged" if flagged else ""))
                colours.append(FLAG if flagged else "")  # "": the page's palette
                for member in cluster.get("members", []):
                    point = index.get(member)
                    if point is not None:
                        codes[point] = len(categories) - 1
        return ScatterColouring("strategy", categories, codes, colours=colours) if (codes >= 0).any() else None

    def _label_issues(self, index: Dict[str, int], values: List[ScatterValue], meta: Dict[str, List[str]]
                      ) -> Optional[ScatterColouring]:
        """results/label_issues.csv lists the flagged images (path, given, suggested, ...): every other point is
        "not flagged" (unlabelled images included: they were not checked)."""
        path = self.ctx.results_dir / "label_issues.csv"
        if not path.is_file():
            return None
        codes = np.zeros(len(index), dtype=np.int64)
        suggested = [""] * len(index)
        meta["label issue"] = []  # its column before the suggested label's (filled by the caller)
        with open(path, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                point = index.get(row["path"])
                if point is not None:
                    codes[point] = 1
                    suggested[point] = row.get("suggested", "")
        meta["suggested label"] = suggested
        return ScatterColouring("label issue", ["not flagged", "flagged"], codes, colours=[QUIET, FLAG])

    def _slices(self, index: Dict[str, int], values: List[ScatterValue], meta: Dict[str, List[str]]
                ) -> Optional[ScatterColouring]:
        """results/image_scores.csv (per image: hardness, mistakenness, uniqueness, mixture component) with
        slices.json's ranked slices: a slice's images get its colour, other components' share one grey."""
        scores_path, slices_path = self.ctx.results_dir / "image_scores.csv", self.ctx.results_dir / "slices.json"
        if not scores_path.is_file():
            return None
        ranked = json.loads(slices_path.read_text(encoding="utf-8")).get("slices", []) if slices_path.is_file() else []
        categories = []
        code_of: Dict[int, int] = {}
        for entry in ranked:
            label = entry["labels"][0]["class"] if entry.get("labels") else "?"
            predicted = entry["predictions"][0]["class"] if entry.get("predictions") else "?"
            code_of[int(entry["component"])] = len(categories)
            categories.append(f"slice {entry['rank']}: {label} → {predicted}, {entry['errors']} of "
                              f"{entry['images']} wrong")
        other = len(categories)
        categories.append("in no slice")
        codes = np.full(len(index), -1, dtype=np.int64)
        score_names = ("hardness", "mistakenness", "uniqueness")
        scores = {name: np.full(len(index), np.nan, dtype=np.float32) for name in score_names}
        with open(scores_path, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                point = index.get(row["path"])
                if point is None:
                    continue
                for name in score_names:
                    if row.get(name):
                        scores[name][point] = float(row[name])
                if row.get("component"):
                    codes[point] = code_of.get(int(row["component"]), other)
        for name in score_names:
            if np.isfinite(scores[name]).any():
                values.append(ScatterValue(name, scores[name]))
                meta[name] = [f"{v:.6f}" if np.isfinite(v) else "" for v in scores[name]]
        if not (codes >= 0).any():
            return None
        return ScatterColouring("slice", categories, codes, colours=[""] * other + [QUIET])

    # --- TensorBoard projector -----------------------------------------------------------------------------------

    def _write_projector(self, embeddings: Path, rows: np.ndarray, used: np.ndarray, xy: np.ndarray,
                         tiles: np.ndarray, names: List[str], meta: Dict[str, List[str]]) -> str:
        """results/projector/ for the thumbnailed points (the projector needs a tile per row); returns a phrase
        saying what it holds ("" when nothing was written)."""
        mode = str(self.cfg.projector)
        if mode == "none" or not len(used):
            return ""
        folder = self.ctx.results_dir / "projector"
        folder.mkdir(exist_ok=True)
        tensors = (read_npz_rows(embeddings, "features", rows[used]) if mode == "features" else xy[used])  # (T, D)

        def write_tensors(handle: Any) -> None:
            for first in range(0, len(tensors), COPY_ROWS):
                chunk = np.asarray(tensors[first:first + COPY_ROWS], dtype=np.float32)
                handle.write("".join("\t".join(f"{v:.6g}" for v in row) + "\n" for row in chunk).encode("utf-8"))

        write_atomic_with(folder / "tensors.tsv", write_tensors, "tensors.tsv")
        columns = ["path", *meta]
        lines = ["\t".join(columns)]
        for point in used:
            lines.append("\t".join(_tsv_cell(names[point] if c == "path" else meta[c][point]) for c in columns))
        write_atomic(folder / "metadata.tsv", "\n".join(lines) + "\n", "metadata.tsv")
        count = len(used)
        per_row = math.ceil(math.sqrt(count))
        side = min(int(self.cfg.tile), PROJECTOR_SPRITE_SIDE // per_row)
        sprite = np.zeros((math.ceil(count / per_row) * side, per_row * side, 3), dtype=np.uint8)
        for j, pixels in enumerate(tiles):
            if side != pixels.shape[0]:
                pixels = np.asarray(Image.fromarray(pixels).resize((side, side), Image.BILINEAR))
            r, c = divmod(j, per_row)
            sprite[r * side:(r + 1) * side, c * side:(c + 1) * side] = pixels
        buffer = _png(sprite)
        write_atomic(folder / "sprite.png", buffer, "sprite.png")
        config = ("embeddings {\n  tensor_name: \"explorer\"\n  tensor_path: \"tensors.tsv\"\n"
                  "  metadata_path: \"metadata.tsv\"\n  sprite {\n    image_path: \"sprite.png\"\n"
                  f"    single_image_dim: {side}\n    single_image_dim: {side}\n  }}\n}}\n")
        write_atomic(folder / "projector_config.pbtxt", config, "projector_config.pbtxt")
        what = "full features" if mode == "features" else "2-D layout"
        return f"{count:,} rows of {tensors.shape[1]}-d {what}, {side} px sprite tiles"


def _png(pixels: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
