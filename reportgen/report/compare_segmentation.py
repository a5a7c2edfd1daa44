"""The numbers of a comparison of semantic segmentation runs, from each run's `results/segmentation.json` (the
folder's metrics and per-class IoU) and `results/segmentation_images.csv` (one row per image).

Per class: every run's IoU side by side, classes matched by name; runs with different class lists are compared on
the classes all of them have, and the others are named. Per image: for every pair of runs, the IoU difference b − a
on the images labelled in both, and the exact two-sided sign test on the nonzero differences. Plain inputs (names,
dicts, tables), so every number can be checked without run folders.
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

TOTALS_FILE = "segmentation.json"  # under results/
IMAGES_FILE = "segmentation_images.csv"  # under results/
METRICS = (("miou", "mIoU"), ("pixel_accuracy", "pixel accuracy"), ("mean_accuracy", "mean accuracy"),
           ("fw_iou", "fw IoU"))  # segmentation.json key, the page's name
SIGNIFICANCE = 0.05  # a sign-test p below this says which run is better
LARGEST_DIFFERENCES = 5  # images listed each way per pair


def read_segmentation_images(path: Path) -> pd.DataFrame:
    """A run's segmentation_images.csv indexed by path: `iou`, `pixel_accuracy` (NaN where empty: unlabelled
    images) and `labelled` (bool)."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = sorted({"path", "iou", "pixel_accuracy", "labelled"} - set(table.columns))
    if missing:
        raise RunError(f"{path} lacks the column(s) {missing}: not a segmentation_images.csv this version reads")
    if table["path"].duplicated().any():
        raise RunError(f"{path} lists {table['path'][table['path'].duplicated()].iloc[0]!r} twice")

    def number(text: str) -> float:
        return float(text) if text.strip() else math.nan

    try:
        iou = table["iou"].map(number).to_numpy(dtype=float)
        accuracy = table["pixel_accuracy"].map(number).to_numpy(dtype=float)
    except ValueError as exc:
        raise RunError(f"{path}: a number column holds text ({exc}); rerun that run") from exc
    return pd.DataFrame({"iou": iou, "pixel_accuracy": accuracy,
                         "labelled": (table["labelled"].str.strip() == "1").to_numpy()},
                        index=pd.Index(table["path"], name="path"))


# ---------------------------------------------------------------------------------------------------- per class

@dataclass
class ClassIoU:
    """Per-class IoU of every run on the classes all runs have, matched by normalised name, in the first run's order."""

    table: pd.DataFrame  # index: class (the first run's name); `pixels` (first run's labelled pixels), one column
    #                      per run (NaN: the class is in neither mask nor prediction), `spread` (max − min)
    missing: Dict[str, List[str]] = field(default_factory=dict)  # run -> classes another run has and it lacks

    def notes(self) -> List[str]:
        """The class-list mismatch in words, one line per run that lacks classes."""
        return [f"{run} has no class {', '.join(classes)} (another run has); the per-class comparison is over the "
                f"{len(self.table)} classes every run has" for run, classes in self.missing.items()]


def _classes_of(name: str, totals: Mapping) -> Dict[str, Tuple[str, Mapping]]:
    """{normalised name: (name, per-class row)}; the first class of a repeated name wins."""
    names, rows = list(totals.get("class_names") or []), list(totals.get("per_class") or [])
    if len(names) != len(rows):
        raise RunError(f"{name}: its {TOTALS_FILE} has {len(names)} class names but {len(rows)} per-class rows; "
                       f"rerun that run")
    by_key: Dict[str, Tuple[str, Mapping]] = {}
    for cls, row in zip(names, rows):
        by_key.setdefault(normalise_class_name(cls), (str(cls), row))
    return by_key


def class_iou(names: Sequence[str], totals: Sequence[Mapping]) -> ClassIoU:
    """Classes × runs IoU from each run's segmentation.json (`names[i]` is the run of `totals[i]`)."""
    runs = [_classes_of(n, t) for n, t in zip(names, totals)]
    shared = [key for key in runs[0] if all(key in r for r in runs[1:])]
    every = list(dict.fromkeys(key for r in runs for key in r))
    shown = {key: next(r[key][0] for r in runs if key in r) for key in every}
    missing = {n: [shown[k] for k in every if k not in r] for n, r in zip(names, runs)}

    def iou(value) -> float:
        return math.nan if value is None else float(value)

    table = pd.DataFrame({"pixels": [int(runs[0][k][1].get("pixels") or 0) for k in shared]},
                         index=pd.Index([runs[0][k][0] for k in shared], name="class"))
    for n, r in zip(names, runs):
        table[n] = [iou(r[k][1].get("iou")) for k in shared]
    values = table[list(names)]
    table["spread"] = values.max(axis=1, skipna=False) - values.min(axis=1, skipna=False)
    return ClassIoU(table=table, missing={n: m for n, m in missing.items() if m})


