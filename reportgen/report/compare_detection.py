"""The numbers of a comparison of object detection runs, from each run's `results/detection_metrics.json` (the
folder's COCO metrics and per-class AP) and `results/detection_images.csv` (one row per image: objects, detections
and, at IoU 0.5 and the run's drawing score threshold, true positives, false positives and missed objects).

Per class: every run's AP side by side, classes matched by name; runs with different class lists are compared on the
classes all of them have, and the others are named. Per image: for every pair of runs, the difference b − a of the
errors (missed objects + false positives) on the images labelled in both, and the exact two-sided sign test on the
nonzero differences (fewer errors is better). Plain inputs (names, dicts, tables), so every number can be checked
without run folders.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import pandas as pd

from reportgen.errors import RunError
from reportgen.inputs.labels import normalise_class_name
from reportgen.report.compare_stats import holm_adjusted, p_value_text, sign_test

METRICS_FILE = "detection_metrics.json"  # under results/
IMAGES_FILE = "detection_images.csv"  # under results/
METRICS = (("map", "mAP"), ("map_50", "AP50"), ("map_75", "AP75"), ("map_small", "AP small"),
           ("map_medium", "AP medium"), ("map_large", "AP large"), ("mar_100", "AR@100"))  # file key, page name
COUNTS = ("objects", "detections", "true_positives", "false_positives", "missed")  # detection_images.csv counts
SIGNIFICANCE = 0.05  # a sign-test p below this says which run makes fewer errors
LARGEST_DIFFERENCES = 5  # images listed each way per pair


def read_detection_images(path: Path) -> pd.DataFrame:
    """A run's detection_images.csv indexed by path: the counts as floats (NaN where empty: unlabelled images),
    `errors` = missed + false_positives and `labelled` (bool)."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = sorted({"path", "labelled", *COUNTS} - set(table.columns))
    if missing:
        raise RunError(f"{path} lacks the column(s) {missing}: not a detection_images.csv this version reads")
    if table["path"].duplicated().any():
        raise RunError(f"{path} lists {table['path'][table['path'].duplicated()].iloc[0]!r} twice")

    def count(text: str) -> float:
        if not text.strip():
            return math.nan
        value = float(text)
        if not (value >= 0 and value == int(value)):
            raise ValueError(f"{text!r} is not a count")
        return value

    out = pd.DataFrame(index=pd.Index(table["path"], name="path"))
    try:
        for column in COUNTS:
            out[column] = table[column].map(count).to_numpy(dtype=float)
    except ValueError as exc:
        raise RunError(f"{path}: a count column holds something else ({exc}); rerun that run") from exc
    out["errors"] = out["missed"] + out["false_positives"]
    out["labelled"] = (table["labelled"].str.strip() == "1").to_numpy()
    return out


# ---------------------------------------------------------------------------------------------------- per class

@dataclass
class ClassAP:
    """Per-class AP of every run on the classes all runs have, matched by normalised name, in the first run's order."""

    table: pd.DataFrame  # index: class (the first run's name); `objects` (the first run's ground-truth objects), one
    #                      column per run (AP@[.5:.95]; NaN: the run has no AP for it), `spread` (max − min)
    ap50: pd.DataFrame  # same index, one column per run: AP at IoU 0.5
    detections: pd.DataFrame  # same index, one column per run: the run's detections of the class
    missing: Dict[str, List[str]] = field(default_factory=dict)  # run -> classes another run has and it lacks

    def notes(self) -> List[str]:
        """The class-list mismatch in words, one line per run that lacks classes."""
        return [f"{run} has no class {', '.join(classes)} (another run has); the per-class comparison is over the "
                f"{len(self.table)} classes every run has" for run, classes in self.missing.items()]

    def rows(self) -> pd.DataFrame:
        """per_class.csv: class, objects, then each run's AP, AP50 and detections, then the AP spread."""
        out = pd.DataFrame({"objects": self.table["objects"]}, index=self.table.index)
        for run in self.ap50.columns:
            out[f"{run}: ap"] = self.table[run]
            out[f"{run}: ap50"] = self.ap50[run]
            out[f"{run}: detections"] = self.detections[run]
        out["ap_spread"] = self.table["spread"]
        return out


