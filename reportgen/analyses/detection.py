"""`detection`: what an object detector finds on the folder, scored against the user's boxes when given.

The pass only collects: every image's detections (score >= `metrics_threshold`, the `max_detections` highest), with
their boxes brought to the image's own pixels, in a compact store that shards merge by concatenation. Everything
else is computed once at the end from the store and the ground truth (`dataset.annotations`: COCO, YOLO or VOC;
reportgen/inputs/annotations.py), by reportgen/analyses/_detection_math.py: the COCO evaluation (pycocotools'
COCOeval: mAP@[.5:.95], AP50, AP75, AP by size, AR@1/10/100, per-class AP, precision-recall curves), precision /
recall / F1 against the score threshold, the confusion matrix with a background row and column, and what each box
of each image is (hit, duplicate, wrong class, poorly placed, background; missed objects). Without annotations:
detections per class, score distribution, boxes per image, box sizes.

The model's label ids are matched to the annotations' categories by name (torchvision's 91 COCO slots with their
'N/A' placeholders, `id2label`, a labels file); the mapping and what did not match are shown. Galleries are drawn
from the images decoded again at the end (the image as the model got it), with the explained detections' Grad-CAM
and EigenCAM computed then for the shown images only (a bounded second pass whose cost the section states).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from reportgen.analyses._detection_math import (BELOW, STAT_NAMES, DetectionStore, ImagePredictions,
                                               PycocotoolsMissing, coco_evaluate, confusion_matrix, image_errors,
                                               pr_curves, prediction_stats)
from reportgen.analyses._detection_cam import (SecondPassCost, box_score_cams, default_detection_layer, eigen_cams,
                                              renormalise_in_box)
from reportgen.analyses._redecode import decode_model_input, decode_original
from reportgen.analyses.base import Analysis, Batch, RunContext, register
from reportgen.engine.layers import select_layers
from reportgen.errors import ConfigError
from reportgen.inputs.annotations import GroundTruth, ImageBoxes, match_categories, read_annotations
from reportgen.report import plots
from reportgen.report.detection_drawing import KIND_COLOURS, draw_boxes, thumbnail_of
from reportgen.report.elements import Alert, Gallery, GalleryItem, ImageStrip, KeyValues, Section, Table, Text
from reportgen.report.overlays import heat_on_thumbnail, overlay

CSV_HEADER = ["path", "labelled", "objects", "detections", "true_positives", "false_positives", "missed"]
METRIC_KEYS = {"AP": "map", "AP50": "map_50", "AP75": "map_75", "AP_small": "map_small", "AP_medium": "map_medium",
               "AP_large": "map_large", "AR1": "mar_1", "AR10": "mar_10", "AR100": "mar_100",
               "AR_small": "mar_small", "AR_medium": "mar_medium", "AR_large": "mar_large"}
FALSE_KINDS = ("duplicate", "wrong_class", "localization", "background")  # false positives, as image_errors names them
COLOUR_WORDS = {"tp": "green: hit", "duplicate": "amber: duplicate", "wrong_class": "magenta: wrong class",
                "localization": "orange: poorly placed", "background": "red: background",
                "ignored": "grey: on an ignored region", "unscored": "blue: prediction"}


@dataclass
class DetectionConfig:
    score_threshold: float = 0.5  # boxes drawn, per-image errors and the confusion matrix count scores >= this
    metrics_threshold: float = 0.05  # detections kept for the metrics (COCO evaluation wants the low scores too)
    max_detections: int = 100  # per image, highest scores first (COCO evaluation's maxDets)
    iou_threshold: float = 0.5  # a hit: IoU >= this with an object of the class (errors, confusion, P/R/F1)
    gallery: int = 8  # images per gallery (most errors, highest-scoring false positives, missed objects, spread)
    classes_shown: int = 12  # classes with precision-recall curves (most objects first)
    cam: bool = True  # Grad-CAM and EigenCAM of the drawn detections of the gallery images (a second pass)
    cam_layer: Optional[str] = None  # null: see _detection_cam.default_detection_layer
    cam_boxes: int = 3  # detections explained per gallery image (highest scores first)
    cam_images: int = 8  # gallery images explained at most (the second pass is bounded by this)


@register("detection")
class Detection(Analysis):
    Config = DetectionConfig
    title = "Detection"
    layer_option = "analysis.detection.cam_layer"
    tasks = frozenset({"detection"})
    why_not = "it scores boxes, and they output none"

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        for key in ("score_threshold", "metrics_threshold", "iou_threshold"):
            if not 0.0 <= float(cfg[key]) <= 1.0:
                raise ConfigError(f"analysis.detection.{key}", cfg[key], "a number in [0, 1]")
        for key in ("max_detections", "gallery", "classes_shown", "cam_boxes", "cam_images"):
            if int(cfg[key]) < 0:
                raise ConfigError(f"analysis.detection.{key}", cfg[key], "a count >= 0")
        if int(cfg.max_detections) < 1:
            raise ConfigError("analysis.detection.max_detections", cfg.max_detections, "at least 1 detection per image")

    def __init__(self, cfg: Any, ctx: RunContext):
        super().__init__(cfg, ctx)
        self.check_config(cfg)
        dataset = ctx.dataset
        self.annotations = getattr(dataset, "annotations", None) if dataset is not None else None
        self.truth: Optional[GroundTruth] = None
        if self.annotations:  # read now: a bad file stops the run before the pass
            self.truth = read_annotations(Path(self.annotations), list(ctx.paths))
        self.store = DetectionStore()
        self.sizes: Dict[str, Tuple[int, int]] = {}  # path -> (height, width) as decoded
        self.images = 0

    def update(self, batch: Batch, outputs: Any, captures: Any) -> None:
        in_height, in_width = (int(v) for v in batch.inputs.shape[-2:])
        limit, floor = int(self.cfg.max_detections), float(self.cfg.metrics_threshold)
        for row, found in enumerate(outputs.detections):
            path = batch.paths[row]
            height, width = ((int(v) for v in batch.sizes[row].tolist()) if batch.sizes is not None
                             else (in_height, in_width))
            scores = found["scores"].detach().float()  # (N,)
            keep = torch.nonzero(scores >= floor).flatten()
            keep = keep[scores[keep].argsort(descending=True, stable=True)[:limit]]
            scale = torch.tensor([width / in_width, height / in_height] * 2, device=scores.device)  # input -> image
            boxes = found["boxes"].detach().float()[keep] * scale  # (n, 4) xyxy in the image's pixels
            self.store.add(path, boxes.cpu(), scores[keep].cpu(), found["labels"][keep].cpu())
            self.sizes[path] = (height, width)
        self.images += len(batch.paths)

    def state_dict(self) -> Dict[str, Any]:
        return {"store": self.store.state_dict(), "sizes": dict(self.sizes), "images": self.images}

    def merge(self, state: Dict[str, Any]) -> None:
        self.store.merge(DetectionStore.from_state(state["store"]))
        self.sizes.update(state["sizes"])
        self.images += state["images"]

    # --- the report --------------------------------------------------------------------------------------------

    def finalize(self) -> Optional[Section]:
        section = Section(id="detection", title="Detection")
        if not self.images:
            section.elements.append(Text("No image was processed, so there are no detections."))
            return section
        names = self._model_names()
        results = self.ctx.results_dir
        order = sorted(self.store)  # image ids 1.. in sorted path order
        (results / "images.json").write_text(json.dumps(
            [{"id": i, "path": p, "height": self.sizes[p][0], "width": self.sizes[p][1]}
             for i, p in enumerate(order, start=1)], indent=1))
        dpi = int(self.ctx.report.figure_dpi)
        if self.truth is None:
            self._write_detections(order, None)
            self._without_truth(section, names, dpi)
        else:
            self._with_truth(section, names, order, dpi)
        return section

    def _model_names(self) -> List[str]:
        """The model's label names, with "class i" for any label the model names none for."""
        names = list(self.ctx.loaded.class_names or [])
        top = max([int(self.store[p].labels.max(initial=-1)) for p in self.store] + [len(names) - 1]) + 1
        return names + [f"class {i}" for i in range(len(names), top)]

    def _name(self, names: Sequence[str], label: int) -> str:
        return names[label] if 0 <= label < len(names) else f"class {label}"

    def _write_detections(self, order: List[str], mapped: Optional[Dict[str, ImagePredictions]]) -> int:
        """results/detections.json in COCO's results format: category ids of the annotations when there are
        any (a detection of a label they lack is left out, and counted), else the model's label ids."""
        rows, left_out = [], 0
        for image_id, path in enumerate(order, start=1):
            pred = mapped[path] if mapped is not None else self.store[path]
            if mapped is not None:
                left_out += len(self.store[path].labels) - len(pred.labels)
            for box, score, label in zip(pred.boxes, pred.scores, pred.labels):
                x1, y1, x2, y2 = (float(v) for v in box)
                rows.append({"image_id": image_id, "category_id": int(label),
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
        (self.ctx.results_dir / "detections.json").write_text(json.dumps(rows))
        return left_out

    def _without_truth(self, section: Section, names: List[str], dpi: int) -> None:
        threshold = float(self.cfg.score_threshold)
        stats = prediction_stats(self.store, threshold)
        total = sum(len(self.store[p].labels) for p in self.store)
        section.summary = f"{total} detections on {self.images} images; no annotations: nothing is scored"
        per_class = sorted(stats["per_class"].items(), key=lambda item: (-item[1], item[0]))
        section.elements.append(KeyValues([
            ("images", self.images), ("detections kept", f"{total} (score >= {self.cfg.metrics_threshold}, at "
                                                        f"most {self.cfg.max_detections} per image)"),
            (f"detections with score >= {threshold}", sum(n for _, n in per_class)),
            ("boxes per image", f"mean {stats['boxes_per_image']['mean']:.2f}, max "
                                f"{stats['boxes_per_image']['max']}"),
            ("box sizes (COCO's buckets)", ", ".join(f"{k} {v}" for k, v in stats["sizes"].items())),
            ("ground truth", "none: set dataset.annotations to a COCO .json, a YOLO labels folder or a VOC "
                             "Annotations folder for mAP and error galleries")]))
        if per_class:
            section.elements.append(Table(columns=["label", "class", f"detections (score >= {threshold})"],
                                          rows=[[c, self._name(names, c), n] for c, n in per_class]))
        hist = np.asarray(stats["score_histogram"]["counts"] if isinstance(stats["score_histogram"], dict)
                          else stats["score_histogram"])
        section.elements.append(plots.horizontal_bars(
            hist.tolist(), [f"{i / len(hist):.2f}–{(i + 1) / len(hist):.2f}" for i in range(len(hist))],
            name="detection_scores", xlabel="detections", dpi=dpi,
            caption="Scores of every kept detection (choose analysis.detection.score_threshold from it)"))
        self._write_images_csv({}, {})
        shown = self._spread(sorted(self.store))
        self._gallery(section, "A spread of the folder", shown, names, None, None)
        self._explanations(section, shown, names)

    def _with_truth(self, section: Section, names: List[str], order: List[str], dpi: int) -> None:
        truth = self.truth.resolved(self.sizes)  # YOLO's normalised boxes to pixels, at each decoded size
        categories = [(c.id, c.name) for c in truth.categories]
        if self.ctx.loaded.class_names:
            match = match_categories(categories, names)
            mapping_text = (f"model labels matched to the annotations' categories by name: {len(match.model_to_dataset)} "
                            f"of {len(categories)} categories")
        else:
            match = None
            mapping_text = "the model names no classes: its label ids are taken as the annotations' category ids"
        mapped = {p: self._mapped(self.store[p], match) for p in order}
        left_out = self._write_detections(order, mapped)
        labelled = {p: truth.images[p] for p in order if p in truth.images}
        threshold, iou = float(self.cfg.score_threshold), float(self.cfg.iou_threshold)
        try:
            coco = coco_evaluate(labelled, mapped, categories)
        except PycocotoolsMissing as exc:
            section.alerts.append(Alert("error", str(exc)))
            coco = None
        curves = pr_curves(labelled, mapped, categories, iou)
        confusion = confusion_matrix(labelled, mapped, categories, threshold, iou)
        errors = {p: image_errors(labelled[p], mapped[p], threshold, iou) for p in labelled}
        self._write_metrics(coco, curves, categories, labelled, left_out, match)
        self._write_images_csv(labelled, errors)
        stats = coco["stats"] if coco is not None else {n: None for n in STAT_NAMES}
        section.summary = (f"mAP@[.5:.95] {_pct(stats['AP'])}, AP50 {_pct(stats['AP50'])} over {len(labelled)} "
                           f"labelled images")
        facts = [("images", self.images), ("labelled images", len(labelled)),
                 ("annotations", f"{truth.format.upper()}: {truth.id_rule}"), ("labels", mapping_text),
                 ("mAP@[.5:.95]", _pct(stats["AP"])), ("AP50", _pct(stats["AP50"])), ("AP75", _pct(stats["AP75"])),
                 ("AP small / medium / large", " / ".join(_pct(stats[k]) for k in ("AP_small", "AP_medium",
                                                                                     "AP_large"))),
                 ("AR@1 / 10 / 100", " / ".join(_pct(stats[k]) for k in ("AR1", "AR10", "AR100"))),
                 ("how it is counted", f"pycocotools COCOeval (bbox) on the detections with score >= "
                                       f"{self.cfg.metrics_threshold}, at most {self.cfg.max_detections} per image; "
                                       f"errors, confusion and F1 at IoU {iou}; boxes drawn and counted at score "
                                       f">= {threshold}")]
        best = curves["all"]["best"]
        if best is not None:
            facts.append(("best F1", f"{best['f1']:.3f} at score >= {best['threshold']:.3f} (precision "
                                     f"{best['precision']:.1%}, recall {best['recall']:.1%})"))
        section.elements.append(KeyValues(facts))
        self._truth_alerts(section, truth, match, left_out, len(labelled))
        self._class_table(section, coco, curves, categories)
        self._curve_figures(section, coco, curves, categories, dpi)
        conf = confusion["matrix"]
        keep = [i for i in range(conf.shape[0]) if conf[i].sum() or conf[:, i].sum()][:31]
        section.elements.append(plots.confusion_matrix(
            conf[np.ix_(keep, keep)], [confusion["names"][i] for i in keep], [confusion["names"][i] for i in keep],
            name="detection_confusion", dpi=dpi, ylabel="ground truth",
            caption=f"Objects at IoU {iou} and score >= {threshold}, rows normalised: the background column holds "
                    f"missed objects, the background row false positives"))
        self._error_galleries(section, labelled, mapped, errors, truth, names, match)

    def _mapped(self, pred: ImagePredictions, match: Any) -> ImagePredictions:
        if match is None:
            return pred
        labels, keep = match.map_labels(pred.labels)
        return ImagePredictions(pred.boxes[keep], pred.scores[keep], labels)

    def _write_metrics(self, coco: Optional[Dict[str, Any]], curves: Dict[str, Any],
                       categories: List[Tuple[int, str]], labelled: Dict[str, ImageBoxes], left_out: int,
                       match: Any) -> None:
        stats = coco["stats"] if coco is not None else {n: None for n in STAT_NAMES}
        per_class = []
        for cid, name in categories:
            entry = (coco or {}).get("per_class", {}).get(cid, {})
            curve = curves["classes"].get(cid)
            per_class.append({"id": cid, "name": name, "ap": entry.get("ap"), "ap50": entry.get("ap50"),
                              "ground_truth": entry.get("objects", curve["objects"] if curve else 0),
                              "detections": entry.get("detections", 0),
                              "best_f1": None if not curve or not curve["best"] else curve["best"]})
        data = {METRIC_KEYS[n]: stats[n] for n in STAT_NAMES}
        data.update(images=self.images, labelled_images=len(labelled),
                    score_threshold=float(self.cfg.score_threshold),
                    metrics_threshold=float(self.cfg.metrics_threshold), max_detections=int(self.cfg.max_detections),
                    iou_threshold=float(self.cfg.iou_threshold), per_class=per_class,
                    detections_left_out=left_out, annotations=str(self.annotations),
                    format=self.truth.format, problems=[{"location": l, "reason": r} for l, r in self.truth.problems],
                    label_mapping=None if match is None else {str(k): v for k, v in match.model_to_dataset.items()},
                    best_f1=curves["all"]["best"])
        (self.ctx.results_dir / "detection_metrics.json").write_text(json.dumps(_plain(data), indent=1))

    def _write_images_csv(self, labelled: Dict[str, ImageBoxes], errors: Dict[str, Dict[str, Any]]) -> None:
        import csv

        threshold = float(self.cfg.score_threshold)
        with open(self.ctx.results_dir / "detection_images.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_HEADER)
            for path in sorted(self.store):
                kept = int((self.store[path].scores >= threshold).sum())
                if path in errors:
                    counts = errors[path]["counts"]
                    false_pos = sum(counts[k] for k in FALSE_KINDS)
                    writer.writerow([path, 1, int((~labelled[path].ignore).sum()), kept, counts["tp"], false_pos,
                                     counts["missed"]])
                else:
                    writer.writerow([path, 0, "", kept, "", "", ""])

    def _truth_alerts(self, section: Section, truth: GroundTruth, match: Any, left_out: int, labelled: int) -> None:
        if truth.problems:
            section.alerts.append(Alert("warning", f"{len(truth.problems)} annotation problem(s): entries left out "
                                                   f"of the ground truth (all in detection_metrics.json)"))
            section.elements.append(Table(columns=["where", "problem"],
                                          rows=[[l, r] for l, r in truth.problems[:50]]))
        unlabelled = self.images - labelled
        if unlabelled:
            section.alerts.append(Alert("info", f"{unlabelled} of {self.images} images have no annotations and are "
                                                f"not scored"))
        if match is not None and (match.unmatched_dataset or match.ambiguous):
            details = ([f"annotation classes no model label has (always missed): {', '.join(match.unmatched_dataset)}"]
                       if match.unmatched_dataset else []) + list(match.ambiguous)
            section.alerts.append(Alert("warning", "Some annotation classes match no model label by name",
                                        details=details))
        if left_out:
            section.alerts.append(Alert("info", f"{left_out} detections of model labels the annotations lack "
                                                f"({', '.join((match.unmatched_model if match else [])[:8])}...) are "
                                                f"not scored"))

    def _class_table(self, section: Section, coco: Optional[Dict[str, Any]], curves: Dict[str, Any],
                     categories: List[Tuple[int, str]]) -> None:
        rows = []
        for cid, name in categories:
            entry = (coco or {}).get("per_class", {}).get(cid, {})
            curve = curves["classes"].get(cid) or {}
            best = curve.get("best")
            objects = entry.get("objects", curve.get("objects", 0))
            if not objects and not entry.get("detections"):
                continue
            rows.append([cid, name, _pct(entry.get("ap")), _pct(entry.get("ap50")), objects,
                         entry.get("detections", 0), "" if not best else f"{best['f1']:.3f} @ {best['threshold']:.2f}"])
        section.elements.append(Table(columns=["id", "class", "AP@[.5:.95]", "AP50", "objects", "detections",
                                               "best F1 @ score"], rows=rows,
                                      caption="Per class: COCO AP (101-point interpolation, 100 detections per "
                                              "image), objects (crowd / difficult left out), detections scored"))

    def _curve_figures(self, section: Section, coco: Optional[Dict[str, Any]], curves: Dict[str, Any],
                       categories: List[Tuple[int, str]], dpi: int) -> None:
        names = dict(categories)
        ranked = sorted(curves["classes"], key=lambda c: (-curves["classes"][c]["objects"], c))
        shown = [c for c in ranked if curves["classes"][c]["objects"]][: int(self.cfg.classes_shown)]
        if coco is not None and coco.get("pr_curves"):
            recall = np.asarray(coco["pr_curves"]["recall"])
            series = [(names[c], recall, np.asarray(coco["pr_curves"]["precision"][c]))
                      for c in shown if coco["pr_curves"]["precision"].get(c) is not None]
            if series:
                section.elements.append(plots.line_series(
                    series, name="detection_pr", xlabel="recall", ylabel="precision", dpi=dpi,
                    caption="Precision-recall per class at IoU 0.5 (COCOeval's 101 recall points; most objects "
                            "first)"))
        overall = curves["all"]
        if len(overall["thresholds"]):
            thresholds = np.asarray(overall["thresholds"], dtype=float)
            series = [(what, thresholds, np.nan_to_num(np.asarray(overall[what], dtype=float)))
                      for what in ("precision", "recall", "f1")]
            best = overall["best"]
            section.elements.append(plots.line_series(
                series, name="detection_f1", xlabel="score threshold", ylabel="value", dpi=dpi,
                marker=None if best is None else (best["threshold"], best["f1"]),
                caption=f"Precision, recall and F1 of every class together against the score threshold at IoU "
                        f"{self.cfg.iou_threshold}; the best F1 marked"))

    # --- what the detector looked at: a bounded second pass -----------------------------------------------------

    def _explanations(self, section: Section, paths: Sequence[str], names: List[str]) -> None:
        """Grad-CAM of each of the `cam_boxes` highest-scoring drawn detections (its score's gradient, as
        pytorch-grad-cam's FasterRCNNBoxScoreTarget, renormalised inside its box) and the image's EigenCAM, for the
        first `cam_images` gallery images, computed now (one forward per image, one backward per box)."""
        paths = _unique(paths)[: int(self.cfg.cam_images)]
        if not self.cfg.cam or not paths or not int(self.cfg.cam_boxes):
            return
        model = self.ctx.model
        if self.ctx.loaded.preprocess.crop_mode != "none":
            section.elements.append(Text("No detection CAMs: they are computed for detectors that take the image as "
                                         "decoded and resize inside (torchvision's); this one's input is resized "
                                         "before the model."))
            return
        layer, reason = ((select_layers(model, [self.cfg.cam_layer], "analysis.detection.cam_layer")[-1], "chosen")
                         if self.cfg.cam_layer else default_detection_layer(model))
        if layer is None:
            section.elements.append(Text(f"No detection CAMs: {reason} (analysis.detection.cam_layer=<module name> "
                                         f"sets the layer)."))
            return
        threshold, size = float(self.cfg.score_threshold), int(self.ctx.report.thumbnail_size) * 2
        images, wanted, kept = [], [], []
        for path in paths:
            pixels = decode_model_input(self.ctx, path)
            if pixels is None:
                continue
            raw = self.store[path]
            top = [i for i in np.argsort(-raw.scores, kind="stable") if raw.scores[i] >= threshold]
            top = top[: int(self.cfg.cam_boxes)]
            images.append(self.ctx.loaded.preprocess.normalize(pixels[None].to(self.ctx.device))[0])  # (C, H, W)
            wanted.append({"boxes": torch.as_tensor(raw.boxes[top]), "labels": torch.as_tensor(raw.labels[top])})
            kept.append((path, pixels, [(raw.boxes[i], int(raw.labels[i]), float(raw.scores[i])) for i in top]))
        if not images:
            return
        cost = SecondPassCost()
        grads = box_score_cams(model, images, wanted, layer, max_side=size, cost=cost)
        eigens = eigen_cams(model, images, layer, max_side=size, cost=cost)
        strips = []
        for (path, pixels, boxes), maps, eigen in zip(kept, grads, eigens):
            image = (pixels.repeat(3, 1, 1) if pixels.shape[0] == 1 else pixels).permute(1, 2, 0).numpy()
            thumb, scale = thumbnail_of(image, size)
            height, width = image.shape[:2]
            panels = [GalleryItem(image=draw_boxes(thumb, scale, [(b, f"{self._name(names, l)} {s:.2f}", "unscored")
                                                                  for b, l, s in boxes[::-1]]), title="detections")]
            for (box, label, score), cam in zip(boxes, maps):
                heat = renormalise_in_box(cam, box, (height, width), thumb.shape[:2])
                panels.append(GalleryItem(image=draw_boxes(overlay(thumb, heat), scale, [(box, "", "unscored")]),
                                          title=f"Grad-CAM: {self._name(names, label)} {score:.2f}",
                                          lines=[] if heat.any() else ["all zero (see the cost line)"]))
            panels.append(GalleryItem(image=heat_on_thumbnail(thumb, torch.from_numpy(eigen)), title="EigenCAM",
                                      lines=["first principal component of the layer"]))
            strips.append(ImageStrip(title=path, lines=[f"{len(boxes)} detections explained"], panels=panels))
        section.elements.append(Text(
            f"What the detector looked at, for the first {len(strips)} gallery images: Grad-CAM of each box's score "
            f"on {layer} ({reason}), renormalised inside the box, and EigenCAM of the whole image (gradient-free). "
            f"Computed after the pass, for these images only: {cost.text()}."))
        section.elements.extend(strips)

    # --- galleries ---------------------------------------------------------------------------------------------

    def _error_galleries(self, section: Section, labelled: Dict[str, ImageBoxes],
                         mapped: Dict[str, ImagePredictions], errors: Dict[str, Dict[str, Any]], truth: GroundTruth,
                         names: List[str], match: Any) -> None:
        size = int(self.cfg.gallery)
        false_kinds = FALSE_KINDS

        def wrong(p: str) -> int:
            counts = errors[p]["counts"]
            return sum(counts[k] for k in false_kinds) + counts["missed"]

        def top_fp(p: str) -> float:
            kinds = errors[p]["pred_kind"]
            scores = [float(s) for s, k in zip(mapped[p].scores, kinds) if k in false_kinds]
            return max(scores, default=0.0)

        paths = sorted(labelled)
        galleries = [
            ("Images with the most errors (false positives + missed objects)",
             sorted((p for p in paths if wrong(p)), key=lambda p: (-wrong(p), p))[:size]),
            ("Highest-scoring false positives", sorted((p for p in paths if top_fp(p) > 0),
                                                       key=lambda p: (-top_fp(p), p))[:size]),
            ("Missed objects", sorted((p for p in paths if errors[p]["counts"]["missed"]),
                                      key=lambda p: (-errors[p]["counts"]["missed"], p))[:size]),
            ("A spread of the labelled images", self._spread(paths))]
        dataset_names = truth.names
        for title, shown in galleries:
            if shown:
                self._gallery(section, title, shown, names, (labelled, mapped, errors, dataset_names), match)
        self._explanations(section, [p for _, shown in galleries for p in shown], names)

    def _spread(self, paths: List[str]) -> List[str]:
        count = min(int(self.cfg.gallery), len(paths))
        if not count:
            return []
        return [paths[i] for i in sorted({int(round(v)) for v in np.linspace(0, len(paths) - 1, count)})]

    def _gallery(self, section: Section, title: str, paths: List[str], names: List[str], scored: Any,
                 match: Any) -> None:
        """A gallery of `paths`, decoded again: the boxes drawn (at score >= score_threshold) on the thumbnail and,
        on click, on the whole image; `scored`: (labelled, mapped, errors, dataset names) with annotations."""
        threshold = float(self.cfg.score_threshold)
        items = []
        for path in paths:
            image = decode_original(self.ctx, path)  # (H, W, 3): the boxes are in its pixels
            if image is None:
                continue  # changed or removed since the pass: left out of the gallery
            thumb, scale = thumbnail_of(image, int(self.ctx.report.thumbnail_size) * 2)
            raw = self.store[path]
            lines = [f"{int((raw.scores >= threshold).sum())} detections with score >= {threshold}"]
            status = "neutral"
            if scored is None:
                preds = [(b, f"{self._name(names, int(l))} {s:.2f}", "unscored")
                         for b, s, l in zip(raw.boxes, raw.scores, raw.labels) if s >= threshold]
                truths = []
            else:
                labelled, mapped, errors, dataset_names = scored
                pred, found = mapped[path], errors[path]
                preds = [(b, f"{dataset_names.get(int(l), l)} {s:.2f}", k)
                         for b, s, l, k in zip(pred.boxes, pred.scores, pred.labels, found["pred_kind"])
                         if k != BELOW]
                gt = labelled[path]
                truths = [(b, str(dataset_names.get(int(l), l)), k == "missed")
                          for b, l, k in zip(gt.boxes, gt.labels, found["gt_kind"])]
                counts = found["counts"]
                false_pos = sum(counts[k] for k in FALSE_KINDS)
                lines.append(f"{counts['tp']} hits, {false_pos} false positives, {counts['missed']} missed of "
                             f"{int((~gt.ignore).sum())} objects")
                status = "bad" if false_pos or counts["missed"] else "ok"
            preds = preds[::-1]  # lowest score first, so the highest-scoring frame is drawn on top
            items.append(GalleryItem(image=draw_boxes(thumb, scale, preds, truths), title=path, lines=lines,
                                     status=status, full=draw_boxes(image, 1.0, preds, truths)))
        if items:
            section.elements.append(Gallery(title=title, items=items, note=(
                "Frames: " + ", ".join(COLOUR_WORDS[k] for k in KIND_COLOURS) + "; dashed: ground truth (white and "
                "thicker: missed). Click an image for its full size.")))


def _unique(paths: Sequence[str]) -> List[str]:
    return list(dict.fromkeys(paths))


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _plain(value: Any) -> Any:
    """JSON-ready: numpy numbers and arrays to Python, NaN to None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value
