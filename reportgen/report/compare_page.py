"""The comparison page and its results files, from a computed Comparison (reportgen/report/compare_data.py).

Writes into one folder: `index.html` + `assets/` (the page, static and offline like a report), `comparison.json`
(runs and pairs), `comparison.csv` (one row per shared image) and `per_class.csv` (classes × runs). Segmentation
runs (a SegmentationComparison) get the same files with IoU in place of accuracy, and the page's segmentation
sections; detection runs (a DetectionComparison) get them with AP and per-image errors (missed objects + false
positives), and the page's detection sections.
"""
from __future__ import annotations

import datetime as dt
import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from omegaconf import OmegaConf

from reportgen.inputs.data import decode_image
from reportgen.inputs.preprocess import Preprocess
from reportgen.report import compare_plots
from reportgen.report import compare_detection
from reportgen.report.compare_data import (DEFAULT_DEAD_ZERO_FRACTION, Comparison, DetectionComparison, RunResults,
                                           SegmentationComparison, activation_layers, comparison_rows,
                                           flatten_config)
from reportgen.report.compare_detection import ErrorPair, ImageErrors
from reportgen.report.compare_segmentation import METRICS, ImagePair, image_rows
from reportgen.report.compare_stats import pareto_front
from reportgen.report.elements import GalleryItem, ImageStrip, Table
from reportgen.report.overlays import heat_on_thumbnail
from reportgen.report.plots import grouped_bars
from reportgen.report.thumbnails import thumbnail
from reportgen.state.files import write_atomic, write_json

log = logging.getLogger("reportgen")
HEATMAP_CLASSES = 40  # classes drawn in the heatmap; past this, the ones where the runs differ most
THUMBNAIL = 128  # longest side of each panel of the disagreement gallery, pixels
AnyComparison = Comparison | SegmentationComparison | DetectionComparison
GRADCAM_HINT = "add gradcam to the runs' analyses (analysis=[predictions,gradcam,...]) to see each run's map here"


def write_comparison(comparison: AnyComparison, out_dir: Path) -> Path:
    """The page and the results files; returns the page's path."""
    from reportgen.report.render import render_comparison

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(comparison, SegmentationComparison):
        write_json(out_dir / "comparison.json", segmentation_json(comparison))
        write_atomic(out_dir / "comparison.csv", image_rows(comparison.images).to_csv(index=False))
        write_atomic(out_dir / "per_class.csv", comparison.classes.table.to_csv())
        return render_comparison(out_dir, segmentation_context(comparison, out_dir))
    if isinstance(comparison, DetectionComparison):
        write_json(out_dir / "comparison.json", detection_json(comparison))
        write_atomic(out_dir / "comparison.csv",
                     compare_detection.image_rows(comparison.images, comparison.shared).to_csv(index=False))
        write_atomic(out_dir / "per_class.csv", comparison.classes.rows().to_csv())
        return render_comparison(out_dir, detection_context(comparison, out_dir))
    write_json(out_dir / "comparison.json", comparison_json(comparison))
    write_atomic(out_dir / "comparison.csv", comparison_rows(comparison.joined).to_csv(index=False))
    write_atomic(out_dir / "per_class.csv", comparison.per_class.to_csv())
    return render_comparison(out_dir, page_context(comparison, out_dir))


def _ci(interval) -> List[Optional[float]]:
    return [None if math.isnan(v) else v for v in interval]