def _classes_of(name: str, metrics: Mapping) -> Dict[str, Tuple[str, Mapping]]:
    """{normalised name: (name, per-class row)}; the first class of a repeated name wins."""
    rows = metrics.get("per_class") or []
    if not isinstance(rows, list) or not all(isinstance(r, Mapping) for r in rows):
        raise RunError(f"{name}: the per_class of its {METRICS_FILE} is not a list of classes; rerun that run")
    by_key: Dict[str, Tuple[str, Mapping]] = {}
    for row in rows:
        cls = str(row.get("name") or f"class {row.get('id')}")
        by_key.setdefault(normalise_class_name(cls), (cls, row))
    return by_key


def _number(value) -> float:
    return math.nan if value is None else float(value)


def class_ap(names: Sequence[str], metrics: Sequence[Mapping]) -> ClassAP:
    """Classes × runs AP from each run's detection_metrics.json (`names[i]` is the run of `metrics[i]`)."""
    runs = [_classes_of(n, m) for n, m in zip(names, metrics)]
    shared = [key for key in runs[0] if all(key in r for r in runs[1:])]
    every = list(dict.fromkeys(key for r in runs for key in r))
    shown = {key: next(r[key][0] for r in runs if key in r) for key in every}
    missing = {n: [shown[k] for k in every if k not in r] for n, r in zip(names, runs)}
    index = pd.Index([runs[0][k][0] for k in shared], name="class")

    def column(run: Dict[str, Tuple[str, Mapping]], key: str) -> List[float]:
        return [_number(run[k][1].get(key)) for k in shared]

    table = pd.DataFrame({"objects": [int(runs[0][k][1].get("ground_truth") or 0) for k in shared]}, index=index)
    ap50 = pd.DataFrame(index=index)
    detections = pd.DataFrame(index=index)
    for n, r in zip(names, runs):
        table[n] = column(r, "ap")
        ap50[n] = column(r, "ap50")
        detections[n] = [int(r[k][1].get("detections") or 0) for k in shared]
    values = table[list(names)]
    table["spread"] = values.max(axis=1, skipna=False) - values.min(axis=1, skipna=False)
    return ClassAP(table=table, ap50=ap50, detections=detections, missing={n: m for n, m in missing.items() if m})


# ---------------------------------------------------------------------------------------------------- per image

@dataclass
class ImageErrors:
    """One image's errors in two runs: missed objects and false positives of `a` and of `b`."""

    path: str
    objects: int  # ground-truth objects (run a's count)
    missed_a: int
    false_positives_a: int
    missed_b: int
    false_positives_b: int

    @property
    def errors_a(self) -> int:
        return self.missed_a + self.false_positives_a

    @property
    def errors_b(self) -> int:
        return self.missed_b + self.false_positives_b

    @property
    def difference(self) -> int:
        """b − a: negative where b makes fewer errors."""
        return self.errors_b - self.errors_a


@dataclass
class ErrorPair:
    """Runs `a` and `b` on the images labelled in both: the per-image error difference b − a and its sign test."""

    a: str
    b: str
    shared: int  # images both runs processed
    paired: int  # of those, labelled (with counts) in both: the differences are over these
    mean_difference: Optional[float]  # mean of b − a errors per image (None without paired images)
    fewer: int  # images where b makes fewer errors than a
    more: int  # ... more
    tied: int  # ... as many
    sign_p: float  # exact two-sided sign test on the fewer/more counts
    errors_a: int = 0  # a's errors over the paired images
    errors_b: int = 0
    missed_a: int = 0
    missed_b: int = 0
    false_positives_a: int = 0
    false_positives_b: int = 0
    objects_differ: int = 0  # paired images whose object count differs between the runs (other annotations)
    sign_p_holm: float = 1.0
    gains: List[ImageErrors] = field(default_factory=list)  # b's fewest errors against a first (most negative b − a)
    losses: List[ImageErrors] = field(default_factory=list)  # b's most errors against a first
    differences: List[int] = field(default_factory=list)  # b − a of every paired image, by path

    @property
    def winner(self) -> Optional[str]:
        """The run the sign test says makes fewer errors, or None when the difference could be chance."""
        if not self.paired or self.sign_p >= SIGNIFICANCE or self.fewer == self.more:
            return None
        return self.b if self.fewer > self.more else self.a

    def sentence(self) -> str:
        """The pair in words, as the page says it."""
        if not self.paired:
            return (f"No image is labelled in both {self.a} and {self.b} ({self.shared} shared images): nothing to "
                    f"compare image by image.")
        verdict = f"{self.winner} makes fewer errors" if self.winner else "no significant difference"
        return (f"{self.b} makes fewer errors (missed objects + false positives) than {self.a} on {self.fewer} of "
                f"{self.paired} images (more on {self.more}, as many on {self.tied}; {self.errors_b} against "
                f"{self.errors_a} errors in all); sign test {p_value_text(self.sign_p)}: {verdict}.")


