"""`strategies`: the different ways the model decides one class, found by clustering its Grad-CAM maps (SpRAy).

SpRAy (Lapuschkin et al. 2019, "Unmasking Clever Hans predictors") found a "horse" class recognised, for about a
fifth of its images, by a copyright tag in a corner: those maps formed their own cluster. Here, per class that
Grad-CAM explained (the predicted class unless `analysis.gradcam.target` says otherwise) with at least `min_images`
maps: the stored maps (results/gradcam.npz) average-pooled to at most `side` x `side` and normalised to sum 1, a
symmetric k-NN graph, the eigenvectors of the normalised Laplacian's smallest eigenvalues, the cluster count from the
largest eigengap in 2..max_clusters, k-means on the row-normalised eigenvectors (reportgen/analyses/_spray_math.py).

Per cluster: size, share of the class, accuracy (the model's top-1 against the folder label, where the folder
matches a model class), the mean map p (sums to 1) and
- entropy: H(p) / log(cells), with H(p) = -sum p log p (1 = uniform);
- the excess q = max(p - 1/cells, 0), renormalised: where the cluster looks more than on average. A Grad-CAM map
  often keeps a floor over the whole image (colour and texture are evidence everywhere) that hides a hot spot from
  H(p); q drops it. Of q: the effective area exp(H(q)) / cells (the share of the map it covers evenly; a uniform p
  gives 1), the peripheral mass (the share of q in the border band: cells whose centre lies within `border` of the
  side from an edge) and the centre of mass (y, x in image sides, from the top left);
- centre shift: the distance between its centre and the class's largest cluster's, in image sides.
Flagged (a possible shortcut): not the largest cluster, under `minority` of the class, effective area at most
`max_area`, peripheral mass at least `min_peripheral` and centre shift at least `min_shift`. Without object masks,
"away from the object" means "at the border, and not where the rest of the class looks". Calibration: small clusters
of pure-noise maps reach an effective area of 0.29 to 0.32 at the least (1000 classes x 50 random 7 x 7 and 14 x 14
maps), hence 0.2; the planted corner square of tests/test_strategies.py gives 0.12, peripheral mass 0.70, shift 0.45.

Scale: every map of a class up to `max_images`; a larger class is sampled (seeded, the same on every run and shard
layout) and the section says so. The maps are streamed from gradcam.npz once, the sampled ones kept pooled in a
temporary file, and each class clustered in turn, so memory holds one class. The pass itself keeps only each image's
top-1 class and label (a row store), so shards merge exactly.

Results: `results/strategies.json` (settings, per class: images, clustered, sampled, eigenvalues, clusters with
their numbers, flag reasons and member paths).
"""
from __future__ import annotations

import json
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from reportgen.analyses._spray_math import prepare_maps, spectral_clusters
from reportgen.analyses._redecode import decode_thumbnail
from reportgen.analyses.base import Analysis, Batch, RunContext, register
from reportgen.errors import ConfigError
from reportgen.inputs.labels import display_names, match_labels, output_synsets
from reportgen.report.elements import Alert, GalleryItem, ImageStrip, KeyValues, Section, Table, Text
from reportgen.report.overlays import HEATMAP_CMAP, heat_on_thumbnail, overlay, resize_maps
from reportgen.state.files import write_json
from reportgen.state.streams import COPY_ROWS, RowFile, RowStore, absorb_rows

NEEDS_GRADCAM = ("Needs the gradcam analysis: add it to analysis=[...] (with a spatial target layer); this run wrote "
                 "no results/gradcam.npz, so there are no maps to cluster.")