def comparison_json(comparison: Comparison) -> Dict[str, Any]:
    """comparison.json: `runs` (name, run dir, differing config values, top1, top1_ci, images) and `pairs`."""
    flats = {r.name: _flat(r) for r in comparison.runs}
    return {
        "task": "classification",
        "shared_images": len(comparison.joined.paths),
        "evaluated_images": int(comparison.joined.evaluated.sum()),
        "interval": "Wilson score, 95 %",
        "test": "exact two-sided McNemar (binomial on the discordant pairs); mcnemar_p_holm: Holm-adjusted",
        "runs": [{"name": r.name, "run_dir": str(r.run_dir),
                  "config": {k: flats[r.name].get(k) for k in comparison.differing},
                  "top1": acc.top1, "top1_ci": _ci(acc.top1_ci), "topk": acc.topk, "topk_ci": _ci(acc.topk_ci),
                  "top_k": r.top_k, "images": comparison.joined.images_per_run[r.name], "evaluated": acc.evaluated}
                 for r, acc in zip(comparison.runs, comparison.accuracies)],
        "pairs": [{"a": p.a, "b": p.b, "images": p.images, "agreement": p.agreement, "evaluated": p.evaluated,
                   "both_right": p.both_right, "a_only": p.a_only, "b_only": p.b_only, "both_wrong": p.both_wrong,
                   "mcnemar_p": p.mcnemar_p, "mcnemar_p_holm": p.mcnemar_p_holm} for p in comparison.pairs],
        "notes": comparison.notes,
        "not_compared": _not_compared_json(comparison),
    }


def _flat(run: RunResults) -> Dict[str, str]:
    return flatten_config(run.config)


# ---------------------------------------------------------------------------------------------------- page parts

def _common_context(comparison: AnyComparison, images_per_run: Dict[str, int],
                    shared_images: int) -> Dict[str, Any]:
    """What the page shows for runs of any task: what tells them apart, what was left out, the image sets."""
    runs = comparison.runs
    sizes = sorted(set(images_per_run.values()))
    return {
        "title": f"Comparison of {len(runs)} runs",
        "generated": dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
        "differing": [(key, [_flat(r).get(key, "—") for r in runs]) for key in comparison.differing],
        "shared_config": sorted(comparison.shared_config.items()),
        "not_compared": comparison.not_compared,
        "notes": comparison.notes,
        "images": {"shared": shared_images, "per_run": images_per_run,
                   "same_set": len(sizes) == 1 and sizes[0] == shared_images, "labels_conflict": 0},
        "folders": sorted({_folder_text(r) for r in runs}),
        "weight_changes": _weight_parts(comparison),
        "activation_parts": _activation_parts(comparison),
    }


def page_context(comparison: Comparison, out_dir: Path) -> Dict[str, Any]:
    runs, joined = comparison.runs, comparison.joined
    leaderboard = _leaderboard(comparison, out_dir)
    context = _common_context(comparison, joined.images_per_run, len(joined.paths))
    context["images"].update(evaluated=int(joined.evaluated.sum()), labels_conflict=joined.labels_conflict)
    return {
        **context,
        "task": "classification",
        "runs": leaderboard,
        "top_k": sorted({r.top_k for r in runs}),
        "cost_figures": _cost_figures(leaderboard),
        "class_figure": _class_figure(comparison),
        "class_table": _class_table(comparison),
        "pairs": comparison.pairs,
        "matrix": _pair_matrix(comparison),
        "strips": disagreement_strips(comparison),
        "disagreeing": comparison.disagreeing,
        "gradcam_runs": [r.name for r in runs if (r.run_dir / "results" / "gradcam.npz").is_file()],
        "gradcam_hint": GRADCAM_HINT,
    }


def _folder_text(run: RunResults) -> str:
    dataset = run.config.get("dataset", {})
    return str(dataset.get("root") or f"built-in demo folder ({dataset.get('synthetic')})")


def _run_row(run: RunResults, out_dir: Path) -> Dict[str, Any]:
    """A run's leaderboard cells of any task: model, cost, failed files, its report."""
    report = run.run_dir / "report" / "index.html"
    flops = run.summary.get("flops_per_image")
    return {"name": run.name, "model": run.manifest.get("model", {}).get("name", ""),
            "params": run.summary.get("params"), "gflops": flops / 1e9 if flops is not None else None,
            "images_per_second": run.manifest.get("images_per_second"),
            "failed": run.manifest.get("counts", {}).get("failed"), "run_dir": run.run_dir.name,
            "report": os.path.relpath(report, out_dir) if report.is_file() else None}


