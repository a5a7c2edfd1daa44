"""The numbers of a comparison of finished runs over one image folder, read from their `results/` folders.

Each run's `predictions.csv` becomes a pandas table indexed by image path; the runs are joined on the images every
run processed (the intersection: runs over different image sets are compared on what they share, and the page says
how many each had). On that join: accuracy with Wilson intervals, per-class accuracy, and for every unordered pair
the agreement, the 2×2 table on labelled images and the exact McNemar test. Per-layer activation statistics come
from `activation_stats.csv`; the weight change of checkpoints of one architecture is computed from the weights
themselves (`relative_weight_change`), since `weights.csv` holds per-tensor statistics, not the tensors.

Runs are compared only with runs of the same task: segmentation runs get their own comparison
(`SegmentationComparison`, numbers from reportgen/report/compare_segmentation.py), so do detection runs
(`DetectionComparison`, numbers from reportgen/report/compare_detection.py); backbone runs are refused with the
reason.
"""
from __future__ import annotations

import itertools
import json
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from reportgen.errors import RunError
from reportgen.inputs.labels import normalise_class_name
from reportgen.report.compare_detection import IMAGES_FILE as DETECTION_IMAGES_FILE
from reportgen.report.compare_detection import METRICS_FILE as DETECTION_METRICS_FILE
from reportgen.report.compare_detection import ClassAP, ErrorPair, class_ap, error_pairs, read_detection_images
from reportgen.report.compare_segmentation import (IMAGES_FILE, TOTALS_FILE, ClassIoU, ImagePair, class_iou,
                                                   image_pairs, read_segmentation_images, shared_images)
from reportgen.report.compare_stats import holm_adjusted, mcnemar_exact, p_value_text, wilson_interval

DEFAULT_DEAD_ZERO_FRACTION = 0.99  # the activations analysis's default, for runs whose config lacks it


@dataclass
class RunResults:
    """One finished run, as the comparison reads it."""

    run_dir: Path
    manifest: Dict[str, Any]
    predictions: Optional[pd.DataFrame]  # indexed by path: label, top1_index, top1_name, top1_prob, right, topk_right
    totals: Dict[str, Any]  # results/predictions.json
    summary: Dict[str, Any]  # results/summary.json
    name: str = ""  # set once all runs are known: what tells it apart from the others
    segmentation: Dict[str, Any] = field(default_factory=dict)  # results/segmentation.json (segmentation runs)
    segmentation_images: Optional[pd.DataFrame] = None  # results/segmentation_images.csv, indexed by path
    detection: Dict[str, Any] = field(default_factory=dict)  # results/detection_metrics.json (detection runs)
    detection_images: Optional[pd.DataFrame] = None  # results/detection_images.csv, indexed by path

    @property
    def config(self) -> Dict[str, Any]:
        return self.manifest.get("config", {})

    @property
    def task(self) -> str:
        """What the model does, as its manifest says ("classification" for runs older than tasks)."""
        return str((self.manifest.get("model") or {}).get("task") or "classification")

    @property
    def top_k(self) -> int:
        return int(self.totals.get("top_k") or 0)


@dataclass
class NotCompared:
    """A run folder that was asked for but has no finished results (a failed job, one still running)."""

    run_dir: Path
    status: str
    reason: str
    command: str = ""  # the command line that made it, where its manifest says


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise RunError(f"{path} is not valid JSON ({exc}); rerun that run or leave it out of the comparison") from exc


