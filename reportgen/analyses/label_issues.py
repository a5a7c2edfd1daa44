"""`label_issues`: the folder images whose class folder is most likely wrong, by confident learning (cleanlab).

Confident learning (Northcutt et al. 2021): per class, a threshold = the mean predicted probability of that class
over the images labelled with it; the confident joint counts (given label, likely true label) pairs above threshold,
calibrated so its rows sum to the label counts; `prune_by_noise_rate` flags, in every off-diagonal cell, the images
with the largest margin; the flagged images are ranked by self-confidence (the probability of the given label),
lowest first. `cleanlab.filter.find_label_issues` does all of it; this analysis decides what it is given:

- The rows of results/probabilities.npy (the `predictions` analysis's, under its activation) of the images whose
  folder class matches a model class (as accuracy matches them) and whose probabilities are finite. Unlabelled
  images and folders matching no model class are left out, and the section says how many.
- Columns: only the model classes some kept image is labelled with (ascending model index), each row divided by its
  sum over them (float64). cleanlab needs every label in 0..K-1 and present; a 1000-class head on a 10-folder folder
  would otherwise carry 990 classes no image can be relabelled to. Labels are those columns' positions. A row with
  no probability left on them (all underflowed to 0) is left out too.
- The call: find_label_issues(labels, pred_probs, filter_by=filter_by, return_indices_ranked_by=rank_by, n_jobs=1)
  (one process: no worker pool forked inside a run holding a model).

The suggested label is the highest of those renormalised probabilities (the folder class matching that column; the
first such folder when several match one class). It needs single-label probabilities: a multi-label (sigmoid) head
gets one line saying why not. On images the model was trained on it undercounts (the model has fitted their labels,
wrong ones included); out-of-sample probabilities (a held-out split, cross-validation) find more.

State: none. Everything is read from predictions' results files after it finalized (`reads`), so shards and merges
need nothing of their own. Results: `results/label_issues.csv` (path, given, suggested, self_confidence, rank).
"""
from __future__ import annotations

import csv
import io
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from reportgen.analyses._folder_inputs import (FolderPredictions, placeholder, single_label_predictions, require)
from reportgen.analyses._redecode import decode_thumbnail
from reportgen.analyses.base import Analysis, RunContext, register
from reportgen.errors import ConfigError
from reportgen.inputs.labels import folder_display_names
from reportgen.report.elements import Alert, Gallery, GalleryItem, KeyValues, Section, Table, Text
from reportgen.state.files import write_atomic

FILTERS = ["prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given",
           "low_normalized_margin", "low_self_confidence"]  # cleanlab's filter_by
RANKINGS = ["self_confidence", "normalized_margin", "confidence_weighted_entropy"]  # its return_indices_ranked_by
CSV_HEADER = ["path", "given", "suggested", "self_confidence", "rank"]
TRAINING_NOTE = ("On images the model was trained on this undercounts: the model has fitted their labels, wrong ones "
                 "included, so it agrees with them. Probabilities from a model that never saw the images (a held-out "
                 "split, cross-validation) find more.")


@dataclass
class LabelIssuesConfig:
    filter_by: str = "prune_by_noise_rate"  # cleanlab's rule for which images are issues (confident learning's
    #   prune_by_noise_rate: per off-diagonal cell of the confident joint, the largest margins)
    rank_by: str = "self_confidence"  # how the issues are ordered: cleanlab's return_indices_ranked_by
    gallery: int = 16  # likely mislabelled images drawn, highest-ranked first (0: none)


@dataclass
class _Inputs:
    """What is handed to cleanlab, and where it came from."""

    rows: np.ndarray  # (M,) rows of predictions.csv / probabilities.npy passed
    columns: np.ndarray  # (C,) model columns kept, ascending
    labels: np.ndarray  # (M,) given label as a position in `columns`
    pred_probs: np.ndarray  # (M, C) float64, rows sum to 1
    left_out: Dict[str, int]  # reason -> images