def _leaderboard(comparison: Comparison, out_dir: Path) -> List[Dict[str, Any]]:
    rows = []
    for run, acc in zip(comparison.runs, comparison.accuracies):
        rows.append({**_run_row(run, out_dir), "accuracy": acc, "top_k": run.top_k,
                     "images": comparison.joined.images_per_run[run.name]})
    nan = float("nan")
    gains = [r["accuracy"].top1 if r["accuracy"].top1 is not None else nan for r in rows]
    for key, sign in (("gflops", 1.0), ("images_per_second", -1.0)):
        costs = [sign * r[key] if r[key] is not None else nan for r in rows]
        for row, on_front in zip(rows, pareto_front(costs, gains)):
            row[f"front_{key}"] = on_front
    return rows


def _cost_figures(rows: List[Dict[str, Any]]) -> List[Any]:
    figures = []
    nan = float("nan")
    names = [r["name"] for r in rows]
    accuracy = [r["accuracy"].top1 if r["accuracy"].top1 is not None else nan for r in rows]
    intervals = [r["accuracy"].top1_ci for r in rows]
    for key, label, log_x, what in (("gflops", "GFLOPs per image", True, "cheaper"),
                                    ("images_per_second", "images/s (this machine, as run)", False, "faster")):
        figure = compare_plots.accuracy_vs_cost(
            names, [r[key] if r[key] is not None else nan for r in rows], accuracy, intervals,
            [r[f"front_{key}"] for r in rows], name=f"accuracy-{key}", xlabel=label,
            caption=f"Top-1 accuracy against {label} (bars: 95 % Wilson intervals). Red: the Pareto front, the runs "
                    f"no other run beats on both (none is both {what} and more accurate).", log_x=log_x)
        if figure is not None:
            figures.append(figure)
    return figures


def _class_figure(comparison: Comparison):
    table = comparison.per_class
    if table.empty:
        return None
    names = [r.name for r in comparison.runs]
    if len(table) <= HEATMAP_CLASSES:
        shown = table.sort_index()
        caption = (f"Per-class top-1 accuracy on the shared labelled images, all {len(table)} classes "
                   f"(percent in each cell).")
    else:
        shown = table.head(HEATMAP_CLASSES)
        caption = (f"The {HEATMAP_CLASSES} of {len(table)} classes where the runs differ most (largest spread "
                   f"between the best and the worst run); every class is in the table below and in per_class.csv.")
    return compare_plots.class_heatmap(shown[names].to_numpy(dtype=np.float64), list(shown.index), names,
                                       name="per-class", caption=caption)


def _class_table(comparison: Comparison) -> Optional[Table]:
    table = comparison.per_class
    if table.empty:
        return None
    names = [r.name for r in comparison.runs]
    rows = [[cls, int(row["images"])] + [round(float(row[n]), 4) for n in names] + [round(float(row["spread"]), 4)]
            for cls, row in table.iterrows()]
    return Table(columns=["class", "images"] + names + ["spread"], rows=rows, collapsed=len(rows) > 12,
                 caption=f"Per-class accuracy, all {len(rows)} classes, largest spread first (click a header to sort)")


def _pair_matrix(comparison: Comparison) -> List[Dict[str, Any]]:
    """Row run × column run: above the diagonal the pair (a = row, b = column), below it the same pair mirrored."""
    names = [r.name for r in comparison.runs]
    by_key = {(p.a, p.b): p for p in comparison.pairs}
    matrix = []
    for a in names:
        cells = []
        for b in names:
            pair = by_key.get((a, b)) or by_key.get((b, a))
            if pair is None:
                cells.append(None)
                continue
            mirrored = pair.a != a
            cells.append({"agreement": pair.agreement, "a_only": pair.b_only if mirrored else pair.a_only,
                          "b_only": pair.a_only if mirrored else pair.b_only, "p": pair.mcnemar_p})
        matrix.append({"name": a, "cells": cells})
    return matrix


# ---------------------------------------------------------------------------------------------------- disagreements

def dataset_folder(run: RunResults) -> Optional[Path]:
    """The image folder a run read (the built-in demo folder when it used one)."""
    dataset = run.config.get("dataset", {})
    if dataset.get("root"):
        return Path(dataset["root"])
    if dataset.get("synthetic") == "shapes":
        from reportgen.inputs.demo.shapes import ensure_demo_folder

        return ensure_demo_folder()
    return None