def read_predictions(path: Path, matched_classes: Sequence[str]) -> pd.DataFrame:
    """A run's predictions.csv, indexed by path, with `right` / `topk_right` for images whose folder class the run
    matched to a model class (NaN for the others: no label, or a folder class the model does not have).

    The folder class is matched to the model's output index as the predictions analysis does (normalised names,
    the first output of a name wins); the output index of a name is read from the top-k columns of the file."""
    table = pd.read_csv(path, dtype={"path": str, "label": str, "top1_name": str, "topk_indices": str,
                                     "topk_names": str}, keep_default_na=False)
    table = table.set_index("path")
    index_of: Dict[str, int] = {}
    for indices, names in zip(table["topk_indices"], table["topk_names"]):
        for index, name in zip(indices.split(), names.split("|")):
            key = normalise_class_name(name)
            index_of[key] = min(int(index), index_of.get(key, int(index)))
    matched = {normalise_class_name(c) for c in matched_classes}
    target = table["label"].map(lambda c: index_of.get(normalise_class_name(c), -1)
                                if c and normalise_class_name(c) in matched else -2)  # -2: not evaluated
    evaluated = target != -2
    right = (table["top1_index"] == target).astype(float).where(evaluated)
    topk = [str(t) in indices.split() for t, indices in zip(target, table["topk_indices"])]
    table["right"] = right
    table["topk_right"] = pd.Series(topk, index=table.index, dtype=float).where(evaluated)
    table["top1_key"] = table["top1_name"].map(normalise_class_name)
    return table


def load_run(run_dir: Path) -> RunResults:
    """A finished run folder (`results/manifest.json` with status ok). RunError says what is missing otherwise."""
    results = Path(run_dir) / "results"
    manifest = _read_json(results / "manifest.json")
    if not manifest:
        raise RunError(f"{run_dir} has no results/manifest.json: not a finished reportgen run folder")
    if manifest.get("status") != "ok":
        raise RunError(f"{run_dir}: status {manifest.get('status')!r}, not a finished run "
                       f"({manifest.get('error', 'see its run.log')})")
    summary = _read_json(results / "summary.json")
    task = (manifest.get("model") or {}).get("task")
    if task == "segmentation":
        images = results / IMAGES_FILE
        return RunResults(run_dir=Path(run_dir), manifest=manifest, predictions=None, totals={}, summary=summary,
                          segmentation=_read_json(results / TOTALS_FILE),
                          segmentation_images=read_segmentation_images(images) if images.is_file() else None)
    if task == "detection":
        images = results / DETECTION_IMAGES_FILE
        return RunResults(run_dir=Path(run_dir), manifest=manifest, predictions=None, totals={}, summary=summary,
                          detection=_read_json(results / DETECTION_METRICS_FILE),
                          detection_images=read_detection_images(images) if images.is_file() else None)
    totals = _read_json(results / "predictions.json")
    csv_path = results / "predictions.csv"
    predictions = read_predictions(csv_path, list(totals.get("per_class_accuracy") or {})) if csv_path.is_file() \
        else None
    return RunResults(run_dir=Path(run_dir), manifest=manifest, predictions=predictions, totals=totals,
                      summary=summary)


# ---------------------------------------------------------------------------------------------------- what differs

def flatten_config(config: Mapping[str, Any], prefix: str = "") -> Dict[str, str]:
    """{'model.preprocess.crop': '64', ...}: every leaf as text (lists as JSON), for comparing configs key by key."""
    flat: Dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, name + "."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value)
    return flat


def config_differences(runs: Sequence[RunResults]) -> Tuple[List[str], Dict[str, str]]:
    """(keys whose value differs between runs, in config order; {key: value} of what they all share).
    A key missing from a run (an analysis it did not run) counts as differing."""
    flats = [flatten_config(r.config) for r in runs]
    keys = list(dict.fromkeys(k for flat in flats for k in flat))
    differing = [k for k in keys if len({flat.get(k, "—") for flat in flats}) > 1]
    shared = {k: flats[0][k] for k in keys if k not in differing}
    return differing, shared


def _command_overrides(run: RunResults) -> List[str]:
    command = str(run.manifest.get("command", ""))
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    return [w for w in words if "=" in w]


def _short_override(word: str) -> str:
    """'+model.target.path=/ckpt/ep10.pt' -> 'model.target.path=ep10.pt' (a file's name says which checkpoint);
    '_target_=pkg.models.demo_cnn' -> 'target=demo_cnn' (the callable's name says which model)."""
    key, _, value = word.lstrip("+~").partition("=")
    if key.endswith("_target_"):
        key, value = key[: -len("_target_")] + "target", value.rsplit(".", 1)[-1]
    return f"{key}={Path(value).name}" if "/" in value else f"{key}={value}"