@dataclass
class StrategiesConfig:
    min_images: int = 20  # classes with fewer Grad-CAM maps are not clustered (listed as skipped)
    max_images: int = 2000  # maps clustered per class at most; a larger class is sampled (seeded, stated)
    k: int = 10  # neighbours per map in the k-NN graph (SpRAy: 10); clamped to the class's maps - 1
    max_clusters: int = 10  # clusters per class at most; the count is the largest eigengap's in 2..max_clusters
    side: int = 16  # maps are average-pooled to at most side x side before clustering (SpRAy: at most 16)
    minority: float = 0.5  # flag: the cluster holds less than this share of its class (and is not the largest)
    max_area: float = 0.2  # flag: its mean map's excess over uniform is concentrated, effective area
    #   exp(entropy) / cells at most this
    border: float = 0.2  # the border band: cells whose centre lies within this fraction of the side from an edge
    min_peripheral: float = 0.5  # flag: at least this share of that excess lies in the border band
    min_shift: float = 0.2  # flag: the excess's centre of mass lies at least this far (in image sides) from the
    #   largest cluster's (0: any)
    seed: int = 0  # the per-class sample and k-means
    classes_shown: int = 8  # classes drawn in the report (flagged first, then the largest); all are in the json
    members_shown: int = 5  # member thumbnails per cluster (the closest to the cluster's mean map)