def display_preprocess(model: Dict[str, Any]) -> Preprocess:
    """The resize/crop a run's model saw, resolved as the model loader does (config values, then the torchvision
    weights' own transform), without loading any weights: Grad-CAM maps are laid over exactly that crop."""
    from reportgen.inputs.models import is_torchscript, resolve_weights, weights_enum

    cfg = OmegaConf.create(model.get("preprocess") or {})
    source, transform = model.get("source"), None
    try:
        if source == "torchvision" and model.get("name"):
            weights = resolve_weights(model["name"], model.get("weights"))
            transform = (weights if weights is not None else weights_enum(model["name"]).DEFAULT).transforms()
        elif source == "checkpoint" and model.get("arch"):
            path = Path(str(model.get("path")))
            if not (path.is_file() and is_torchscript(path)):  # a TorchScript archive keeps the config's values
                transform = weights_enum(model["arch"]).DEFAULT.transforms()
    except Exception as exc:  # an architecture this torchvision no longer has: the config's values still apply
        log.warning("comparison: preprocessing of %s not resolved (%s); using the config's values", model, exc)
    return Preprocess.resolve(cfg, transform)


class _Maps:
    """One run's Grad-CAM maps by image path (results/gradcam.npz), read once."""

    def __init__(self, run: RunResults):
        path = run.run_dir / "results" / "gradcam.npz"
        self.available = path.is_file()
        self.index: Dict[str, int] = {}
        if self.available:
            with np.load(path, allow_pickle=False) as data:
                self.cams = data["cams"]  # (N, h, w) raw maps
                self.classes = data["classes"]  # (N,) target class per image
                self.index = {str(p): i for i, p in enumerate(data["paths"])}

    def get(self, path: str) -> Optional[np.ndarray]:
        i = self.index.get(path)
        return None if i is None else self.cams[i]


def disagreement_strips(comparison: Comparison) -> List[ImageStrip]:
    """One strip per disagreeing image: the image, then each run's model input with its Grad-CAM map (where the run
    computed maps), with the run's top-1 class and probability; frames green (right) / red (wrong)."""
    joined, runs = comparison.joined, comparison.runs
    if not comparison.disagreements:
        return []
    folder = dataset_folder(runs[0])
    maps = [_Maps(r) for r in runs]
    preprocess = [display_preprocess(r.config.get("model", {})) for r in runs]
    strips = []
    for path in comparison.disagreements:
        label = joined.label[path]
        image = None
        if folder is not None:
            try:
                image = decode_image(folder / path)
            except Exception as exc:  # moved or deleted since the runs: the strip still shows every run's answer
                log.warning("comparison: %s could not be read (%s); its strip has no pictures", folder / path, exc)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1) if image is not None else None
        panels = [GalleryItem(image=thumbnail(pixels, THUMBNAIL) if pixels is not None else None,
                              title="the image", lines=[] if pixels is not None else ["image not found"])]
        for run, run_maps, pre in zip(runs, maps, preprocess):
            right = joined.right.loc[path, run.name]
            status = "neutral" if math.isnan(right) else ("ok" if right else "bad")
            lines = [f"{joined.top1.loc[path, run.name]} {joined.prob.loc[path, run.name]:.1%}",
                     "" if math.isnan(right) else ("right" if right else "wrong")]
            picture = None
            cam = run_maps.get(path)
            if image is not None:
                model_input = thumbnail(pre.to_uint8(image), THUMBNAIL)  # what this run's model saw, (h, w, 3)
                picture = heat_on_thumbnail(model_input, torch.from_numpy(cam)) if cam is not None else model_input
            if cam is None:
                lines.append("no Grad-CAM in this run" if not run_maps.available else "no Grad-CAM map of this image")
            panels.append(GalleryItem(image=picture, title=run.name, lines=[l for l in lines if l], status=status))
        strips.append(ImageStrip(title=path, lines=[f"label: {label}" if label else "no label"], panels=panels))
    return strips