def _usable(table: pd.DataFrame, paths: pd.Index) -> pd.Series:
    rows = table.loc[paths]
    return rows["labelled"] & rows["errors"].notna()


def error_pair(a: str, b: str, table_a: pd.DataFrame, table_b: pd.DataFrame,
               limit: int = LARGEST_DIFFERENCES) -> ErrorPair:
    """Pair two runs' images by path, keep those labelled in both and compare their errors."""
    shared = table_a.index.intersection(table_b.index).sort_values()
    paths = shared[(_usable(table_a, shared) & _usable(table_b, shared)).to_numpy()]
    rows_a, rows_b = table_a.loc[paths], table_b.loc[paths]
    images = [ImageErrors(path=str(p), objects=int(rows_a.at[p, "objects"]) if rows_a.at[p, "objects"] >= 0 else 0,
                          missed_a=int(rows_a.at[p, "missed"]), false_positives_a=int(rows_a.at[p, "false_positives"]),
                          missed_b=int(rows_b.at[p, "missed"]), false_positives_b=int(rows_b.at[p, "false_positives"]))
              for p in paths]  # `objects >= 0` is False for NaN (a labelled row without it)
    differences = [image.difference for image in images]
    fewer, more = sum(d < 0 for d in differences), sum(d > 0 for d in differences)
    objects_differ = int((rows_a["objects"].fillna(-1) != rows_b["objects"].fillna(-1)).sum())
    gains = sorted((i for i in images if i.difference < 0), key=lambda i: i.difference)  # stable: by path on ties
    losses = sorted((i for i in images if i.difference > 0), key=lambda i: -i.difference)
    return ErrorPair(a=a, b=b, shared=len(shared), paired=len(paths),
                     mean_difference=sum(differences) / len(differences) if differences else None,
                     fewer=fewer, more=more, tied=len(paths) - fewer - more, sign_p=sign_test(fewer, more),
                     errors_a=sum(i.errors_a for i in images), errors_b=sum(i.errors_b for i in images),
                     missed_a=sum(i.missed_a for i in images), missed_b=sum(i.missed_b for i in images),
                     false_positives_a=sum(i.false_positives_a for i in images),
                     false_positives_b=sum(i.false_positives_b for i in images), objects_differ=objects_differ,
                     gains=gains[:limit], losses=losses[:limit], differences=differences)


def error_pairs(tables: Mapping[str, pd.DataFrame], limit: int = LARGEST_DIFFERENCES) -> List[ErrorPair]:
    """Every unordered pair in run order (b − a, a the earlier run), with Holm-adjusted p-values over all of them."""
    out = [error_pair(a, b, tables[a], tables[b], limit) for a, b in itertools.combinations(list(tables), 2)]
    for pair, adjusted in zip(out, holm_adjusted([p.sign_p for p in out])):
        pair.sign_p_holm = adjusted
    return out


def image_rows(tables: Mapping[str, pd.DataFrame], shared: pd.Index) -> pd.DataFrame:
    """comparison.csv: one row per image every run processed (`shared`): path, then each run's counts and errors
    (empty where the run has none: unlabelled images)."""
    rows = pd.DataFrame({"path": shared})
    for run, table in tables.items():
        for column in (*COUNTS, "errors"):
            rows[f"{run}: {column}"] = pd.array(table.loc[shared, column].to_numpy(), dtype="Float64").astype("Int64")
    return rows