@register("strategies")
class Strategies(Analysis):
    Config = StrategiesConfig
    title = "Strategies (SpRAy)"
    tasks = frozenset({"classification"})
    why_not = "it clusters the Grad-CAM maps of each predicted class, and they output no class scores"
    reads = ("gradcam",)  # results/gradcam.npz, written at gradcam's finalize
    oom_safe = True  # the argmax is taken before the row is appended

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        for key, low in (("min_images", 3), ("k", 1), ("max_clusters", 2), ("side", 1), ("classes_shown", 0),
                         ("members_shown", 0)):
            if int(getattr(cfg, key)) < low:
                raise ConfigError(f"analysis.strategies.{key}", getattr(cfg, key), f"an integer >= {low}")
        if int(cfg.max_images) < int(cfg.min_images):
            raise ConfigError("analysis.strategies.max_images", cfg.max_images,
                              f"an integer >= min_images ({cfg.min_images})")
        for key, low, high in (("minority", 0.0, 1.0), ("max_area", 0.0, 1.0), ("min_peripheral", 0.0, 1.0)):
            if not low < float(getattr(cfg, key)) <= high:
                raise ConfigError(f"analysis.strategies.{key}", getattr(cfg, key), f"a fraction in ({low}, {high}]")
        if not 0.0 < float(cfg.border) < 0.5:
            raise ConfigError("analysis.strategies.border", cfg.border, "a fraction of the side in (0, 0.5)")
        if not 0.0 <= float(cfg.min_shift) <= 1.5:
            raise ConfigError("analysis.strategies.min_shift", cfg.min_shift, "a distance in image sides in [0, 1.5]")

    def __init__(self, cfg: Any, ctx: RunContext):
        super().__init__(cfg, ctx)
        self.check_config(cfg)
        self.store: Optional[RowStore] = None  # per image: top-1 output index, folder label
        self.num_outputs: Optional[int] = None

    def update(self, batch: Batch, outputs: Any, captures: Any) -> None:
        logits = outputs.logits.detach()  # (B, K)
        predicted = logits.argmax(dim=1).cpu().numpy()  # (B,)
        labels = batch.labels.cpu().numpy()  # (B,)
        if self.store is None:
            self.store = RowStore(self.ctx.results_dir / ".strategies", self.ctx.row_capacity,
                                  {"predicted": ((), np.int64), "labels": ((), np.int64)})
        self.store.append(batch.paths, predicted=predicted, labels=labels)
        self.num_outputs = int(logits.shape[1])

    def state_dict(self) -> Dict[str, Any]:
        return {"num_outputs": self.num_outputs, "store": self.store.ref() if self.store is not None else None}

    def merge(self, state: Dict[str, Any]) -> None:
        self.num_outputs = self.num_outputs or state["num_outputs"]
        self.store = absorb_rows(self.store, state["store"], self.ctx.results_dir / ".strategies",
                                 self.ctx.row_capacity)

    # --- finalize ----------------------------------------------------------------------------------------------

    def finalize(self) -> Optional[Section]:
        section = Section(id="strategies", title=self.title)
        npz = self.ctx.results_dir / "gradcam.npz"
        if not npz.is_file():
            section.summary = "needs the gradcam analysis"
            section.elements.append(Text(NEEDS_GRADCAM))
            return section
        with np.load(npz) as archive:
            classes = archive["classes"].astype(np.int64)  # (N,) the class each map explains
            layer = str(archive["layer"])
        grid = _member_shape(npz, "cams")[1:]  # (h, w)
        if not len(classes):
            section.elements.append(Text("No image was processed, so there are no maps to cluster."))
            return section
        num_outputs = max(self.num_outputs or 0, int(classes.max()) + 1)
        names = _unique(display_names(self.ctx.loaded.class_names, num_outputs))  # also the json's class keys
        plan = self._plan(classes)
        scratch = self.ctx.results_dir / ".strategies-maps.npy"
        maps: Optional[RowFile] = None
        try:
            maps, empty, size = self._pooled_maps(npz, plan, scratch, grid)
            paths = self._sampled_paths(npz, plan)
            correct, labelled = self._correctness(paths, num_outputs)
            results = {}
            for cls, (first, rows) in plan["slots"].items():
                stop = first + len(rows)
                class_maps = maps.read(first, stop).astype(np.float64)  # (n, h', w'), one class in memory
                results[cls] = self._cluster(class_maps, first, empty[first:stop], paths[first:stop],
                                             correct[first:stop], labelled[first:stop], int(plan["counts"][cls]))
            report = self._json(results, plan, names, layer, grid, size, bool(labelled.any()), int(empty.sum()))
            write_json(self.ctx.results_dir / "strategies.json", report)
            self._describe(section, report, results, names, maps)
        finally:
            if maps is not None:
                maps.handle.close()
            scratch.unlink(missing_ok=True)
            self._close_store()
        return section

    def _close_store(self) -> None:
        if self.store is None:
            return
        for stored in self.store.fields.values():
            stored.handle.close()
        self.store._paths.close()  # RowStore has no close() of its own (the folder goes with the run's streams)

    def _plan(self, classes: np.ndarray) -> Dict[str, Any]:
        """Which rows of gradcam.npz are clustered: per class with at least `min_images` maps, all its rows or a
        seeded sample of `max_images` of them; each chosen row gets a slot, a class's slots contiguous in row
        order. {"counts": (K,) maps per class, "slots": {class: (first slot, (n,) rows)}, "slot_of_row": (N,)
        slot or -1, "total": slots, "sampled": [classes sampled]}."""
        cfg = self.cfg
        counts = np.bincount(classes)
        order = np.argsort(classes, kind="stable")  # rows grouped by class, in folder order within a class
        starts = np.concatenate([[0], np.cumsum(counts)])
        slots: Dict[int, Tuple[int, np.ndarray]] = {}
        slot_of_row = np.full(len(classes), -1, dtype=np.int64)
        sampled, total = [], 0
        for cls in np.flatnonzero(counts >= int(cfg.min_images)):
            rows = order[starts[cls]:starts[cls + 1]]
            if len(rows) > int(cfg.max_images):
                pick = np.random.default_rng([int(cfg.seed), int(cls)]).choice(len(rows), int(cfg.max_images),
                                                                               replace=False)
                rows = rows[np.sort(pick)]
                sampled.append(int(cls))
            slots[int(cls)] = (total, rows)
            slot_of_row[rows] = np.arange(total, total + len(rows))
            total += len(rows)
        return {"counts": counts, "slots": slots, "slot_of_row": slot_of_row, "total": total, "sampled": sampled}

    def _pooled_maps(self, npz: Path, plan: Dict[str, Any], scratch: Path, grid: Tuple[int, ...]
                     ) -> Tuple[RowFile, np.ndarray, Tuple[int, int]]:
        """The chosen maps pooled and normalised (`prepare_maps`), in slot order in a scratch file read back one
        class at a time; (total,) True where a map had no positive mass; the pooled size (h', w')."""
        side = int(self.cfg.side)
        size = (min(int(grid[0]), side), min(int(grid[1]), side))
        maps = RowFile.create(scratch, (max(plan["total"], 1), *size), np.dtype(np.float32))
        empty = np.zeros(plan["total"], dtype=bool)
        for start, chunk in _member_chunks(npz, "cams"):
            slots = plan["slot_of_row"][start:start + len(chunk)]
            chosen = slots >= 0
            if not chosen.any():
                continue
            pooled, blank = prepare_maps(chunk[chosen], side)  # (m, h', w')
            slots = slots[chosen]
            empty[slots] = blank
            breaks = np.flatnonzero(np.diff(slots) != 1) + 1  # runs of consecutive slots
            for run in np.split(np.arange(len(slots)), breaks):
                maps.write(int(slots[run[0]]), pooled[run])
        return maps, empty, size

    def _sampled_paths(self, npz: Path, plan: Dict[str, Any]) -> List[str]:
        """The chosen rows' paths, in slot order."""
        paths: List[str] = [""] * plan["total"]
        for start, chunk in _member_chunks(npz, "paths"):
            slots = plan["slot_of_row"][start:start + len(chunk)]
            for row in np.flatnonzero(slots >= 0):
                paths[int(slots[row])] = str(chunk[row])
        return paths

    def _correctness(self, paths: List[str], num_outputs: int) -> Tuple[np.ndarray, np.ndarray]:
        """Per chosen map: whether the model's top-1 is the folder's class, and whether that can be told (a folder
        label matched to a model output), joined by path with the pass's own rows."""
        correct = np.zeros(len(paths), dtype=bool)
        labelled = np.zeros(len(paths), dtype=bool)
        store = self.store
        if store is None or not store.count or num_outputs < 2 or not self.ctx.dataset_classes:
            return correct, labelled
        loaded = self.ctx.loaded
        label_to_output = match_labels(self.ctx.dataset_classes, loaded.class_names,
                                       output_synsets(loaded.synsets, num_outputs))  # (folder classes,)
        slot_of_path = {path: slot for slot, path in enumerate(paths)}
        store.ref()  # flushed: the rows and paths on disk are complete
        predicted = store.read("predicted", 0, store.count)
        labels = store.read("labels", 0, store.count)
        with open(store.folder / "paths.jsonl", encoding="utf-8") as handle:
            for row in range(store.count):
                slot = slot_of_path.get(json.loads(handle.readline()))
                if slot is None or labels[row] < 0 or label_to_output[labels[row]] < 0:
                    continue
                labelled[slot] = True
                correct[slot] = predicted[row] == label_to_output[labels[row]]
        return correct, labelled

    def _cluster(self, maps: np.ndarray, first: int, empty: np.ndarray, paths: List[str], correct: np.ndarray,
                 labelled: np.ndarray, images: int) -> Dict[str, Any]:
        """One class (its maps in slots first, first + 1, ...): its clustering, each cluster's numbers and flag,
        the members to draw (path, slot)."""
        cfg = self.cfg
        result = spectral_clusters(maps, int(cfg.k), int(cfg.max_clusters), int(cfg.seed))
        height, width = maps.shape[1:]
        ys = (np.arange(height) + 0.5) / height
        xs = (np.arange(width) + 0.5) / width
        band = ((ys < cfg.border) | (ys > 1 - cfg.border))[:, None] | ((xs < cfg.border) | (xs > 1 - cfg.border))
        clusters = []
        for cid in range(result.clusters):
            members = np.flatnonzero(result.labels == cid)
            mean = maps[members].mean(axis=0)  # (h', w'), sums to 1
            cells = height * width
            excess = np.maximum(mean - 1.0 / cells, 0.0)  # (h', w') where it looks more than on average
            excess = excess / excess.sum() if excess.sum() > 0 else np.full_like(mean, 1.0 / cells)
            centre = np.array([(excess.sum(axis=1) * ys).sum(), (excess.sum(axis=0) * xs).sum()])  # (y, x)
            distances = ((maps[members] - mean) ** 2).sum(axis=(1, 2))
            shown = members[np.lexsort((members, distances))[: int(cfg.members_shown)]]
            scored = int(labelled[members].sum())
            clusters.append({
                "size": int(len(members)), "share": len(members) / len(maps),
                "labelled": scored, "correct": int((correct & labelled)[members].sum()),
                "accuracy": int((correct & labelled)[members].sum()) / scored if scored else None,
                "entropy": _entropy(mean) / np.log(cells) if cells > 1 else 0.0,
                "effective_area": float(np.exp(_entropy(excess)) / cells),
                "peripheral_mass": float(excess[band].sum()), "centre": [float(centre[0]), float(centre[1])],
                "empty_maps": int(empty[members].sum()), "mean_map": mean,
                "shown": [(paths[m], first + int(m)) for m in shown],  # (path, slot) of the members drawn
                "members": [paths[m] for m in members],
            })
        largest = np.array(clusters[0]["centre"])
        for cid, cluster in enumerate(clusters):
            cluster["shift"] = float(np.linalg.norm(np.array(cluster["centre"]) - largest))
            reasons = {"minority": cid > 0 and cluster["share"] < cfg.minority,
                       "concentrated": cluster["effective_area"] <= cfg.max_area,
                       "peripheral": cluster["peripheral_mass"] >= cfg.min_peripheral,
                       "shifted": cluster["shift"] >= cfg.min_shift}
            cluster["reasons"] = reasons
            cluster["flagged"] = all(reasons.values())
        return {"result": result, "clusters": clusters, "images": images, "clustered": len(maps)}

    def _json(self, results: Dict[int, Dict[str, Any]], plan: Dict[str, Any], names: List[str], layer: str,
              grid: Tuple[int, ...], size: Tuple[int, int], accuracy: bool, empty: int) -> Dict[str, Any]:
        """strategies.json: the settings, then per class its clusters (numbers, flag reasons, members)."""
        cfg = self.cfg
        per_class = {}
        for cls, found in results.items():
            result = found["result"]
            per_class[names[cls]] = {
                "class_index": cls, "images": found["images"], "clustered": found["clustered"],
                "sampled": cls in plan["sampled"], "k": result.k, "solver": result.solver,
                "eigenvalues": [float(v) for v in result.eigenvalues], "clusters_found": result.clusters,
                "eigengap": result.gap,
                "clusters": [{"cluster": cid, **{key: value for key, value in cluster.items()
                                                  if key not in ("mean_map", "shown")},
                              "mean_map": np.round(cluster["mean_map"], 6).tolist()}
                             for cid, cluster in enumerate(found["clusters"])],
            }
        skipped = {names[c]: int(n) for c, n in enumerate(plan["counts"]) if 0 < n < int(cfg.min_images)}
        return {
            "layer": layer, "map_size": [int(d) for d in grid], "pooled_size": list(size), "k": int(cfg.k),
            "max_clusters": int(cfg.max_clusters), "min_images": int(cfg.min_images),
            "max_images": int(cfg.max_images), "seed": int(cfg.seed),
            "flag_rule": {"minority": float(cfg.minority), "max_area": float(cfg.max_area),
                          "border": float(cfg.border), "min_peripheral": float(cfg.min_peripheral),
                          "min_shift": float(cfg.min_shift)},
            "accuracy_available": accuracy, "empty_maps": empty, "classes": per_class, "skipped": skipped,
            "flagged": sum(c["flagged"] for found in results.values() for c in found["clusters"]),
        }

    # --- the section -------------------------------------------------------------------------------------------

    def _describe(self, section: Section, report: Dict[str, Any], results: Dict[int, Dict[str, Any]],
                  names: List[str], maps: RowFile) -> None:
        cfg = self.cfg
        flagged = report["flagged"]
        clustered = sum(found["clustered"] for found in results.values())
        section.summary = (f"{len(results)} classes clustered ({clustered} maps), {flagged} cluster"
                           f"{'' if flagged == 1 else 's'} flagged as possible shortcuts")
        sampled = [names[c] for c in results if report["classes"][names[c]]["sampled"]]
        section.elements.append(KeyValues([
            ("maps", f"Grad-CAM of {report['layer']} ({'×'.join(map(str, report['map_size']))}), average-pooled to "
                     f"{'×'.join(map(str, report['pooled_size']))} and normalised to sum 1; grouped by the class "
                     f"Grad-CAM explained (the predicted class unless analysis.gradcam.target says otherwise)"),
            ("method", f"SpRAy (Lapuschkin et al. 2019): symmetric {cfg.k}-NN graph of the maps (Euclidean), "
                       f"normalised Laplacian, cluster count from the largest eigengap in 2–{cfg.max_clusters}, "
                       f"k-means on the row-normalised eigenvectors (seed {cfg.seed}). A strategy shared by fewer "
                       f"than about k = {cfg.k} images cannot form a cluster of its own"),
            ("classes clustered", f"{len(results)} with at least {cfg.min_images} maps"
                                  + (f"; {len(report['skipped'])} with fewer skipped" if report["skipped"] else "")),
            ("sampling", f"at most {cfg.max_images} maps per class, drawn at random (seed {cfg.seed}) from larger "
                         f"classes: " + (", ".join(sampled[:10]) + (" ..." if len(sampled) > 10 else "")
                                         if sampled else "none was larger")),
            ("flag", f"a cluster other than the class's largest, under {cfg.minority:.0%} of the class, where the "
                     f"part of its mean map above the map's average (the excess) is concentrated (effective area "
                     f"exp(entropy)/cells ≤ {cfg.max_area}), at least {cfg.min_peripheral:.0%} in the border band "
                     f"(the outer {cfg.border:.0%} of each side), its centre at least {cfg.min_shift} image sides "
                     f"from the largest cluster's: a possible shortcut (Clever Hans), worth looking at its images"),
            ("accuracy", "the model's top-1 against the folder's class" if report["accuracy_available"] else
             "unavailable: no image has a folder label that matches one of the model's classes"),
            ("results", "results/strategies.json (per class: eigenvalues, clusters with their numbers, flag reasons "
                        "and member paths)"),
        ]))
        if not results:
            section.elements.append(Text(f"No class has at least {cfg.min_images} Grad-CAM maps "
                                         f"(analysis.strategies.min_images), so nothing was clustered."))
            return
        rows = []
        for cls, found in results.items():
            entry = report["classes"][names[cls]]
            rows.append([names[cls], entry["images"], entry["clustered"], entry["clusters_found"],
                         round(entry["eigengap"], 4), sum(c["flagged"] for c in found["clusters"])])
        rows.sort(key=lambda r: (-r[5], -r[1], r[0]))
        section.elements.append(Table(["class", "maps", "clustered", "clusters", "eigengap", "flagged clusters"],
                                      rows, caption="Classes clustered (flagged first). A small eigengap means the "
                                                    "clusters are not well separated.", max_rows=50,
                                      csv="strategies.json"))
        details = []
        for cls, found in results.items():
            for cid, cluster in enumerate(found["clusters"]):
                if cluster["flagged"]:
                    details.append(f"{names[cls]} · cluster {cid}: {cluster['size']} maps ({cluster['share']:.0%}), "
                                   f"{_accuracy_text(cluster)}, {cluster['peripheral_mass']:.0%} of its mean map "
                                   f"at the border, effective area {cluster['effective_area']:.2f}")
        if report["empty_maps"]:
            section.alerts.append(Alert("info", f"{report['empty_maps']} of the maps clustered have no positive "
                                                f"Grad-CAM mass (all zero: nothing raised the score); they are "
                                                f"clustered as uniform maps"))
        if details:
            section.alerts.append(Alert("warning", f"{len(details)} cluster{'s' if len(details) > 1 else ''} of "
                                                   f"Grad-CAM maps look at a small region at the image border, "
                                                   f"away from the rest of their class: a possible shortcut",
                                        details=details))
        shown = sorted(results, key=lambda c: (-sum(x["flagged"] for x in results[c]["clusters"]),
                                                -results[c]["images"], c))[: int(cfg.classes_shown)]
        for cls in shown:
            self._class_elements(section, names[cls], results[cls], report["classes"][names[cls]], maps)

    def _class_elements(self, section: Section, name: str, found: Dict[str, Any], entry: Dict[str, Any],
                        maps: RowFile) -> None:
        sampled = f", a sample of {entry['clustered']} of {entry['images']}" if entry["sampled"] else ""
        rows = [[cid, c["size"], round(c["share"], 4), _rounded(c["accuracy"]), round(c["entropy"], 3),
                 round(c["effective_area"], 3), round(c["peripheral_mass"], 3), round(c["shift"], 3),
                 "possible shortcut" if c["flagged"] else ""] for cid, c in enumerate(found["clusters"])]
        section.elements.append(Table(
            ["cluster", "maps", "share", "accuracy", "entropy", "effective area", "peripheral mass", "centre shift",
             "flag"], rows,
            caption=f"{name}: {entry['clusters_found']} clusters of {entry['clustered']} maps{sampled} (eigengap "
                    f"{entry['eigengap']:.3f}, k = {entry['k']}). Entropy of the mean map / log(cells); of the mean "
                    f"map's excess over its average: effective area exp(entropy) / cells, peripheral mass (share in "
                    f"the border band) and centre shift from cluster 0 in image sides."))
        size = int(self.ctx.report.thumbnail_size)
        for cid, cluster in enumerate(found["clusters"]):
            panels = [GalleryItem(image=_map_image(cluster["mean_map"], size), title="mean map",
                                  lines=[f"effective area {cluster['effective_area']:.2f}",
                                         f"border {cluster['peripheral_mass']:.0%}"],
                                  status="bad" if cluster["flagged"] else "neutral")]
            panels += [self._panel(path, maps.read(slot, slot + 1)[0], size) for path, slot in cluster["shown"]]
            lines = [f"{cluster['size']} maps ({cluster['share']:.0%} of the class)", _accuracy_text(cluster)]
            if cluster["flagged"]:
                lines.append("possible shortcut: concentrated at the border, away from the rest of the class")
            section.elements.append(ImageStrip(title=f"{name} · cluster {cid}", lines=lines, panels=panels))

    def _panel(self, path: str, pooled: np.ndarray, size: int) -> GalleryItem:
        """A member's picture with its pooled map laid over it; the lines say why when it cannot be read again."""
        image = decode_thumbnail(self.ctx, path, size)
        if image is None:
            return GalleryItem(image=None, title=path, lines=["(could not be read again)"])
        return GalleryItem(image=heat_on_thumbnail(image, torch.tensor(pooled)), title=path)


