"""`knn`: how well a backbone's embedding separates the folder's classes, by DINO's k-NN evaluation (eval_knn).

Protocol (Caron et al. 2021; Wu et al. 2018): features L2-normalised, cosine similarity, the k = 20 most similar
labelled images vote, each for its class with weight exp(similarity / T), T = 0.07; leave-one-out over the folder,
so every labelled image is scored against all the others and is never its own neighbour (another image with the
same features is still another image). Equal similarities go to the earlier file, equal class scores to the lower
class index, so results do not depend on batches, shards or the device.

- Neighbour pool: the labelled images (decoded, finite features) other than the query; an unlabelled image is not
  scored but gets its neighbours and a vote from that pool too. A folder without labels pools every image, for
  the neighbours only. k larger than the pool (minus the query) is clamped, and the section says so.
- Accuracy needs at least 2 classes with images; otherwise the section says why there is none.
- Top-5: the label among the 5 highest-scoring classes with at least one vote (a class no neighbour voted for is
  never counted, so how DINO's sort would order those does not matter). With 5 classes or fewer every class is in
  the top 5 (DINO's number would be 1.0), so there is none: `top5_accuracy` is null and the section says so.
- Non-finite features: the image is left out (not scored, no neighbours, in no pool) and counted in an alert.

The pass only streams each image's normalised features (float32; float16, about 1e-3 precise, when they would
pass 1 GiB, as `activations` does) with its label to disk (RowStore), so shards merge exactly; the search runs at
finalize over all rows, on the run device, in blocks of `block_size` queries against chunks of the stored rows with
a running top-k (reportgen/analyses/_knn_math.py): no N x N matrix at any size.

Results: `results/knn.json` (k, k_requested, temperature, top1_accuracy, top5_accuracy, per_class {class: {images,
correct, top1_accuracy}}, counts); `results/neighbours.csv` (path, label, predicted (the k-NN vote; empty without
accuracy), then neighbour_1, similarity_1, ..., neighbour_n, similarity_n; empty cells past the pool).
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from reportgen.analyses._knn_math import nearest_neighbours, rank_hits, unit_rows, weighted_vote
from reportgen.analyses._redecode import decode_thumbnail
from reportgen.analyses.base import Analysis, Batch, RunContext, register
from reportgen.errors import ConfigError
from reportgen.inputs.labels import folder_display_names
from reportgen.report import plots
from reportgen.report.elements import Alert, GalleryItem, ImageStrip, KeyValues, Section, Table, Text
from reportgen.state.files import write_atomic_with, write_json
from reportgen.state.streams import COPY_ROWS, RowStore, absorb_rows

TOP = 5  # the "top-5" of top-5 accuracy
MIN_TEMPERATURE = 1.0 / 88.0  # exp(1 / T) overflows float32 below this
HALF_PRECISION_VALUES = 1 << 28  # features stored as float16 past this many values (1 GiB of float32)


@dataclass
class KnnConfig:
    k: int = 20  # neighbours that vote (DINO: 20); clamped to the pool size minus the query
    temperature: float = 0.07  # each neighbour votes exp(similarity / temperature) for its class (DINO: 0.07)
    neighbours: int = 5  # nearest neighbours listed per image in neighbours.csv and drawn in the gallery
    queries: int = 8  # gallery: images spread over the sorted folder, each with its nearest neighbours
    worst: int = 8  # gallery: labelled images whose neighbours' vote agrees least with their label
    block_size: int = 1024  # queries compared with the stored features at once (memory: block x 8192 floats)


@register("knn")
class Knn(Analysis):
    Config = KnnConfig
    title = "k-NN evaluation"
    tasks = frozenset({"embedding"})
    why_not = ("it evaluates a backbone's embedding (features without a head); a classifier's report has "
               "Predictions instead")
    oom_safe = True  # normalising and copying to the CPU come before the row is appended

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        for key, low in (("k", 1), ("neighbours", 0), ("queries", 0), ("worst", 0), ("block_size", 1)):
            if int(getattr(cfg, key)) < low:
                raise ConfigError(f"analysis.knn.{key}", getattr(cfg, key), f"an integer >= {low}")
        if not float(cfg.temperature) >= MIN_TEMPERATURE:
            raise ConfigError("analysis.knn.temperature", cfg.temperature,
                              f"a temperature >= {MIN_TEMPERATURE:.4f} (1/88: exp(1/T) must stay finite in float32)")

    def __init__(self, cfg: Any, ctx: RunContext):
        super().__init__(cfg, ctx)
        self.check_config(cfg)
        self.store: Optional[RowStore] = None  # per image: unit features (D,), label, finite
        self.nonfinite = 0  # images whose features hold NaN or Inf (left out)

    def update(self, batch: Batch, outputs: Any, captures: Any) -> None:
        features = outputs.embedding.detach().float()  # (B, D)
        finite = torch.isfinite(features).all(dim=1)  # (B,)
        unit = unit_rows(torch.where(finite[:, None], features, torch.zeros_like(features)))  # (B, D)
        unit_np, finite_np, labels_np = unit.cpu().numpy(), finite.cpu().numpy(), batch.labels.cpu().numpy()
        if self.store is None:
            dim = int(unit_np.shape[1])
            dtype = np.float32 if dim * self.ctx.num_images <= HALF_PRECISION_VALUES else np.float16
            self.store = RowStore(self.ctx.results_dir / ".knn", self.ctx.row_capacity,
                                  {"features": ((dim,), dtype), "labels": ((), np.int64), "finite": ((), np.bool_)})
        self.store.append(batch.paths, features=unit_np, labels=labels_np, finite=finite_np)
        self.nonfinite += int((~finite_np).sum())

    def state_dict(self) -> Dict[str, Any]:
        return {"nonfinite": self.nonfinite,
                "store": self.store.ref() if self.store is not None else None}

    def merge(self, state: Dict[str, Any]) -> None:
        self.nonfinite += state["nonfinite"]
        self.store = absorb_rows(self.store, state["store"], self.ctx.results_dir / ".knn", self.ctx.row_capacity)

    # --- finalize ----------------------------------------------------------------------------------------------

    def finalize(self) -> Optional[Section]:
        section = Section(id="knn", title=self.title)
        if self.store is None or not self.store.count:
            section.elements.append(Text("No image was processed, so there is no k-NN evaluation."))
            return section
        store = self.store
        store.ref()  # flushed: the rows and paths on disk are complete
        count = store.count
        paths = self._paths(store, count)
        labels = store.read("labels", 0, count).copy()  # (N,)
        finite = store.read("finite", 0, count).copy()  # (N,)
        classes = list(self.ctx.dataset_classes)
        labelled = finite & (labels >= 0)
        pool = labelled if labelled.any() else finite  # no labels at all: every image, for the neighbours only
        present = np.unique(labels[labelled])
        scoring = len(present) >= 2
        pool_size = int(pool.sum())
        k = max(1, min(int(self.cfg.k), pool_size - 1))
        shown = min(int(self.cfg.neighbours), pool_size)
        kk = max(k if scoring else 0, shown)
        result = self._search(store, count, labels, labelled, pool, k, kk, shown, len(classes), scoring)
        self._write_csv(paths, labels, classes, result, scoring)
        totals = self._totals(result, labels, labelled, classes, present, k, pool_size, store, scoring)
        write_json(self.ctx.results_dir / "knn.json", totals)
        for stored in store.fields.values():
            stored.handle.close()
        store._paths.close()  # RowStore has no close() of its own (pack() closes, but knn keeps no copy)
        self.store = None
        self._describe(section, totals, result, labels, classes, present, paths, labelled)
        return section

    def _paths(self, store: RowStore, count: int) -> List[str]:
        """The stored rows' paths (the folder's sorted order)."""
        with open(store.folder / "paths.jsonl", encoding="utf-8") as handle:
            return [json.loads(next(handle)) for _ in range(count)]

    def _search(self, store: RowStore, count: int, labels: np.ndarray, labelled: np.ndarray, pool: np.ndarray,
                k: int, kk: int, shown: int, num_classes: int, scoring: bool) -> Dict[str, np.ndarray]:
        """Every image's `shown` nearest neighbours and, when scoring, its vote: predicted class, hits, agreement
        (the vote's share for its own label)."""
        device = self.ctx.device
        out = {"rows": np.full((count, shown), -1, dtype=np.int64), "sims": np.zeros((count, shown), np.float32),
               "predicted": np.full(count, -1, dtype=np.int64), "hit1": np.zeros(count, bool),
               "hit5": np.zeros(count, bool), "agreement": np.full(count, np.nan, dtype=np.float32)}
        if kk == 0:
            return out
        finite = store.read("finite", 0, count)
        labels_device = torch.as_tensor(labels, device=device)  # (N,)
        for start, stop, sims, rows in nearest_neighbours(lambda a, b: store.read("features", a, b), count, pool,
                                                          kk, device, int(self.cfg.block_size)):
            out["rows"][start:stop] = rows[:, :shown].cpu().numpy()
            out["sims"][start:stop] = sims[:, :shown].cpu().numpy()
            if not scoring:
                continue
            scores = weighted_vote(sims, rows, labels_device, num_classes, k, float(self.cfg.temperature))  # (b, C)
            targets = labels_device[start:stop]  # (b,)
            predicted, hit1, hit5 = rank_hits(scores, targets, TOP)  # (b,)
            own = scores.gather(1, targets.clamp_min(0)[:, None])[:, 0]  # (b,)
            agreement = own / scores.sum(dim=1).clamp_min(torch.finfo(scores.dtype).tiny)  # (b,)
            out["predicted"][start:stop] = predicted.cpu().numpy()
            out["hit1"][start:stop] = hit1.cpu().numpy()
            out["hit5"][start:stop] = hit5.cpu().numpy()
            out["agreement"][start:stop] = agreement.cpu().numpy()
        no_neighbours = ~finite[:, None] | (out["rows"] < 0)
        out["rows"][no_neighbours] = -1
        out["predicted"][~finite] = -1
        scored = labelled if scoring else np.zeros(count, bool)
        out["hit1"] &= scored
        out["hit5"] &= scored
        out["agreement"][~scored] = np.nan
        return out

    def _write_csv(self, paths: List[str], labels: np.ndarray, classes: List[str], result: Dict[str, np.ndarray],
                   scoring: bool) -> None:
        shown = result["rows"].shape[1]
        header = ["path", "label", "predicted"] + [c for i in range(1, shown + 1)
                                                   for c in (f"neighbour_{i}", f"similarity_{i}")]

        def write(handle: Any) -> None:  # streamed in pieces of COPY_ROWS rows: no whole file in memory
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            writer.writerow(header)
            for row, path in enumerate(paths):
                predicted = int(result["predicted"][row])
                cells = [path, classes[labels[row]] if labels[row] >= 0 else "",
                         classes[predicted] if scoring and predicted >= 0 else ""]
                for other, sim in zip(result["rows"][row], result["sims"][row]):
                    cells += [paths[other], f"{sim:.6f}"] if other >= 0 else ["", ""]
                writer.writerow(cells)
                if (row + 1) % COPY_ROWS == 0 or row + 1 == len(paths):
                    handle.write(buffer.getvalue().encode("utf-8"))
                    buffer.seek(0)
                    buffer.truncate()

        write_atomic_with(self.ctx.results_dir / "neighbours.csv", write, "neighbours.csv")

    def _totals(self, result: Dict[str, np.ndarray], labels: np.ndarray, labelled: np.ndarray, classes: List[str],
                present: np.ndarray, k: int, pool_size: int, store: RowStore, scoring: bool) -> Dict[str, Any]:
        """knn.json: the protocol's numbers, per class too."""
        scored = int(labelled.sum()) if scoring else 0
        top5 = scoring and len(present) > TOP
        per_class: Dict[str, Any] = {}
        if scoring:
            for c in present:
                members = labelled & (labels == c)
                correct = int(result["hit1"][members].sum())
                per_class[classes[c]] = {"images": int(members.sum()), "correct": correct,
                                         "top1_accuracy": correct / int(members.sum())}
        features = store.fields["features"]
        return {
            "k": k if scoring else None, "k_requested": int(self.cfg.k), "temperature": float(self.cfg.temperature),
            "top1_accuracy": int(result["hit1"].sum()) / scored if scoring else None,
            "top5_accuracy": int(result["hit5"].sum()) / scored if top5 else None,
            "per_class": per_class, "images": int(len(labels)), "scored": scored, "pool": pool_size,
            "classes": int(len(present)), "neighbours": int(result["rows"].shape[1]),
            "nonfinite_features": self.nonfinite, "feature_dim": int(features.shape[1]),
            "feature_dtype": str(features.dtype), "no_accuracy": None if scoring else self._why_no_accuracy(present),
        }

    def _why_no_accuracy(self, present: np.ndarray) -> str:
        if not self.ctx.dataset_classes:
            return "the folder has no class subfolders, so there are no labels to score the vote against"
        if not len(present):
            return "no labelled image was processed"
        return (f"only one class ({self.ctx.dataset_classes[present[0]]}) has images; a vote needs at least 2 "
                f"classes to mean anything")

    # --- the section -------------------------------------------------------------------------------------------

    def _describe(self, section: Section, totals: Dict[str, Any], result: Dict[str, np.ndarray], labels: np.ndarray,
                  classes: List[str], present: np.ndarray, paths: List[str], labelled: np.ndarray) -> None:
        cfg, scoring = self.cfg, totals["k"] is not None
        names = folder_display_names(classes, [])
        if scoring:
            top5 = (f", top-5 {totals['top5_accuracy']:.1%}" if totals["top5_accuracy"] is not None else "")
            section.summary = (f"top-1 {totals['top1_accuracy']:.1%}{top5} over {totals['scored']} labelled images "
                               f"(k = {totals['k']}, T = {float(cfg.temperature):g}, leave-one-out)")
        else:
            section.summary = f"neighbours only: no accuracy ({totals['no_accuracy']})"
        facts: List[Tuple[str, Any]] = [
            ("protocol", "DINO eval_knn: L2-normalised features, cosine similarity, each of the k nearest labelled "
                         "images votes exp(similarity / T) for its class; leave-one-out (never its own neighbour)"),
            ("images", f"{totals['images']} ({totals['scored']} scored, neighbour pool {totals['pool']})"),
            ("features", f"{totals['feature_dim']} dimensions, stored as {totals['feature_dtype']}"
                         + (" (float16 past 1 GiB: similarities to about 1e-3)"
                            if totals["feature_dtype"] == "float16" else "")),
        ]
        if scoring:
            facts += [("k", totals["k"]), ("temperature", float(cfg.temperature)),
                      ("top-1 accuracy", f"{totals['top1_accuracy']:.1%} ({int(result['hit1'].sum())}/"
                                         f"{totals['scored']})"),
                      (f"top-{TOP} accuracy", f"{totals['top5_accuracy']:.1%}" if totals["top5_accuracy"] is not None
                       else f"none: with {totals['classes']} classes every class is in the top {TOP}")]
        facts.append(("results", "results/knn.json, results/neighbours.csv (each image's "
                                 f"{totals['neighbours']} nearest neighbours with similarities)"))
        section.elements.append(KeyValues(facts))
        if scoring and totals["k"] < int(cfg.k):
            section.alerts.append(Alert("info", f"k = {int(cfg.k)} is more than the {totals['pool'] - 1} other "
                                                f"labelled images: the vote uses k = {totals['k']}"))
        if self.nonfinite:
            section.alerts.append(Alert("error", f"{self.nonfinite} images have NaN or Inf features; they are left "
                                                 f"out of the evaluation and have no neighbours"))
        if not scoring:
            section.elements.append(Text(f"No accuracy: {totals['no_accuracy']}. The neighbours below are still "
                                         f"the embedding's own view of the folder."))
        else:
            self._accuracy_elements(section, result, labels, labelled, present, names)
        self._galleries(section, result, labels, paths, labelled, names, scoring)

    def _accuracy_elements(self, section: Section, result: Dict[str, np.ndarray], labels: np.ndarray,
                           labelled: np.ndarray, present: np.ndarray, names: List[str]) -> None:
        dpi = int(self.ctx.report.figure_dpi)
        confusion = np.zeros((len(present), len(present)), dtype=np.int64)
        column = {int(c): i for i, c in enumerate(present)}
        for true, predicted in zip(labels[labelled], result["predicted"][labelled]):
            confusion[column[int(true)], column[int(predicted)]] += 1
        rows = []
        for i, c in enumerate(present):
            total, correct = int(confusion[i].sum()), int(confusion[i, i])
            wrong = confusion[i].copy()
            wrong[i] = 0
            instead = f"{names[present[int(wrong.argmax())]]} ({int(wrong.max())})" if wrong.max() else ""
            rows.append([names[c], total, correct, round(correct / total, 4), instead])
        section.elements.append(Table(["class", "images", "correct", "top-1 accuracy", "most often voted instead"],
                                      rows, caption="Per-class k-NN top-1 accuracy (leave-one-out)"))
        section.elements.append(plots.horizontal_bars([r[3] for r in rows], [r[0] for r in rows],
                                                      name="per_class_accuracy", xlabel="k-NN top-1 accuracy",
                                                      xlim=(0, 1), dpi=dpi, highlight_below=0.5,
                                                      caption="Per-class k-NN accuracy (red: under 50%)"))
        shown = [names[c] for c in present]
        section.elements.append(plots.confusion_matrix(confusion, shown, shown, name="confusion", dpi=dpi,
                                                       caption="k-NN confusion matrix (rows: folder class, "
                                                               "columns: the neighbours' vote)"))

    def _galleries(self, section: Section, result: Dict[str, np.ndarray], labels: np.ndarray, paths: List[str],
                   labelled: np.ndarray, names: List[str], scoring: bool) -> None:
        """Image strips: a query and its nearest neighbours, for a spread of the folder and the least agreeing."""
        if not result["rows"].shape[1]:
            return
        candidates = np.flatnonzero(result["rows"][:, 0] >= 0)  # images with neighbours, in folder order
        wanted = min(int(self.cfg.queries), len(candidates))
        spread = [int(candidates[int((i + 0.5) * len(candidates) / wanted)]) for i in range(wanted)]
        worst: List[int] = []
        if scoring and int(self.cfg.worst):
            scored = np.flatnonzero(labelled & np.isfinite(result["agreement"]))
            order = np.lexsort((scored, result["agreement"][scored]))  # lowest agreement, then earlier file
            worst = [int(r) for r in scored[order[: int(self.cfg.worst)]]]
        images: Dict[int, Optional[np.ndarray]] = {}
        for title, chosen, note in (
                ("Nearest neighbours across the folder", spread,
                 "images spread evenly over the sorted folder, each followed by its nearest neighbours"),
                ("Least agreement with their label", worst,
                 "labelled images whose neighbours' vote gives their own class the smallest share, lowest first")):
            if not chosen:
                continue
            section.elements.append(Text(f"{title}: {note} (frame: green = same class as the image, red = "
                                         f"another class)."))
            for row in chosen:
                section.elements.append(self._strip(row, result, labels, paths, names, images, scoring))

    def _strip(self, row: int, result: Dict[str, np.ndarray], labels: np.ndarray, paths: List[str],
               names: List[str], images: Dict[int, Optional[np.ndarray]], scoring: bool) -> ImageStrip:
        label = int(labels[row])
        lines = [f"label: {names[label]}" if label >= 0 else "no label"]
        predicted = int(result["predicted"][row])
        if scoring and predicted >= 0:
            lines.append(f"k-NN vote: {names[predicted]}")
        if np.isfinite(result["agreement"][row]):
            lines.append(f"vote for its label {result['agreement'][row]:.0%}")
        status = "neutral" if label < 0 or not scoring else ("ok" if predicted == label else "bad")
        panels = [self._panel(row, "query", [], status, paths, images)]
        for rank, (other, sim) in enumerate(zip(result["rows"][row], result["sims"][row]), start=1):
            if other < 0:
                break
            theirs = int(labels[other])
            panel_status = "neutral" if label < 0 or theirs < 0 else ("ok" if theirs == label else "bad")
            panel_lines = [f"#{rank} similarity {sim:.3f}", names[theirs] if theirs >= 0 else "no label"]
            panels.append(self._panel(int(other), paths[other], panel_lines, panel_status, paths, images))
        return ImageStrip(title=paths[row], lines=lines, panels=panels)

    def _panel(self, row: int, title: str, lines: List[str], status: str, paths: List[str],
               images: Dict[int, Optional[np.ndarray]]) -> GalleryItem:
        if row not in images:
            images[row] = decode_thumbnail(self.ctx, paths[row])
        image = images[row]
        if image is None:
            return GalleryItem(image=None, title=title, lines=lines + ["(could not be read again)"], status=status)
        return GalleryItem(image=image, title=title, lines=lines, status=status)