@register("label_issues")
class LabelIssues(Analysis):
    Config = LabelIssuesConfig
    title = "Label issues"
    tasks = frozenset({"classification"})
    why_not = "they output no class probabilities to hold the folder's labels against"
    reads = ("predictions",)

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        if str(cfg.filter_by) not in FILTERS:
            raise ConfigError("analysis.label_issues.filter_by", cfg.filter_by, "one of cleanlab's filter_by rules",
                              FILTERS)
        if str(cfg.rank_by) not in RANKINGS:
            raise ConfigError("analysis.label_issues.rank_by", cfg.rank_by, "one of cleanlab's rankings", RANKINGS)
        if int(cfg.gallery) < 0:
            raise ConfigError("analysis.label_issues.gallery", cfg.gallery, "an integer >= 0")
        require("cleanlab", "label_issues", "confident learning")

    def __init__(self, cfg: Any, ctx: RunContext):
        super().__init__(cfg, ctx)
        self.check_config(cfg)

    def finalize(self) -> Optional[Section]:
        section = Section(id="label-issues", title=self.title)
        data, instead = single_label_predictions(self.ctx, "label issues", "confident learning needs")
        if data is None:
            section.elements.append(Text(instead))
            return section
        if not self.ctx.dataset_classes:
            section.elements.append(Text("The folder has no class subfolders, so there are no labels to check."))
            return section
        inputs = select_inputs(data)
        if len(inputs.columns) < 2:
            section.elements.append(Text(f"No label issues: confident learning needs images labelled with at least 2 "
                                         f"model classes; {len(inputs.columns)} found."))
            self._left_out_alert(section, inputs)
            return section
        ranked, caught = self._find(inputs)
        issues = self._issue_rows(data, inputs, ranked)
        self._write_csv(issues)
        self._describe(section, inputs, issues, caught)
        return section

    def _find(self, inputs: _Inputs) -> Tuple[np.ndarray, List[str]]:
        """cleanlab's ranked issue indices (into inputs' rows) and the warnings it gave."""
        from cleanlab.filter import find_label_issues

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ranked = find_label_issues(inputs.labels, inputs.pred_probs, filter_by=str(self.cfg.filter_by),
                                       return_indices_ranked_by=str(self.cfg.rank_by), n_jobs=1)
        return np.asarray(ranked, dtype=np.int64), sorted({str(w.message) for w in caught})

    def _issue_rows(self, data: FolderPredictions, inputs: _Inputs, ranked: np.ndarray) -> List[List[Any]]:
        """[path, given folder, suggested folder, self-confidence, rank] per issue, in rank order."""
        classes = self.ctx.dataset_classes
        rows = []
        for rank, index in enumerate(ranked, start=1):
            row = int(inputs.rows[index])
            suggested = int(inputs.columns[int(inputs.pred_probs[index].argmax())])
            rows.append([data.paths[row], classes[int(data.labels[row])], classes[data.folder_of(suggested)],
                         float(inputs.pred_probs[index, inputs.labels[index]]), rank])
        return rows

    def _write_csv(self, issues: List[List[Any]]) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(CSV_HEADER)
        for path, given, suggested, confidence, rank in issues:
            writer.writerow([path, given, suggested, f"{confidence:.6f}", rank])
        write_atomic(self.ctx.results_dir / "label_issues.csv", buffer.getvalue(), "label_issues.csv")

    def _left_out_alert(self, section: Section, inputs: _Inputs) -> None:
        details = [f"{reason}: {count}" for reason, count in inputs.left_out.items() if count]
        if details:
            section.alerts.append(Alert("info", f"{sum(inputs.left_out.values())} images are left out of the label "
                                                f"check", details=details))

    def _describe(self, section: Section, inputs: _Inputs, issues: List[List[Any]], caught: List[str]) -> None:
        import cleanlab

        checked = len(inputs.rows)
        section.summary = (f"{len(issues)} likely label issues among {checked} labelled images "
                           f"({len(issues) / checked:.1%})")
        shown = dict(zip(self.ctx.dataset_classes, folder_display_names(
            self.ctx.dataset_classes, self.ctx.loaded.class_names, self.ctx.loaded.synsets)))
        section.elements.append(KeyValues([
            ("images checked", checked),
            ("likely label issues", f"{len(issues)} ({len(issues) / checked:.1%})"),
            ("classes", f"{len(inputs.columns)} (the model classes the folder's labels match)"),
            ("method", f"cleanlab {cleanlab.__version__} find_label_issues(filter_by={self.cfg.filter_by}, "
                       f"ranked by {self.cfg.rank_by})"),
            ("probabilities", "the predictions analysis's, restricted to those classes and renormalised per image"),
        ]))
        section.elements.append(Text(TRAINING_NOTE))
        self._left_out_alert(section, inputs)
        if caught:
            section.alerts.append(Alert("info", "cleanlab warned", details=caught))
        if not issues:
            section.elements.append(Text("Confident learning finds no image whose label looks wrong."))
            return
        pairs = Counter((given, suggested) for _, given, suggested, _, _ in issues)
        section.elements.append(Table(["given", "suggested", "images"],
                                      [[shown[g], shown[s], n] for (g, s), n in pairs.most_common()],
                                      caption="Likely label issues by given and suggested class", max_rows=30))
        section.elements.append(Table(CSV_HEADER, [[p, shown[g], shown[s], float(f"{c:.4g}"), r]
                                                   for p, g, s, c, r in issues],
                                      caption=f"Likely label issues, ranked by {self.cfg.rank_by}", max_rows=50,
                                      csv="label_issues.csv"))
        items = []
        for path, given, suggested, confidence, rank in issues[: int(self.cfg.gallery)]:
            image = decode_thumbnail(self.ctx, path)
            lines = [f"given: {shown[given]}", f"suggested: {shown[suggested]}",
                     f"self-confidence {confidence:.3g}", f"rank {rank}"]
            if image is None:
                lines.append("(could not be read again)")
            items.append(GalleryItem(image=image if image is not None else placeholder(self.ctx), title=path,
                                     lines=lines, status="bad"))
        if items:
            section.elements.append(Gallery(title="Likely mislabelled", items=items,
                                            note=f"the highest-ranked label issues ({self.cfg.rank_by}), given → "
                                                 f"suggested class"))