# ---------------------------------------------------------------------------------------------------- segmentation

def _none_if_nan(value: Optional[float]) -> Optional[float]:
    return None if value is None or math.isnan(value) else float(value)


def segmentation_json(comparison: SegmentationComparison) -> Dict[str, Any]:
    """comparison.json of segmentation runs: `runs` (each run's segmentation.json metrics), `classes` (per-class
    IoU on the classes every run has, and the ones each run lacks) and `pairs` (the per-image sign tests)."""
    flats = {r.name: _flat(r) for r in comparison.runs}
    table = comparison.classes.table
    return {
        "task": "segmentation",
        "shared_images": len(comparison.shared),
        "test": "exact two-sided sign test on the nonzero per-image IoU differences b - a (binomial, p = 0.5), over "
                "the images labelled in both runs; sign_p_holm: Holm-adjusted over all pairs",
        "runs": [{"name": r.name, "run_dir": str(r.run_dir),
                  "config": {k: flats[r.name].get(k) for k in comparison.differing},
                  **{key: r.segmentation.get(key) for key, _ in METRICS},
                  **{key: r.segmentation.get(key) for key in ("labelled_pixels", "labelled_images", "images",
                                                               "ignore_index")},
                  "images_listed": len(comparison.images[r.name])} for r in comparison.runs],
        "classes": {"compared": [str(c) for c in table.index], "missing": comparison.classes.missing,
                    "iou": {str(c): {r.name: _none_if_nan(table.loc[c, r.name]) for r in comparison.runs}
                            for c in table.index}},
        "pairs": [{"a": p.a, "b": p.b, "shared": p.shared, "paired": p.paired, "mean_difference": p.mean_difference,
                   "better": p.better, "worse": p.worse, "tied": p.tied, "sign_p": p.sign_p,
                   "sign_p_holm": p.sign_p_holm, "winner": p.winner, "sentence": p.sentence(),
                   "largest_gains": [{"path": x, "iou_a": ia, "iou_b": ib} for x, ia, ib in p.gains],
                   "largest_losses": [{"path": x, "iou_a": ia, "iou_b": ib} for x, ia, ib in p.losses]}
                  for p in comparison.pairs],
        "notes": comparison.notes,
        "not_compared": _not_compared_json(comparison),
    }


def segmentation_context(comparison: SegmentationComparison, out_dir: Path) -> Dict[str, Any]:
    """The page's values for segmentation runs (templates/compare.html, task "segmentation")."""
    images_per_run = {name: len(table) for name, table in comparison.images.items()}
    return {
        **_common_context(comparison, images_per_run, len(comparison.shared)),
        "task": "segmentation",
        "runs": [{**_run_row(r, out_dir), **{key: r.segmentation.get(key) for key, _ in METRICS},
                  "labelled_images": r.segmentation.get("labelled_images"), "images": r.segmentation.get("images")}
                 for r in comparison.runs],
        "metrics": METRICS,
        "class_figure": _class_bars(comparison, "IoU", "per-class-iou",
                                    "the class is in no mask or prediction of that run"),
        "class_table": _iou_table(comparison),
        "class_notes": comparison.classes.notes(),
        "image_pairs": [_image_pair_part(p, i) for i, p in enumerate(comparison.pairs)],
    }


def _class_bars(comparison: Any, metric: str, name: str, missing: str):
    """Grouped bars of a per-class metric (IoU, AP) of each run: every class when few, else the HEATMAP_CLASSES
    where the runs differ most. `missing` says what a run without a bar lacks."""
    table = comparison.classes.table
    if table.empty:
        return None
    names = [r.name for r in comparison.runs]
    if len(table) <= HEATMAP_CLASSES:
        shown = table
        caption = f"Per-class {metric} of each run, all {len(table)} classes every run has (no bar: {missing})."
    else:
        shown = table.sort_values("spread", ascending=False, kind="stable").head(HEATMAP_CLASSES)
        caption = (f"Per-class {metric} of the {HEATMAP_CLASSES} of {len(table)} classes where the runs differ most "
                   f"(largest spread between the best and the worst run); every class is in the table below and in "
                   f"per_class.csv.")
    return grouped_bars(shown[names].to_numpy(dtype=np.float64).T, names, [str(c) for c in shown.index],
                        name=name, ylabel=metric.split(" ")[0], caption=caption)