def _unique(names: List[str]) -> List[str]:
    """Class names with a repeated name told apart by its output index ("x (3)", "x (7)")."""
    counts = Counter(names)
    return [name if counts[name] == 1 else f"{name} ({index})" for index, name in enumerate(names)]


def _entropy(p: np.ndarray) -> float:
    """-sum p log p of a map summing to 1 (nats)."""
    nonzero = p[p > 0]
    return float(-(nonzero * np.log(nonzero)).sum())


def _accuracy_text(cluster: Dict[str, Any]) -> str:
    if cluster["accuracy"] is None:
        return "accuracy unavailable (no matched label)"
    return f"accuracy {cluster['accuracy']:.0%} ({cluster['correct']}/{cluster['labelled']})"


def _rounded(value: Optional[float]) -> Any:
    return "" if value is None else round(value, 4)


def _map_image(mean: np.ndarray, size: int) -> np.ndarray:
    """(h, w) mean map -> (size, size, 3) uint8 in the report's heatmap colours, scaled to its own maximum."""
    peak = float(mean.max())
    heat = torch.from_numpy(mean / peak if peak > 0 else mean).float()[None]  # (1, h, w) in [0, 1]
    heat = resize_maps(heat, size, size)[0].numpy()  # (size, size)
    return overlay(np.zeros((size, size, 3), dtype=np.uint8), heat, alpha=1.0, cmap=HEATMAP_CMAP)


def _member_header(handle: Any) -> Tuple[Tuple[int, ...], np.dtype]:
    major, _ = np.lib.format.read_magic(handle)
    reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = reader(handle)
    if fortran:
        raise ValueError("a Fortran-ordered array cannot be streamed by rows")
    return tuple(shape), np.dtype(dtype)


def _member_shape(npz: Path, name: str) -> Tuple[int, ...]:
    """The shape of one array of an .npz, from its header alone."""
    with zipfile.ZipFile(npz) as archive, archive.open(f"{name}.npy") as member:
        return _member_header(member)[0]


def _member_chunks(npz: Path, name: str) -> Iterator[Tuple[int, np.ndarray]]:
    """(first row, rows) of one array of an .npz, COPY_ROWS rows at a time, decompressed as read: never the whole
    array in memory (gradcam.npz holds a map for every image of the folder)."""
    with zipfile.ZipFile(npz) as archive, archive.open(f"{name}.npy") as member:
        shape, dtype = _member_header(member)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], COPY_ROWS):
            count = min(COPY_ROWS, shape[0] - start)
            data = member.read(count * row_bytes)
            yield start, np.frombuffer(data, dtype=dtype).reshape(count, *shape[1:])