def name_runs(runs: Sequence[RunResults], differing_keys: Sequence[str]) -> None:
    """Give every run a short distinct name: the command-line overrides that only some runs have
    (`model=demo_cnn`), else the differing config values, else the run folder's name."""
    overrides = [_command_overrides(r) for r in runs]
    common = set.intersection(*(set(o) for o in overrides)) if overrides else set()
    names = [" ".join(_short_override(o) for o in words if o not in common) for words in overrides]
    if len(set(names)) < len(runs) or not all(names):
        flats = [flatten_config(r.config) for r in runs]
        names = [" ".join(_short_override(f"{k.split('.')[-1]}={flat.get(k, '—')}") for k in differing_keys[:3])
                 for flat in flats]
    if len(set(names)) < len(runs) or not all(names):
        names = [f"{n} ({r.run_dir.name})".strip() for n, r in zip(names, runs)]
    if len(set(names)) < len(runs):
        names = [f"{n} #{i + 1}" for i, n in enumerate(names)]
    for run, name in zip(runs, names):
        run.name = name


# ---------------------------------------------------------------------------------------------------- the join

@dataclass
class Joined:
    """The runs' per-image predictions on the images they all processed, one column per run (run names)."""

    paths: pd.Index  # the shared images, sorted
    label: pd.Series  # folder class ("" without)
    evaluated: pd.Series  # bool: labelled, and the label matched a class of every run's model
    top1: pd.DataFrame  # predicted class name per run
    top1_key: pd.DataFrame  # normalised predicted name (what "same top-1" compares)
    prob: pd.DataFrame  # top-1 probability
    right: pd.DataFrame  # 1.0 / 0.0 on evaluated images, NaN elsewhere
    topk_right: pd.DataFrame
    images_per_run: Dict[str, int]  # how many images each run processed
    labels_conflict: int = 0  # shared images whose folder class differs between runs (different folders)


def join_predictions(runs: Sequence[RunResults]) -> Joined:
    """Inner join of the runs' predictions on the image path."""
    tables = {r.name: r.predictions for r in runs if r.predictions is not None}
    if len(tables) < len(runs):
        missing = [r.name for r in runs if r.predictions is None]
        tasks = {r.name: r.task for r in runs}
        others = {name: tasks[name] for name in missing if tasks[name] != "classification"}
        if others:
            raise RunError("runs of models that are not classifiers have no predictions to compare image by image: "
                           + ", ".join(f"{name} ({task})" for name, task in others.items())
                           + "; comparing backbones' k-NN evaluations is not built yet (each run's results/knn.json "
                             "holds its accuracy)")
        raise RunError(f"runs without results/predictions.csv cannot be compared image by image: {missing} "
                       f"(run them with the predictions analysis)")
    shared = None
    for table in tables.values():
        shared = table.index if shared is None else shared.intersection(table.index)
    shared = shared.sort_values()
    if shared.empty:
        raise RunError("the runs share no image (matched by path inside the folder): "
                       + ", ".join(f"{run}: {len(table)} images" for run, table in tables.items())
                       + "; compare runs over the same folder")

    def column(name: str) -> pd.DataFrame:
        return pd.DataFrame({run: table.loc[shared, name] for run, table in tables.items()}, index=shared)

    labels = column("label")
    right = column("right")
    return Joined(paths=shared, label=labels.iloc[:, 0], evaluated=right.notna().all(axis=1),
                  top1=column("top1_name"), top1_key=column("top1_key"), prob=column("top1_prob"),
                  right=right, topk_right=column("topk_right"),
                  images_per_run={run: len(table) for run, table in tables.items()},
                  labels_conflict=int((labels.nunique(axis=1) > 1).sum()))


# ---------------------------------------------------------------------------------------------------- statistics