def _iou_table(comparison: SegmentationComparison) -> Optional[Table]:
    table = comparison.classes.table
    if table.empty:
        return None
    names = [r.name for r in comparison.runs]
    rows = [[str(cls), int(row["pixels"])] + [_none_if_nan(round(float(row[n]), 4)) for n in names]
            + [_none_if_nan(round(float(row["spread"]), 4))] for cls, row in table.iterrows()]
    return Table(columns=["class", "pixels"] + names + ["spread"], rows=rows, collapsed=len(rows) > 25,
                 caption=f"Per-class IoU, {len(rows)} classes, in class order (pixels: labelled pixels of the class "
                         f"in the first run's masks; empty: the class is in no mask or prediction of that run; click "
                         f"a header to sort)")


def _image_pair_part(pair: ImagePair, number: int) -> Dict[str, Any]:
    """A pair's sentence, the per-image scatter and the images with the largest differences each way."""
    columns = ["image", f"{pair.a} IoU", f"{pair.b} IoU", "difference"]

    def listed(rows, what: str) -> Optional[Table]:
        if not rows:
            return None
        return Table(columns=columns, rows=[[path, round(a, 4), round(b, 4), round(b - a, 4)] for path, a, b in rows],
                     caption=f"{what} ({len(rows)})")

    scatter = compare_plots.paired_scatter(
        [a for _, a, _ in pair.points], [b for _, _, b in pair.points], name=f"iou-pair-{number}",
        xlabel=f"{pair.a}: image IoU", ylabel=f"{pair.b}: image IoU",
        caption=f"Per-image IoU on the {pair.paired} images labelled in both runs; above the diagonal (blue): "
                f"{pair.b} is better on that image, below (red): {pair.a} is.")
    return {"pair": pair, "sentence": pair.sentence(), "figure": scatter,
            "gains": listed(pair.gains, f"Images where {pair.b} does best against {pair.a}"),
            "losses": listed(pair.losses, f"Images where {pair.b} does worst against {pair.a}")}


# ---------------------------------------------------------------------------------------------------- detection

def _errors_json(image: ImageErrors) -> Dict[str, Any]:
    return {"path": image.path, "objects": image.objects, "errors_a": image.errors_a, "errors_b": image.errors_b,
            "missed_a": image.missed_a, "false_positives_a": image.false_positives_a, "missed_b": image.missed_b,
            "false_positives_b": image.false_positives_b}


