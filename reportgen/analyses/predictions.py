"""`predictions`: top-k classes per image, and accuracy, per-class accuracy and confusion where folders are labels.

Per-image rows stream to `results/predictions.csv` as batches arrive; everything kept in memory is bounded
(counts, fixed-bin histograms, and a few galleries of at most `report.gallery_size` thumbnails).
Folder names are matched to the model's class names (case, `_` and `-` ignored), or by WordNet id for ImageNet-layout
folders; accuracy counts only images whose folder matched a class, and the report says how many did.

`activation` turns logits into probabilities: softmax over the outputs, or sigmoid, where each output is its own
probability. `auto` takes sigmoid for a single output (a binary classifier: two outcomes, "not X" and "X") and for a
head its library declares multi-label, softmax otherwise. A multi-label head has no top-1 accuracy (several classes
may be right at once): the section gives per-class recall and precision at probability 0.5 instead.

The full probability vector of every image (float32, under that activation) streams to disk as well (a RowStore,
merged across shards like the CSV) and becomes `results/probabilities.npy` (N x K float32, in predictions.csv's row
order) at finalize: label issues, error slices and anyone re-analysing need all K columns, not the top-k.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from reportgen.analyses.base import Analysis, Batch, RunContext, register
from reportgen.errors import ConfigError
from reportgen.inputs.labels import WORDNET_ID, display_names, folder_display_names, match_labels, output_synsets
from reportgen.report import plots
from reportgen.report.elements import Alert, Gallery, GalleryItem, KeyValues, Section, Table, Text
from reportgen.report.thumbnails import thumbnail
from reportgen.state.files import write_atomic_with, write_json
from reportgen.state.reducers import BoundedTop, FixedHistogram
from reportgen.state.streams import COPY_ROWS, CsvStream, RowStore, absorb_csv, absorb_rows

CONFIDENCE_EDGES = np.linspace(0.0, 1.0, 21)
CSV_HEADER = ["path", "label", "top1_index", "top1_name", "top1_prob", "topk_indices", "topk_names", "topk_probs"]
ACTIVATIONS = ["auto", "softmax", "sigmoid"]
MULTI_LABEL_THRESHOLD = 0.5  # a multi-label output counts as "predicted" at this probability or above
PROBABILITIES_FILE = "probabilities.npy"  # (N, K) float32, predictions.csv's rows


def activation_mode(activation: str, num_outputs: int, multi_label: bool) -> str:
    """softmax | binary (one sigmoid output, two outcomes) | multi-label (independent sigmoids), for the configured
    `activation` (auto | softmax | sigmoid) and a head of `num_outputs` logits."""
    sigmoid = activation == "sigmoid" or (activation == "auto" and (num_outputs == 1 or multi_label))
    return "softmax" if not sigmoid else "binary" if num_outputs == 1 else "multi-label"


def column_names(loaded: Any, mode: str, num_classes: int) -> List[str]:
    """One name per probability column: a binary head's two outcomes, else the model's class names."""
    names = list(loaded.class_names)
    if mode == "binary":
        return names if len(names) == 2 else [f"not {names[0]}", names[0]] if names else ["negative", "positive"]
    return display_names(names, num_classes)


def folder_targets(dataset_classes: List[str], loaded: Any, mode: str, num_outputs: int) -> np.ndarray:
    """(n_folder,) the probability column each folder class matches (-1: none), as accuracy counts it."""
    if mode == "binary":  # the two outcomes get the names folders are matched against
        return match_labels(dataset_classes, column_names(loaded, mode, 2))
    if num_outputs == 1000 and not loaded.synsets:  # a nameless 1000-class head: ImageNet's order
        return match_labels(dataset_classes, loaded.class_names, output_synsets(loaded.synsets, num_outputs))
    return match_labels(dataset_classes, loaded.class_names, loaded.synsets)


@dataclass
class PredictionsConfig:
    top_k: int = 5  # classes listed per image (and top-k accuracy)
    low_confidence: float = 0.5  # top-1 probability under this is flagged as low confidence
    activation: str = "auto"  # auto | softmax | sigmoid (auto: sigmoid for one output or a multi-label head)
    save_probabilities: bool = True  # results/probabilities.npy, every image's N x K float32 vector (label_issues,
    #   slices and the explorer read it); false for very large heads or folders (e.g. 21k classes x 1M images)


@register("predictions")
class Predictions(Analysis):
    Config = PredictionsConfig
    title = "Predictions"
    tasks = frozenset({"classification"})
    why_not = "they output no class scores to rank (a backbone's features, per-pixel or per-box outputs)"
    oom_safe = True  # softmax and top-k on the device come before any count changes (num_outputs is idempotent)

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        if str(cfg.activation) not in ACTIVATIONS:
            raise ConfigError("analysis.predictions.activation", cfg.activation, "how logits become probabilities",
                              ACTIVATIONS)

    def __init__(self, cfg: Any, ctx: RunContext):
        super().__init__(cfg, ctx)
        self.check_config(cfg)
        loaded = ctx.loaded
        self.label_to_output = match_labels(ctx.dataset_classes, loaded.class_names, loaded.synsets)  # (n_folder,)
        self.folder_names = folder_display_names(ctx.dataset_classes, loaded.class_names, loaded.synsets)
        self.num_outputs: Optional[int] = None  # logits of the model
        self.num_classes: Optional[int] = None  # probability columns: the outputs, or 2 outcomes of a binary head
        self.mode = "softmax"  # softmax | binary (one sigmoid output) | multi-label (independent sigmoids)
        self.flagged: Optional[np.ndarray] = None  # multi-label: (n_folder_classes, K) images with p >= 0.5
        self.images = 0
        self.nonfinite = 0
        self.evaluated = 0  # labelled images whose folder matched a model class
        self.correct_top1 = 0
        self.correct_topk = 0
        self.confusion: Optional[np.ndarray] = None  # (n_folder_classes, num_outputs) counts
        self.hist_correct = FixedHistogram(CONFIDENCE_EDGES)
        self.hist_wrong = FixedHistogram(CONFIDENCE_EDGES)
        self.hist_unlabelled = FixedHistogram(CONFIDENCE_EDGES)
        size = int(ctx.report.gallery_size)
        self.first = BoundedTop(size)  # first images of the folder, by index
        self.least_confident = BoundedTop(size)
        self.confident_mistakes = BoundedTop(size)
        self._csv: Optional[CsvStream] = None  # results/predictions.csv, one row per image as batches arrive
        self._probs: Optional[RowStore] = None  # per image: the (num_classes,) probabilities, for probabilities.npy
        self._names: Optional[List[str]] = None

    def _set_outputs(self, num_outputs: int) -> None:
        """Decide the activation once the number of logits is known (first batch, or a merged state)."""
        self.num_outputs = num_outputs
        self.mode = activation_mode(str(self.cfg.activation), num_outputs, bool(self.ctx.loaded.multi_label))
        self.num_classes = 2 if self.mode == "binary" else num_outputs
        self.label_to_output = folder_targets(self.ctx.dataset_classes, self.ctx.loaded, self.mode, num_outputs)

    def _names_of_classes(self) -> List[str]:
        """One name per probability column: a binary head's two outcomes, else the model's class names."""
        return column_names(self.ctx.loaded, self.mode, self.num_classes or 0)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, K) logits -> (B, num_classes) probabilities under this run's activation."""
        if self.mode == "binary":
            positive = torch.sigmoid(logits)  # (B, 1)
            return torch.cat([1.0 - positive, positive], dim=1)  # (B, 2): outcome 0 = "not", 1 = the class
        return torch.sigmoid(logits) if self.mode == "multi-label" else torch.softmax(logits, dim=1)  # (B, K)

    def update(self, batch: Batch, outputs: Any, captures: Any) -> None:
        logits = outputs.logits.detach().float()  # (B, K)
        if self.num_outputs is None:
            self._set_outputs(logits.shape[1])
            self.confusion = np.zeros((len(self.ctx.dataset_classes), self.num_classes), dtype=np.int64)
            self.flagged = np.zeros_like(self.confusion)
        finite = torch.isfinite(logits).all(dim=1)  # (B,)
        probs = self.probabilities(logits)  # (B, C)
        flagged = (probs >= MULTI_LABEL_THRESHOLD).cpu().numpy() if self.mode == "multi-label" else None  # (B, C)
        k = min(int(self.cfg.top_k), self.num_classes)
        top_probs, top_idx = probs.topk(k, dim=1)  # (B, k)
        mapping = torch.as_tensor(self.label_to_output, device=logits.device)
        labels = batch.labels
        target = torch.full_like(labels, -1)
        labelled = labels >= 0
        if mapping.numel():
            target[labelled] = mapping[labels[labelled]]
        # one device->host copy for the whole batch
        top_probs, top_idx, target, labels, finite, all_probs = (
            t.cpu().numpy() for t in (top_probs, top_idx, target, labels, finite, probs.float()))  # all_probs (B, C)
        indices = batch.indices.cpu().numpy()
        self.images += len(indices)
        self.nonfinite += int((~finite).sum())
        evaluated = target >= 0
        hit1 = evaluated & (top_idx[:, 0] == target)
        hitk = evaluated & (top_idx == target[:, None]).any(axis=1)
        self.evaluated += int(evaluated.sum())
        self.correct_top1 += int(hit1.sum())
        self.correct_topk += int(hitk.sum())
        for label, pred in zip(labels[labels >= 0], top_idx[labels >= 0, 0]):
            self.confusion[label, pred] += 1
        if flagged is not None:
            np.add.at(self.flagged, labels[labels >= 0], flagged[labels >= 0].astype(np.int64))
        self.hist_correct.add(top_probs[hit1, 0])
        self.hist_wrong.add(top_probs[evaluated & ~hit1, 0])
        self.hist_unlabelled.add(top_probs[~evaluated, 0])
        self._write_rows(batch, indices, labels, top_idx, top_probs)
        if self.cfg.save_probabilities:
            if self._probs is None:
                self._probs = RowStore(self.ctx.results_dir / ".predictions", self.ctx.row_capacity,
                                       {"probabilities": ((self.num_classes,), np.float32)})
            self._probs.append(batch.paths, probabilities=all_probs)
        for row, index in enumerate(indices):
            p1 = float(top_probs[row, 0])
            candidates = [(self.first, -float(index)), (self.least_confident, -p1 if np.isfinite(p1) else 1.0)]
            if evaluated[row] and not hit1[row]:
                candidates.append((self.confident_mistakes, p1))
            wanted = [(heap, score) for heap, score in candidates if heap.accepts(score, int(index))]
            if not wanted:
                continue
            item = {
                "index": int(index), "path": batch.paths[row], "label": int(labels[row]),
                "target": int(target[row]), "top_idx": top_idx[row].tolist(), "top_probs": top_probs[row].tolist(),
                "full": batch.images[row].permute(1, 2, 0).numpy().copy(),  # (H, W, 3): the model's input (its
                #   thumbnail is made when drawn: most items are pushed out of their heap again)
            }
            for heap, score in wanted:
                heap.push(score, int(index), item)

    def _write_rows(self, batch: Batch, indices, labels, top_idx, top_probs) -> None:
        if self._csv is None:
            self._csv = CsvStream(self.ctx.results_dir / "predictions.csv", CSV_HEADER)
        if self._names is None:
            self._names = self._names_of_classes()  # once, not per batch
        names = self._names
        for row in range(len(indices)):
            label = self.ctx.dataset_classes[labels[row]] if labels[row] >= 0 else ""
            self._csv.writerow([
                batch.paths[row], label, int(top_idx[row, 0]), names[top_idx[row, 0]], f"{top_probs[row, 0]:.6f}",
                " ".join(str(int(i)) for i in top_idx[row]), "|".join(names[i] for i in top_idx[row]),
                " ".join(f"{p:.6f}" for p in top_probs[row]),
            ])

    def state_dict(self) -> Dict[str, Any]:
        return {
            "num_outputs": self.num_outputs, "flagged": self.flagged, "images": self.images,
            "nonfinite": self.nonfinite,
            "evaluated": self.evaluated, "correct_top1": self.correct_top1, "correct_topk": self.correct_topk,
            "confusion": self.confusion, "hist_correct": self.hist_correct, "hist_wrong": self.hist_wrong,
            "hist_unlabelled": self.hist_unlabelled, "first": self.first, "least_confident": self.least_confident,
            "confident_mistakes": self.confident_mistakes, "csv": self._csv.ref() if self._csv is not None else None,
            "probabilities": self._probs.ref() if self._probs is not None else None,
        }

    def merge(self, state: Dict[str, Any]) -> None:
        if state["num_outputs"] is None:
            return
        self._csv = absorb_csv(self._csv, state["csv"], self.ctx.results_dir / "predictions.csv", CSV_HEADER)
        self._probs = absorb_rows(self._probs, state.get("probabilities"), self.ctx.results_dir / ".predictions",
                                  self.ctx.row_capacity)
        if self.num_outputs is None:
            self._set_outputs(state["num_outputs"])
            self.confusion = np.zeros_like(state["confusion"])
            self.flagged = np.zeros_like(state["confusion"])
        for key in ("images", "nonfinite", "evaluated", "correct_top1", "correct_topk"):
            setattr(self, key, getattr(self, key) + state[key])
        self.confusion += state["confusion"]
        if state.get("flagged") is not None:
            self.flagged += state["flagged"]
        for key in ("hist_correct", "hist_wrong", "hist_unlabelled", "first", "least_confident",
                    "confident_mistakes"):
            getattr(self, key).merge(state[key])

    def finalize(self) -> Optional[Section]:
        if self._csv is not None:
            self._csv.close()
        self._write_probabilities()
        section = Section(id="predictions", title="Predictions")
        if not self.images:
            section.elements.append(Text("No image was processed, so there are no predictions."))
            return section
        names = self._names_of_classes()
        self._write_totals(names)
        dpi = int(self.ctx.report.figure_dpi)
        k = min(int(self.cfg.top_k), self.num_classes or 0)
        multi = self.mode == "multi-label"
        facts: List[Any] = [("images", self.images), ("model outputs", self.num_outputs),
                            ("probabilities", self._activation_text(names))]
        low = int(self.hist_correct.counts[: self._low_bin()].sum() + self.hist_wrong.counts[: self._low_bin()].sum()
                  + self.hist_unlabelled.counts[: self._low_bin()].sum())
        if self.evaluated and not multi:
            facts += [("top-1 accuracy", f"{self.correct_top1 / self.evaluated:.1%} ({self.correct_top1}/"
                                         f"{self.evaluated})"),
                      (f"top-{k} accuracy", f"{self.correct_topk / self.evaluated:.1%}")]
        facts.append((f"top-1 probability < {self.cfg.low_confidence:g}", f"{low} images"))
        section.elements.append(KeyValues(facts))
        if multi:
            section.summary = f"{self.images} images, multi-label head (per-class recall/precision at 0.5)"
            section.elements.append(Text(
                "Multi-label head: every output is its own sigmoid probability and several classes may apply to one "
                "image, so there is no top-1 accuracy. With the folder classes as labels, the table gives each "
                f"class's recall (its images with probability >= {MULTI_LABEL_THRESHOLD:g}) and precision (of the "
                f"labelled images at >= {MULTI_LABEL_THRESHOLD:g} for it, the share from its folder)."))
        else:
            section.summary = (f"top-1 accuracy {self.correct_top1 / self.evaluated:.1%} on {self.evaluated} "
                               f"labelled images" if self.evaluated else f"{self.images} images, no matching labels")
        self._label_notes(section)
        if self.nonfinite:
            section.alerts.append(Alert("error", f"{self.nonfinite} images produced NaN or Inf logits; their "
                                                 f"predictions are meaningless"))
        if low:
            section.alerts.append(Alert("info", f"{low} of {self.images} images have top-1 probability under "
                                                f"{self.cfg.low_confidence:g} (see 'Least confident')"))
        if self.evaluated:
            if multi:
                section.elements.append(Table(["class", "images", f"recall at {MULTI_LABEL_THRESHOLD:g}",
                                               f"precision at {MULTI_LABEL_THRESHOLD:g}"],
                                              [[self.folder_names[i], *row[1:]] for i, row in self._multi_label_rows()],
                                              caption="Per-class metrics of the multi-label head"))
            else:
                self._accuracy_elements(section, names, dpi)
        section.elements.append(plots.stacked_histogram(
            [self.hist_correct.counts, self.hist_wrong.counts, self.hist_unlabelled.counts], CONFIDENCE_EDGES,
            ["correct", "wrong", "no label"], name="confidence", xlabel="top-1 probability",
            caption="Top-1 probability over the folder", dpi=dpi))
        section.elements.append(self._gallery("First images", self.first, names,
                                               "the first images of the sorted folder"))
        section.elements.append(self._gallery("Least confident", self.least_confident, names,
                                              "lowest top-1 probability first"))
        if self.evaluated and not multi:  # a multi-label head has no single right answer to miss
            section.elements.append(self._gallery("Most confident mistakes", self.confident_mistakes, names,
                                                  "wrong top-1 with the highest probability first"))
        return section

    def _write_probabilities(self) -> None:
        """results/probabilities.npy: the stored (N, num_classes) float32 rows, streamed in pieces (atomic)."""
        store = self._probs
        if store is None:
            return
        store.ref()  # flushed: the rows on disk are complete
        rows = store.fields["probabilities"]

        def write(handle: Any) -> None:
            header = {"descr": np.lib.format.dtype_to_descr(rows.dtype), "fortran_order": False,
                      "shape": (store.count, *rows.shape[1:])}
            np.lib.format.write_array_header_2_0(handle, header)
            for first in range(0, store.count, COPY_ROWS):
                handle.write(rows.read(first, min(first + COPY_ROWS, store.count)).tobytes())

        write_atomic_with(self.ctx.results_dir / PROBABILITIES_FILE, write, PROBABILITIES_FILE)
        rows.handle.close()
        store._paths.close()  # RowStore has no close() of its own; its folder goes with the finished run
        self._probs = None

    def _activation_text(self, names: List[str]) -> str:
        if self.mode == "binary":
            return f"sigmoid of the single output = P({names[1]}); P({names[0]}) = 1 - P({names[1]})"
        if self.mode == "multi-label":
            return "sigmoid of each output (multi-label: independent probabilities)"
        return f"softmax over the {self.num_outputs} outputs"

    def _multi_label_rows(self) -> List[Any]:
        """(folder index, [folder class, images, recall, precision]) per matched folder class of a multi-label head."""
        matched = [i for i, m in enumerate(self.label_to_output) if m >= 0]
        rows = []
        for i in matched:
            target, total = int(self.label_to_output[i]), int(self.confusion[i].sum())
            if not total:
                continue
            hits, flagged = int(self.flagged[i, target]), int(self.flagged[matched, target].sum())
            rows.append((i, [self.ctx.dataset_classes[i], total, round(hits / total, 4),
                             round(hits / flagged, 4) if flagged else None]))
        return rows

    def _low_bin(self) -> int:
        return int(np.searchsorted(CONFIDENCE_EDGES, float(self.cfg.low_confidence), side="left"))

    def _label_notes(self, section: Section) -> None:
        classes = self.ctx.dataset_classes
        if not classes:
            section.elements.append(Text("The folder has no class subfolders, so there is no accuracy."))
            return
        unmatched = [c for c, m in zip(classes, self.label_to_output) if m < 0]
        if len(unmatched) == len(classes):
            wordnet = all(WORDNET_ID.match(c) for c in classes)
            hint = ("the folders are named by WordNet id, which map only to an ImageNet head (1000 outputs) or a "
                    "model.labels_file listing one WordNet id per output" if wordnet else
                    "set model.labels_file to name the model's classes")
            section.alerts.append(Alert("warning", f"No folder name matches a model class name, so accuracy is not "
                                                   f"computed ({hint})", details=unmatched))
        elif unmatched:
            section.alerts.append(Alert("info", f"{len(unmatched)} of {len(classes)} folder classes match no model "
                                                f"class; their images are left out of accuracy", details=unmatched))

    def _per_class_rows(self, names: List[str]) -> List[List[Any]]:
        """[folder class, images, correct, accuracy, most often predicted instead] for every matched class."""
        rows = []
        for i, name in enumerate(self.ctx.dataset_classes):
            target = int(self.label_to_output[i])
            total = int(self.confusion[i].sum())
            if target < 0 or total == 0:
                continue
            correct = int(self.confusion[i, target])
            wrong = self.confusion[i].copy()
            wrong[target] = 0
            confused = f"{names[int(wrong.argmax())]} ({int(wrong.max())})" if wrong.max() > 0 else ""
            rows.append([name, total, correct, round(correct / total, 4), confused])
        return rows

    def _write_totals(self, names: List[str]) -> None:
        """results/predictions.json: the numbers a sweep index compares across models."""
        k = min(int(self.cfg.top_k), self.num_classes or 0)
        accuracy = self.evaluated and self.mode != "multi-label"
        totals: Dict[str, Any] = {
            "images": self.images, "evaluated": self.evaluated, "top_k": k, "activation": self.mode,
            "top1_accuracy": self.correct_top1 / self.evaluated if accuracy else None,
            "topk_accuracy": self.correct_topk / self.evaluated if accuracy else None,
            "nonfinite_logits": self.nonfinite,
            "per_class_accuracy": {row[0]: row[3] for row in self._per_class_rows(names)} if accuracy else {},
        }
        if self.mode == "multi-label":
            totals["per_class_multi_label"] = {row[0]: {"images": row[1], "recall": row[2], "precision": row[3]}
                                               for _, row in self._multi_label_rows()}
        write_json(self.ctx.results_dir / "predictions.json", totals)

    def _accuracy_elements(self, section: Section, names: List[str], dpi: int) -> None:
        classes = self.ctx.dataset_classes
        rows = self._per_class_rows(names)
        per_class = [(row[0], row[2] / row[1]) for row in rows]
        shown = {name: readable for name, readable in zip(classes, self.folder_names)}
        section.elements.append(Table(["class", "images", "correct", "accuracy", "most often predicted instead"],
                                      [[shown[row[0]], *row[1:]] for row in rows], caption="Per-class top-1 accuracy"))
        section.elements.append(plots.horizontal_bars([a for _, a in per_class], [shown[n] for n, _ in per_class],
                                                      name="per_class_accuracy", xlabel="top-1 accuracy",
                                                      xlim=(0, 1), dpi=dpi, highlight_below=0.5,
                                                      caption="Per-class accuracy (red: under 50%)"))
        matched = [i for i, m in enumerate(self.label_to_output) if m >= 0]
        columns = [int(self.label_to_output[i]) for i in matched]
        others = np.delete(self.confusion[matched], columns, axis=1).sum(axis=1, keepdims=True)
        matrix = np.concatenate([self.confusion[matched][:, columns], others], axis=1)
        col_labels = [names[c] for c in columns] + (["other"] if others.any() else [])
        if not others.any():
            matrix = matrix[:, :-1]
        section.elements.append(plots.confusion_matrix(matrix, [self.folder_names[i] for i in matched], col_labels,
                                                       name="confusion", dpi=dpi,
                                                       caption="Confusion matrix (rows: folder class; 'other': "
                                                               "any model class without a folder)"))

    def _gallery(self, title: str, heap: BoundedTop, names: List[str], note: str) -> Gallery:
        items = []
        order = heap.items()
        if heap is self.first:
            order = sorted(order, key=lambda e: e[1])
        for _, _, item in order:
            lines = [f"{names[i]} {p:.1%}" for i, p in zip(item["top_idx"], item["top_probs"])]
            status = "neutral"
            if item["target"] >= 0:
                status = "ok" if item["top_idx"][0] == item["target"] else "bad"
            if item["label"] >= 0:
                lines.insert(0, f"label: {self.folder_names[item['label']]}")
            thumb = thumbnail(torch.from_numpy(item["full"]).permute(2, 0, 1), int(self.ctx.report.thumbnail_size))
            items.append(GalleryItem(image=thumb, title=item["path"], lines=lines, status=status,
                                     full=item["full"]))
        return Gallery(title=title, items=items, note=note)