# ---------------------------------------------------------------------------------------------------- per image

@dataclass
class ImagePair:
    """Runs `a` and `b` on the images labelled in both: the per-image IoU difference b − a and its sign test."""

    a: str
    b: str
    shared: int  # images both runs processed
    paired: int  # of those, labelled (with an IoU) in both: the differences are over these
    mean_difference: Optional[float]  # mean of b − a (None without paired images)
    better: int  # images where b's IoU is higher
    worse: int  # ... lower
    tied: int  # ... equal
    sign_p: float  # exact two-sided sign test on the better/worse counts
    sign_p_holm: float = 1.0
    gains: List[Tuple[str, float, float]] = field(default_factory=list)  # (path, IoU a, IoU b), largest b − a first
    losses: List[Tuple[str, float, float]] = field(default_factory=list)  # most negative b − a first
    points: List[Tuple[str, float, float]] = field(default_factory=list)  # every paired image, by path

    @property
    def winner(self) -> Optional[str]:
        """The run the sign test says is better, or None when the difference could be chance."""
        if not self.paired or self.sign_p >= SIGNIFICANCE or self.better == self.worse:
            return None
        return self.b if self.better > self.worse else self.a

    def sentence(self) -> str:
        """The pair in words, as the page says it."""
        if not self.paired:
            return (f"No image is labelled in both {self.a} and {self.b} ({self.shared} shared images): nothing to "
                    f"compare image by image.")
        verdict = f"{self.winner} is better" if self.winner else "no significant difference"
        return (f"{self.b} has a higher per-image IoU than {self.a} on {self.better} of {self.paired} images "
                f"(lower on {self.worse}, equal on {self.tied}); sign test {p_value_text(self.sign_p)}: {verdict}.")


def _usable(table: pd.DataFrame, paths: pd.Index) -> pd.Series:
    rows = table.loc[paths]
    return rows["labelled"] & rows["iou"].notna()


def image_pair(a: str, b: str, table_a: pd.DataFrame, table_b: pd.DataFrame,
               limit: int = LARGEST_DIFFERENCES) -> ImagePair:
    """Pair two runs' images by path, keep those labelled in both and compare their IoUs."""
    shared = table_a.index.intersection(table_b.index).sort_values()
    paths = shared[(_usable(table_a, shared) & _usable(table_b, shared)).to_numpy()]
    iou_a, iou_b = table_a.loc[paths, "iou"], table_b.loc[paths, "iou"]
    difference = iou_b - iou_a
    better, worse = int((difference > 0).sum()), int((difference < 0).sum())

    def listed(order: pd.Series) -> List[Tuple[str, float, float]]:
        return [(str(p), float(iou_a[p]), float(iou_b[p])) for p in order.index[:limit]]

    return ImagePair(a=a, b=b, shared=len(shared), paired=len(paths),
                     mean_difference=float(difference.mean()) if len(paths) else None, better=better, worse=worse,
                     tied=len(paths) - better - worse, sign_p=sign_test(better, worse),
                     gains=listed(difference[difference > 0].sort_values(ascending=False, kind="stable")),
                     losses=listed(difference[difference < 0].sort_values(kind="stable")),
                     points=[(str(p), float(x), float(y)) for p, x, y in zip(paths, iou_a, iou_b)])


def image_pairs(tables: Mapping[str, pd.DataFrame], limit: int = LARGEST_DIFFERENCES) -> List[ImagePair]:
    """Every unordered pair in run order (b − a, a the earlier run), with Holm-adjusted p-values over all of them."""
    out = [image_pair(a, b, tables[a], tables[b], limit) for a, b in itertools.combinations(list(tables), 2)]
    for pair, adjusted in zip(out, holm_adjusted([p.sign_p for p in out])):
        pair.sign_p_holm = adjusted
    return out


def shared_images(tables: Mapping[str, pd.DataFrame]) -> pd.Index:
    """The images every run processed, sorted."""
    shared = None
    for table in tables.values():
        shared = table.index if shared is None else shared.intersection(table.index)
    return shared.sort_values() if shared is not None else pd.Index([], name="path")


def image_rows(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """comparison.csv: one row per image every run processed: path, then each run's IoU and pixel accuracy (empty
    on images it has no mask for)."""
    paths = shared_images(tables)
    rows = pd.DataFrame({"path": paths})
    for run, table in tables.items():
        labelled = table.loc[paths, "labelled"].to_numpy()
        rows[f"{run}: iou"] = table.loc[paths, "iou"].where(labelled).to_numpy()
        rows[f"{run}: pixel_accuracy"] = table.loc[paths, "pixel_accuracy"].where(labelled).to_numpy()
    return rows