def detection_json(comparison: DetectionComparison) -> Dict[str, Any]:
    """comparison.json of detection runs: `runs` (each run's detection_metrics.json metrics), `classes` (per-class
    AP and AP50 on the classes every run has, and the ones each run lacks) and `pairs` (the per-image sign tests of
    the errors, missed objects + false positives)."""
    flats = {r.name: _flat(r) for r in comparison.runs}
    classes = comparison.classes
    return {
        "task": "detection",
        "shared_images": len(comparison.shared),
        "errors": "per image: missed objects + false positives, at IoU 0.5 and each run's drawing score threshold "
                  "(the run's detection_images.csv)",
        "test": "exact two-sided sign test on the nonzero per-image error differences b - a (binomial, p = 0.5), "
                "over the images labelled in both runs; sign_p_holm: Holm-adjusted over all pairs",
        "runs": [{"name": r.name, "run_dir": str(r.run_dir),
                  "config": {k: flats[r.name].get(k) for k in comparison.differing},
                  **{key: r.detection.get(key) for key, _ in compare_detection.METRICS},
                  **{key: r.detection.get(key) for key in ("mar_1", "mar_10", "labelled_images", "images",
                                                           "score_threshold")},
                  "images_listed": len(comparison.images[r.name])} for r in comparison.runs],
        "classes": {"compared": [str(c) for c in classes.table.index], "missing": classes.missing,
                    "objects": {str(c): int(classes.table.loc[c, "objects"]) for c in classes.table.index},
                    "ap": {str(c): {r.name: _none_if_nan(classes.table.loc[c, r.name]) for r in comparison.runs}
                           for c in classes.table.index},
                    "ap50": {str(c): {r.name: _none_if_nan(classes.ap50.loc[c, r.name]) for r in comparison.runs}
                             for c in classes.table.index}},
        "pairs": [{"a": p.a, "b": p.b, "shared": p.shared, "paired": p.paired, "mean_difference": p.mean_difference,
                   "fewer": p.fewer, "more": p.more, "tied": p.tied, "errors_a": p.errors_a, "errors_b": p.errors_b,
                   "missed_a": p.missed_a, "missed_b": p.missed_b, "false_positives_a": p.false_positives_a,
                   "false_positives_b": p.false_positives_b, "objects_differ": p.objects_differ,
                   "sign_p": p.sign_p, "sign_p_holm": p.sign_p_holm, "winner": p.winner, "sentence": p.sentence(),
                   "largest_gains": [_errors_json(i) for i in p.gains],
                   "largest_losses": [_errors_json(i) for i in p.losses]}
                  for p in comparison.pairs],
        "notes": comparison.notes,
        "not_compared": _not_compared_json(comparison),
    }


def detection_context(comparison: DetectionComparison, out_dir: Path) -> Dict[str, Any]:
    """The page's values for detection runs (templates/compare.html, task "detection")."""
    images_per_run = {name: len(table) for name, table in comparison.images.items()}
    return {
        **_common_context(comparison, images_per_run, len(comparison.shared)),
        "task": "detection",
        "runs": [{**_run_row(r, out_dir), **{key: r.detection.get(key) for key, _ in compare_detection.METRICS},
                  "labelled_images": r.detection.get("labelled_images"), "images": r.detection.get("images"),
                  "score_threshold": r.detection.get("score_threshold")}
                 for r in comparison.runs],
        "metrics": compare_detection.METRICS,
        "class_figure": _class_bars(comparison, "AP (IoU 0.5:0.95)", "per-class-ap",
                                    "the run has no AP for the class, e.g. no object of it is annotated"),
        "class_table": _ap_table(comparison),
        "class_notes": comparison.classes.notes(),
        "image_pairs": [_error_pair_part(p, i) for i, p in enumerate(comparison.pairs)],
    }


def _ap_table(comparison: DetectionComparison) -> Optional[Table]:
    classes = comparison.classes
    if classes.table.empty:
        return None
    names = [r.name for r in comparison.runs]

    def cell(value) -> Optional[float]:
        return _none_if_nan(round(float(value), 4))

    rows = [[str(cls), int(row["objects"])] + [v for n in names for v in (cell(row[n]), cell(classes.ap50.loc[cls, n]))]
            + [cell(row["spread"])] for cls, row in classes.table.iterrows()]
    columns = ["class", "objects"] + [c for n in names for c in (f"{n} AP", f"{n} AP50")] + ["AP spread"]
    return Table(columns=columns, rows=rows, collapsed=len(rows) > 25,
                 caption=f"Per-class AP (IoU 0.5:0.95) and AP50, {len(rows)} classes, in class order (objects: "
                         f"annotated objects of the class in the first run; empty: the run has no AP for the class; "
                         f"click a header to sort)")