@dataclass
class Accuracy:
    run: str
    evaluated: int
    top1: Optional[float]
    top1_ci: Tuple[float, float]
    topk: Optional[float]
    topk_ci: Tuple[float, float]


def accuracy(joined: Joined, run: str) -> Accuracy:
    """Top-1 and top-k accuracy of one run on the shared evaluated images, with 95 % Wilson intervals."""
    mask = joined.evaluated
    n = int(mask.sum())
    top1 = int(joined.right.loc[mask, run].sum())
    topk = int(joined.topk_right.loc[mask, run].sum())
    return Accuracy(run=run, evaluated=n, top1=top1 / n if n else None, top1_ci=wilson_interval(top1, n),
                    topk=topk / n if n else None, topk_ci=wilson_interval(topk, n))


@dataclass
class Pair:
    """Two runs on the shared images: `a_only` = labelled images only `a` gets right."""

    a: str
    b: str
    images: int  # shared images (agreement is over these)
    agreement: float  # fraction with the same top-1 class
    evaluated: int  # labelled shared images (the 2×2 table is over these)
    both_right: int
    a_only: int
    b_only: int
    both_wrong: int
    mcnemar_p: float
    mcnemar_p_holm: float = 1.0

    def sentence(self) -> str:
        """The pair in words, as the page says it."""
        if not self.evaluated:
            return (f"{self.a} and {self.b} give the same top-1 class on {self.agreement:.1%} of "
                    f"{self.images} images; no image has a label both can be scored on.")
        verdict = ("unlikely to be chance" if self.mcnemar_p < 0.05 else "could well be chance")
        return (f"{self.a} is right on {self.a_only} images where {self.b} is wrong, {self.b} on {self.b_only} "
                f"where {self.a} is wrong; {p_value_text(self.mcnemar_p)} (exact McNemar): the difference is "
                f"{verdict}.")


def pairs(joined: Joined, names: Sequence[str]) -> List[Pair]:
    """Every unordered pair in run order, with Holm-adjusted p-values over all of them."""
    out = []
    mask = joined.evaluated
    for a, b in itertools.combinations(names, 2):
        ra, rb = joined.right.loc[mask, a] == 1, joined.right.loc[mask, b] == 1
        a_only, b_only = int((ra & ~rb).sum()), int((~ra & rb).sum())
        same = joined.top1_key[a] == joined.top1_key[b]
        out.append(Pair(a=a, b=b, images=len(joined.paths),
                        agreement=float(same.mean()) if len(same) else float("nan"),
                        evaluated=int(mask.sum()), both_right=int((ra & rb).sum()), a_only=a_only, b_only=b_only,
                        both_wrong=int((~ra & ~rb).sum()), mcnemar_p=mcnemar_exact(a_only, b_only)))
    for pair, adjusted in zip(out, holm_adjusted([p.mcnemar_p for p in out])):
        pair.mcnemar_p_holm = adjusted
    return out


def per_class(joined: Joined) -> pd.DataFrame:
    """Classes × runs top-1 accuracy on the shared evaluated images, plus `images` and `spread` (max − min),
    sorted by spread (the classes where the runs differ most first)."""
    mask = joined.evaluated
    right = joined.right.loc[mask]
    table = right.groupby(joined.label.loc[mask]).mean()
    table.insert(0, "images", right.groupby(joined.label.loc[mask]).size())
    runs = list(joined.right.columns)
    table["spread"] = table[runs].max(axis=1) - table[runs].min(axis=1)
    table.index.name = "class"
    return table.sort_values(["spread", "images"], ascending=[False, False], kind="stable")