def select_inputs(data: FolderPredictions) -> _Inputs:
    """The labelled rows, model columns, labels and renormalised probabilities handed to cleanlab (module
    docstring): a row is kept when its folder matches a column, its probabilities are finite and some probability
    is left on the kept columns (the columns shrink with the rows until both agree)."""
    finite = np.ones(len(data.paths), dtype=bool)  # (N,)
    for start, stop, probs in data.chunks():
        finite[start:stop] = np.isfinite(probs).all(axis=1)
    unlabelled = data.labels < 0
    unmatched = ~unlabelled & (data.targets < 0)
    kept = (data.targets >= 0) & finite
    left_out = {"unlabelled (no class folder)": int(unlabelled.sum()),
                "folder class matches no model class": int(unmatched.sum()),
                "NaN or Inf probabilities": int((~finite & (data.targets >= 0)).sum()),
                "no probability on the folder's classes": 0}
    while True:
        columns = np.unique(data.targets[kept])  # (C,)
        sums = np.zeros(len(data.paths))  # (N,)
        for start, stop, probs in data.chunks():
            sums[start:stop] = probs[:, columns].astype(np.float64).sum(axis=1)
        empty = kept & ~(sums > 0)
        if not empty.any():
            break
        left_out["no probability on the folder's classes"] += int(empty.sum())
        kept &= ~empty
    rows = np.flatnonzero(kept)  # (M,)
    pred_probs = np.empty((len(rows), len(columns)), dtype=np.float64)  # (M, C)
    for start, stop, probs in data.chunks():
        inside = (rows >= start) & (rows < stop)
        pred_probs[inside] = probs[rows[inside] - start][:, columns]
    pred_probs /= pred_probs.sum(axis=1, keepdims=True)
    labels = np.searchsorted(columns, data.targets[rows]).astype(np.int64)  # (M,)
    return _Inputs(rows, columns, labels, pred_probs, left_out)