def _error_pair_part(pair: ErrorPair, number: int) -> Dict[str, Any]:
    """A pair's sentence, the histogram of per-image error differences and the images with the largest differences
    each way."""
    columns = ["image", "objects", f"{pair.a} missed", f"{pair.a} false positives", f"{pair.b} missed",
               f"{pair.b} false positives", "difference"]

    def listed(rows: List[ImageErrors], what: str) -> Optional[Table]:
        if not rows:
            return None
        return Table(columns=columns, rows=[[i.path, i.objects, i.missed_a, i.false_positives_a, i.missed_b,
                                             i.false_positives_b, i.difference] for i in rows],
                     caption=f"{what} ({len(rows)}; difference: {pair.b}'s errors − {pair.a}'s)")

    figure = compare_plots.difference_histogram(
        pair.differences, name=f"errors-pair-{number}", xlabel=f"errors per image: {pair.b} − {pair.a}",
        caption=f"Per-image difference of the errors (missed objects + false positives) on the {pair.paired} images "
                f"labelled in both runs; left of zero (blue): {pair.b} makes fewer errors on that image, right "
                f"(red): {pair.a} does.")
    note = (f"{pair.objects_differ} of the {pair.paired} paired images have a different number of annotated objects "
            f"in the two runs (other annotation files?): their errors are counted against different objects."
            if pair.objects_differ else "")
    return {"pair": pair, "sentence": pair.sentence(), "figure": figure, "note": note,
            "gains": listed(pair.gains, f"Images where {pair.b} does best against {pair.a}"),
            "losses": listed(pair.losses, f"Images where {pair.b} does worst against {pair.a}")}


# ---------------------------------------------------------------------------------------------------- layers

def _weight_parts(comparison: AnyComparison) -> List[Dict[str, Any]]:
    parts = []
    for change in comparison.weight_changes:
        part: Dict[str, Any] = {"a": change.a, "b": change.b, "note": change.note, "figure": None, "table": None}
        if change.rows:
            names = [r[0] for r in change.rows]
            part["figure"] = compare_plots.layer_lines(
                names, [(f"{change.b} vs {change.a}", [r[1] for r in change.rows])], name="weight-change",
                ylabel="‖W_b − W_a‖ / ‖W_a‖",
                caption=f"Relative weight change per parameter tensor, in model order: {change.a} → {change.b}.")
            part["table"] = Table(columns=["parameter", "relative change", "‖W_a‖"],
                                  rows=[[n, float(c), float(w)] for n, c, w in change.rows], collapsed=True,
                                  caption=f"Relative change of every parameter tensor ({len(change.rows)})")
        parts.append(part)
    return parts


def _activation_parts(comparison: AnyComparison) -> List[Dict[str, Any]]:
    """Runs with activation statistics over the same layers (checkpoints of one architecture), side by side."""
    groups: Dict[tuple, List[tuple]] = {}
    for run in comparison.runs:
        stats = run.run_dir / "results" / "activation_stats.csv"
        if not stats.is_file():
            continue
        options = run.config.get("analysis", {}).get("activations", {})
        layers = activation_layers(stats, float(options.get("dead_zero_fraction", DEFAULT_DEAD_ZERO_FRACTION)))
        groups.setdefault(tuple(layers.index), []).append((run.name, layers))
    parts = []
    for layer_names, members in groups.items():
        if len(members) < 2:
            continue
        names = list(layer_names)
        dead = compare_plots.layer_lines(names, [(n, 100 * t["dead_fraction"].to_numpy()) for n, t in members],
                                         name="dead", ylabel="dead channels (%)",
                                         caption="Dead-channel fraction per analysed layer, side by side.")
        scale = compare_plots.layer_lines(names, [(n, t["rms"].to_numpy()) for n, t in members], name="scale",
                                          ylabel="activation RMS", caption="Activation scale (root mean square of "
                                          "every value of the layer over the folder) per analysed layer.")
        rows = [[layer] + [v for _, t in members for v in (round(float(t.loc[layer, "dead_fraction"]), 4),
                                                          float(t.loc[layer, "rms"]))] for layer in names]
        columns = ["layer"] + [c for n, _ in members for c in (f"{n}: dead", f"{n}: RMS")]
        parts.append({"runs": [n for n, _ in members], "figures": [dead, scale],
                      "table": Table(columns=columns, rows=rows, collapsed=True, caption="Per-layer numbers")})
    return parts


def _not_compared_json(comparison: Any) -> List[Dict[str, Any]]:
    """The runs left out of a comparison, with why, as comparison.json lists them (every task)."""
    return [{"run_dir": str(n.run_dir), "status": n.status, "reason": n.reason, "command": n.command}
            for n in comparison.not_compared]