def disagreements(joined: Joined, limit: int) -> List[str]:
    """Shared images whose top-1 class differs between runs, most telling first: labelled ones where some run is
    right and another wrong (the more confident the wrong run, the earlier), then labelled ones all runs get wrong,
    then unlabelled ones by how confident the most confident run is."""
    differ = joined.top1_key.nunique(axis=1) > 1
    if not differ.any():
        return []
    right = joined.right[differ]
    prob = joined.prob[differ]
    evaluated = joined.evaluated[differ]
    some_right = (right == 1).any(axis=1) & evaluated
    wrong_confidence = prob.where(right == 0).max(axis=1).fillna(0.0)
    group = np.where(some_right, 0, np.where(evaluated, 1, 2))
    score = np.where(group == 2, prob.max(axis=1), wrong_confidence)
    order = pd.DataFrame({"group": group, "score": -score}, index=right.index).sort_values(
        ["group", "score"], kind="stable")
    return list(order.index[:limit])


def comparison_rows(joined: Joined) -> pd.DataFrame:
    """comparison.csv: one row per shared image: path, label, then each run's top-1 and whether it is right."""
    table = pd.DataFrame({"path": joined.paths, "label": joined.label.values})
    for run in joined.top1.columns:
        table[f"{run}: top1"] = joined.top1[run].values
        right = joined.right[run]
        table[f"{run}: right"] = right.map(lambda v: "" if math.isnan(v) else str(bool(v)).lower()).values
    return table


# ---------------------------------------------------------------------------------------------------- layers

def activation_layers(stats_csv: Path, dead_zero_fraction: float = DEFAULT_DEAD_ZERO_FRACTION) -> pd.DataFrame:
    """Per analysed layer, in the file's (depth) order: channels, the fraction of dead channels (zero in at least
    `dead_zero_fraction` of their positions) and the activation scale (root mean square of all the layer's values,
    combined exactly from the channels' counts, means and standard deviations)."""
    stats = pd.read_csv(stats_csv)
    stats["square"] = stats["count"] * (stats["std"] ** 2 + stats["mean"] ** 2)
    grouped = stats.groupby("layer", sort=False)
    return pd.DataFrame({
        "channels": grouped.size(),
        "dead_fraction": grouped["frac_zero"].apply(lambda v: float((v >= dead_zero_fraction).mean())),
        "rms": np.sqrt(grouped["square"].sum() / grouped["count"].sum()),
    })


def relative_weight_change(before: Mapping[str, Any], after: Mapping[str, Any]) -> List[Tuple[str, float, float]]:
    """(parameter name, ‖W_b − W_a‖ / ‖W_a‖, ‖W_a‖) for every tensor the two state dicts share with one shape, in
    `before`'s order; computed in float64. A tensor whose norm is 0 gets inf (or 0 when unchanged)."""
    rows = []
    for name, a in before.items():
        b = after.get(name)
        a = np.asarray(a, dtype=np.float64)
        if b is None or np.shape(b) != a.shape:
            continue
        delta = float(np.linalg.norm((np.asarray(b, dtype=np.float64) - a).ravel()))
        norm = float(np.linalg.norm(a.ravel()))
        rows.append((name, delta / norm if norm else (0.0 if delta == 0 else float("inf")), norm))
    return rows


@dataclass
class WeightChange:
    """Per-tensor relative change between two checkpoints of one architecture (or why it is not there)."""

    a: str
    b: str
    rows: List[Tuple[str, float, float]] = field(default_factory=list)
    note: str = ""


@dataclass
class Comparison:
    """Everything the comparison page and its results files show."""

    runs: List[RunResults]  # compared, named, in the order given
    not_compared: List[NotCompared]
    differing: List[str]  # config keys that differ between runs
    shared_config: Dict[str, str]  # what every run has in common, once
    joined: Joined
    accuracies: List[Accuracy]
    pairs: List[Pair]
    per_class: pd.DataFrame
    disagreements: List[str]  # image paths, most telling first (bounded)
    disagreeing: int  # how many shared images have differing top-1 classes in all
    weight_changes: List[WeightChange] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)  # warnings for the page (e.g. a recount that disagrees)


def recount_notes(runs: Sequence[RunResults]) -> List[str]:
    """A warning for every run whose top-1 accuracy recounted from its predictions.csv (all its images) is not the
    one its predictions.json reports: the page's numbers then rest on a label matching the run did not use."""
    notes = []
    for run in runs:
        reported = run.totals.get("top1_accuracy")
        right = run.predictions["right"].dropna() if run.predictions is not None else pd.Series(dtype=float)
        if reported is None or right.empty:
            continue
        if abs(float(right.mean()) - float(reported)) > 1e-9:
            notes.append(f"{run.name}: its predictions.csv recounts to top-1 {right.mean():.4%}, its "
                         f"predictions.json says {reported:.4%} (class names the model repeats?); the page uses "
                         f"the recount")
    return notes


# ---------------------------------------------------------------------------------------------------- segmentation

NO_SHARED_IMAGE = ("the runs share no image (matched by path inside the folder): there is nothing to compare image by "
                   "image; compare runs over the same folder")  # a note of the task pages


@dataclass
class SegmentationComparison:
    """Everything the comparison page and its results files show for segmentation runs."""

    runs: List[RunResults]  # compared, named, in the order given
    not_compared: List[NotCompared]
    differing: List[str]  # config keys that differ between runs
    shared_config: Dict[str, str]  # what every run has in common, once
    images: Dict[str, pd.DataFrame]  # run name -> its segmentation_images.csv
    shared: pd.Index  # the images every run processed
    classes: ClassIoU
    pairs: List[ImagePair]
    weight_changes: List[WeightChange] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


OWN_COMPARISON = ("segmentation", "detection")  # tasks with a comparison of their own: compared only among themselves


def check_one_task(runs: Sequence[RunResults]) -> str:
    """The task every run shares. Mixing segmentation or detection runs with runs of another task is a RunError
    naming each run's task; other mixes are left to the classifier comparison, which refuses backbones with its
    reason."""
    tasks = [r.task for r in runs]
    own = [task for task in dict.fromkeys(tasks) if task in OWN_COMPARISON]
    if own and len(set(tasks)) > 1:
        raise RunError("runs of different tasks cannot be compared: "
                       + ", ".join(f"{r.name} is {task} ({r.run_dir})" for r, task in zip(runs, tasks))
                       + "; " + ", ".join(f"compare {task} runs only with {task} runs" for task in own))
    return tasks[0]


def segmentation_notes(runs: Sequence[RunResults], shared: pd.Index) -> List[str]:
    """Warnings for the page: runs without masks, different ignore indices, no shared image (class lists that
    differ are said in the per-class section, `ClassIoU.notes`)."""
    notes = []
    for run in runs:
        if not run.segmentation.get("labelled_images"):
            notes.append(f"{run.name} had no masks (0 labelled images): it has no mIoU or accuracy to compare")
    ignore = {r.name: r.segmentation.get("ignore_index") for r in runs}
    if len(set(ignore.values())) > 1:
        notes.append("the runs ignore different mask values ("
                     + ", ".join(f"{n}: {v}" for n, v in ignore.items()) + "): their metrics count other pixels")
    if shared.empty:
        notes.append(NO_SHARED_IMAGE)
    return notes


def compare_segmentation(runs: List[RunResults], not_compared: Sequence[NotCompared], differing: List[str],
                         shared_config: Dict[str, str]) -> SegmentationComparison:
    """Per-class IoU side by side and the per-image paired tests of named segmentation runs."""
    lacking = [f"{r.name} ({r.run_dir})" for r in runs if not r.segmentation or r.segmentation_images is None]
    if lacking:
        raise RunError(f"segmentation runs need results/{TOTALS_FILE} and results/{IMAGES_FILE}; missing in "
                       f"{', '.join(lacking)} (the segmentation analysis writes them; rerun those runs)")
    names = [r.name for r in runs]
    tables = {r.name: r.segmentation_images for r in runs}
    classes = class_iou(names, [r.segmentation for r in runs])
    shared = shared_images(tables)
    return SegmentationComparison(runs=list(runs), not_compared=list(not_compared), differing=differing,
                                  shared_config=shared_config, images=tables, shared=shared, classes=classes,
                                  pairs=image_pairs(tables), notes=segmentation_notes(runs, shared))


# ---------------------------------------------------------------------------------------------------- detection

@dataclass
class DetectionComparison:
    """Everything the comparison page and its results files show for object detection runs."""

    runs: List[RunResults]  # compared, named, in the order given
    not_compared: List[NotCompared]
    differing: List[str]  # config keys that differ between runs
    shared_config: Dict[str, str]  # what every run has in common, once
    images: Dict[str, pd.DataFrame]  # run name -> its detection_images.csv
    shared: pd.Index  # the images every run processed
    classes: ClassAP
    pairs: List[ErrorPair]
    weight_changes: List[WeightChange] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def detection_notes(runs: Sequence[RunResults], shared: pd.Index) -> List[str]:
    """Warnings for the page: runs without annotations, different drawing score thresholds (the per-image errors are
    counted at each run's own), no shared image (class lists that differ are said in the per-class section)."""
    notes = []
    for run in runs:
        if not run.detection.get("labelled_images"):
            notes.append(f"{run.name} had no annotations (0 labelled images): it has no mAP or per-image errors to "
                         f"compare")
    thresholds = {r.name: r.detection.get("score_threshold") for r in runs}
    if len(set(thresholds.values())) > 1:
        notes.append("the runs count per-image errors at different score thresholds ("
                     + ", ".join(f"{n}: {v}" for n, v in thresholds.items())
                     + "): a lower threshold keeps more detections (fewer missed objects, more false positives), so "
                       "the per-image comparison weighs the models and the thresholds together; mAP does not depend "
                       "on the threshold")
    if shared.empty:
        notes.append(NO_SHARED_IMAGE)
    return notes


def compare_detection(runs: List[RunResults], not_compared: Sequence[NotCompared], differing: List[str],
                      shared_config: Dict[str, str]) -> DetectionComparison:
    """Per-class AP side by side and the per-image paired tests of named detection runs."""
    lacking = [f"{r.name} ({r.run_dir})" for r in runs if not r.detection or r.detection_images is None]
    if lacking:
        raise RunError(f"detection runs need results/{DETECTION_METRICS_FILE} and results/{DETECTION_IMAGES_FILE}; "
                       f"missing in {', '.join(lacking)} (the detection analysis writes them; rerun those runs)")
    names = [r.name for r in runs]
    tables = {r.name: r.detection_images for r in runs}
    shared = shared_images(tables)
    return DetectionComparison(runs=list(runs), not_compared=list(not_compared), differing=differing,
                               shared_config=shared_config, images=tables, shared=shared,
                               classes=class_ap(names, [r.detection for r in runs]), pairs=error_pairs(tables),
                               notes=detection_notes(runs, shared))


def compare(runs: List[RunResults], not_compared: Sequence[NotCompared] = (),
            gallery_size: int = 24) -> Comparison | SegmentationComparison | DetectionComparison:
    """Name the runs, check they share a task and compute every table of the page: a SegmentationComparison for
    segmentation runs, a DetectionComparison for detection runs, a Comparison (joined on the shared images) for
    classifiers."""
    if len(runs) < 2:
        raise RunError(f"a comparison needs at least two finished runs, got {len(runs)}"
                       + "".join(f"; {n.run_dir}: {n.reason}" for n in not_compared))
    differing, shared = config_differences(runs)
    name_runs(runs, differing)
    task = check_one_task(runs)
    if task == "segmentation":
        return compare_segmentation(runs, not_compared, differing, shared)
    if task == "detection":
        return compare_detection(runs, not_compared, differing, shared)
    joined = join_predictions(runs)
    names = [r.name for r in runs]
    return Comparison(runs=list(runs), not_compared=list(not_compared), differing=differing, shared_config=shared,
                      joined=joined, accuracies=[accuracy(joined, n) for n in names], pairs=pairs(joined, names),
                      per_class=per_class(joined), disagreements=disagreements(joined, gallery_size),
                      disagreeing=int((joined.top1_key.nunique(axis=1) > 1).sum()), notes=recount_notes(runs))
