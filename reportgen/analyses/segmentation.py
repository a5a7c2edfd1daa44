"""`segmentation`: how a semantic segmentation model does on the folder, against the user's masks when given.

Each image's logits are brought back to the image's own size (bilinear, as the libraries' post-processing does) and
argmaxed there, so every number is counted at the resolution the masks have. With `dataset.masks`, one confusion
matrix (rows: truth, columns: prediction) is accumulated over the folder, as torchvision's reference evaluation
does; it sums across batches and shards, so a merge equals the single run. From it: pixel accuracy, per-class
accuracy and IoU, mean IoU, frequency-weighted IoU. Per image: its own confusion gives "IoU over the classes present"
(mean over the classes in its mask or its prediction: a different number from the folder's mIoU), its pixel accuracy
and, per class, the pixels over-predicted (predicted c where the truth is not c) and under-predicted.
Without masks: the pixels and the images of each predicted class.

Galleries (image | truth | prediction | Grad-CAM of the classes predicted): the worst images by their IoU, a spread
of the folder, and per class the images where it is most over- and under-predicted. Candidates are kept in bounded
heaps during the pass (small thumbnails, masks at thumbnail size, the CAMs at the layer's resolution), so memory
does not grow with the folder; the CAMs are computed in the one pass, only for images that enter a gallery.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from reportgen.analyses._segmentation_cam import class_cams, default_cam_layer, top_predicted
from reportgen.analyses._segmentation_math import confusion, image_scores, metrics, predicted_shares, upsample_argmax
from reportgen.analyses.base import Analysis, Batch, Requirements, RunContext, register
from reportgen.analyses.gradcam import METHODS
from reportgen.engine.grids import spatial_layout
from reportgen.engine.layers import probe_output_shapes, select_layers
from reportgen.errors import ConfigError
from reportgen.inputs.masks import MaskFolder
from reportgen.inputs.tasks import adapt_outputs
from reportgen.report import plots
from reportgen.report.elements import Alert, GalleryItem, ImageStrip, KeyValues, Section, Table, Text
from reportgen.report.overlays import heat_on_thumbnail
from reportgen.report.segmentation_overlays import blend, class_colours, colourise, legend, resize_mask
from reportgen.state.reducers import BoundedTop
from reportgen.state.streams import CsvStream, absorb_csv

CSV_HEADER = ["path", "iou", "pixel_accuracy", "labelled", "classes_present", "classes_predicted"]
PROBLEMS_SHOWN = 50  # mask problems listed on the page (all of them are in segmentation.json)


@dataclass
class SegmentationConfig:
    worst: int = 12  # images in the gallery of the lowest per-image IoU (needs dataset.masks)
    spread: int = 8  # images spread evenly over the sorted file list
    per_class_images: int = 2  # per class: images where it is most over-predicted and most under-predicted
    classes_shown: int = 8  # classes with their own over/under galleries (most pixels first)
    cam: bool = True  # Grad-CAM of the predicted classes for the images shown
    cam_layer: Optional[str] = None  # null: the last feature map the scores depend on (see _segmentation_cam.py)
    cam_method: str = "gradcam"  # gradcam | gradcam++ | layercam | hirescam
    cam_classes: int = 3  # classes explained per gallery image (most predicted pixels first)
    chunk_classes: int = 16  # classes upsampled at once when bringing logits to the image's size (memory bound)


@register("segmentation")
class Segmentation(Analysis):
    Config = SegmentationConfig
    title = "Segmentation"
    layer_option = "analysis.segmentation.cam_layer"
    tasks = frozenset({"segmentation"})
    why_not = "it scores per-pixel class predictions, and they output none"

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        if cfg.cam_method not in METHODS:
            raise ConfigError("analysis.segmentation.cam_method", cfg.cam_method, "a CAM method", METHODS)
        for key in ("worst", "spread", "per_class_images", "classes_shown", "cam_classes"):
            if int(cfg[key]) < 0:
                raise ConfigError(f"analysis.segmentation.{key}", cfg[key], "a count >= 0")
        if int(cfg.chunk_classes) < 1:
            raise ConfigError("analysis.segmentation.chunk_classes", cfg.chunk_classes, "a count >= 1")

    def __init__(self, cfg: Any, ctx: RunContext):
        super().__init__(cfg, ctx)
        self.check_config(cfg)
        dataset = ctx.dataset
        self.masks_root = getattr(dataset, "masks", None) if dataset is not None else None
        self.ignore_index = int(getattr(dataset, "ignore_index", 255)) if dataset is not None else 255
        mapping = getattr(dataset, "mask_mapping", None) if dataset is not None else None
        self.mapping = {int(k): int(v) for k, v in dict(mapping).items()} if mapping else None
        self.num_classes = 0
        self.masks: Optional[MaskFolder] = None
        self.layer: Optional[str] = None
        self.layer_note = ""  # why there are no CAMs, when there are none
        self.channels_last = False
        self.conf: Optional[np.ndarray] = None  # (K, K) int64, rows truth, columns prediction
        self.pred_pixels: Optional[np.ndarray] = None  # (K,) every predicted pixel, labelled or not
        self.pred_images: Optional[np.ndarray] = None  # (K,) images in which each class is predicted
        self.images = 0
        self.labelled = 0
        self.problems: List[Tuple[str, str]] = []  # (path, reason) of masks not scored or scored with a warning
        self.refused = 0  # images whose mask exists but was not scored (wrong size, colour-coded, unreadable)
        self.worst = BoundedTop(int(cfg.worst))
        self.spread: Dict[int, dict] = {}
        self.spread_at: set = set()
        self.over: Dict[int, BoundedTop] = {}
        self.under: Dict[int, BoundedTop] = {}
        self.csv: Optional[CsvStream] = None
        self.cam_grid: Optional[Tuple[int, int]] = None

    # --- setup -------------------------------------------------------------------------------------------------

    def begin(self, example: Batch) -> None:
        model = self.ctx.model
        with torch.no_grad():
            logits = adapt_outputs("segmentation", model(example.inputs[:1]), 1).mask_logits  # (1, K, h, w)
        self.num_classes = int(logits.shape[1])
        self._init_state()
        if self.masks_root:
            self.masks = MaskFolder(Path(self.masks_root), self.ignore_index, self.mapping, self.num_classes)
        count = int(self.cfg.spread)
        if count:
            self.spread_at = set(np.unique(np.linspace(0, self.ctx.num_images - 1, count).round().astype(int)).tolist())
        if not self.cfg.cam:
            self.layer_note = "Grad-CAM switched off (analysis.segmentation.cam=false)."
            return
        if self.cfg.cam_layer:
            self.layer = select_layers(model, [self.cfg.cam_layer], "analysis.segmentation.cam_layer")[-1]
        else:
            self.layer = default_cam_layer(model, example.inputs, self.num_classes)
            if self.layer is None:
                self.layer_note = (f"No Grad-CAM: no layer of {type(model).__name__} outputs a feature map (B, C, h, "
                                   f"w) that the class scores depend on; choose one with "
                                   f"analysis.segmentation.cam_layer=<module name>.")
        if self.layer is not None:  # channels first or last as the image says (reportgen.engine.grids)
            probe = example.inputs[:1]
            shapes = [shape for name, shape in probe_output_shapes(model, probe) if name == self.layer]
            self.channels_last = bool(shapes) and spatial_layout(
                shapes[0], dict(model.named_modules())[self.layer], *probe.shape[-2:]) == "nhwc"

    def _init_state(self) -> None:
        k = self.num_classes
        if self.conf is None:
            self.conf = np.zeros((k, k), dtype=np.int64)
            self.pred_pixels = np.zeros(k, dtype=np.int64)
            self.pred_images = np.zeros(k, dtype=np.int64)

    def requires(self) -> Requirements:
        return Requirements(gradients=[self.layer]) if self.layer else Requirements()

    # --- the pass ----------------------------------------------------------------------------------------------

    def update(self, batch: Batch, outputs: Any, captures: Any) -> None:
        logits = outputs.mask_logits  # (B, K, h, w), with the graph from the CAM leaf when there is one
        if self.csv is None:
            self.csv = CsvStream(self.ctx.results_dir / "segmentation_images.csv", CSV_HEADER)
        if self.layer is not None and self.layer not in captures:
            raise ConfigError("analysis.segmentation.cam_layer", self.layer,
                              f"a layer called in every forward whose output is a plain tensor (B, C, h, w); it "
                              f"gave {captures.notes.get(self.layer, 'nothing')}")
        shown: List[Tuple[int, dict, List[int]]] = []  # (row, payload, classes whose CAMs it needs)
        for row, index in enumerate(batch.indices.tolist()):
            shown.extend(self._image(batch, row, index, logits[row].detach()))
        if self.layer is not None and shown:
            self._add_cams(logits, captures[self.layer], shown, len(batch.paths))
        for _, payload, _ in shown:
            payload.pop("_pending", None)

    def _image(self, batch: Batch, row: int, index: int, logits: torch.Tensor) -> List[Tuple[int, dict, List[int]]]:
        """Score one image, write its row, and offer it to the galleries; returns the payloads that entered one
        (they still need their CAMs)."""
        path = batch.paths[row]
        height, width = (int(v) for v in batch.sizes[row].tolist()) if batch.sizes is not None else logits.shape[1:]
        pred = upsample_argmax(logits.float(), (height, width), int(self.cfg.chunk_classes))  # (H, W) int64
        counts = predicted_shares(pred, self.num_classes).cpu().numpy()  # (K,)
        self.pred_pixels += counts
        self.pred_images += counts > 0
        self.images += 1
        truth = None
        if self.masks is not None:
            read = self.masks.read(path, (height, width))
            if read.problem:
                self.problems.append((path, read.problem))
            self.refused += int(read.fatal)
            truth = read.mask
        scores: Dict[str, Any] = {}
        if truth is not None:
            target = torch.as_tensor(truth, device=pred.device)
            image_conf = confusion(target, pred, self.num_classes, self.ignore_index).cpu().numpy()  # (K, K)
            self.conf += image_conf
            self.labelled += 1
            scores = image_scores(image_conf)
            scores["labelled_pixels"] = int(image_conf.sum())
            off_diagonal = image_conf - np.diag(np.diag(image_conf))
            scores["confused_as"] = off_diagonal.argmax(axis=1)  # (K,) where each class's missed pixels went most
        predicted_ids = [c for c in range(self.num_classes) if counts[c]]
        self.csv.writerow([path, _number(scores.get("iou")), _number(scores.get("pixel_accuracy")),
                           int(truth is not None), " ".join(map(str, scores.get("classes_present", []))),
                           " ".join(map(str, scores.get("classes_predicted", predicted_ids)))])
        return self._offer(batch, row, index, pred, truth, counts, scores)

    def _offer(self, batch: Batch, row: int, index: int, pred: torch.Tensor, truth: Optional[np.ndarray],
               counts: np.ndarray, scores: Dict[str, Any]) -> List[Tuple[int, dict, List[int]]]:
        """Put the image in every gallery that takes it (one shared payload); returns [(row, payload, classes)]."""
        wanted: List[Tuple[str, Any, float, int]] = []  # (gallery, key, score, class explained or -1)
        iou = scores.get("iou")
        if iou is not None and self.worst.accepts(1.0 - iou, index):
            wanted.append(("worst", None, 1.0 - iou, -1))
        if index in self.spread_at:
            wanted.append(("spread", None, 0.0, -1))
        per_class = int(self.cfg.per_class_images)
        if per_class and scores:
            pixels = max(1, int(scores["labelled_pixels"]))
            for c in np.flatnonzero(scores["false_positive"]).tolist():
                share = float(scores["false_positive"][c]) / pixels
                if self._top(self.over, c).accepts(share, index):
                    wanted.append(("over", c, share, c))
            for c in np.flatnonzero(scores["false_negative"]).tolist():
                share = float(scores["false_negative"][c]) / pixels
                if self._top(self.under, c).accepts(share, index):
                    wanted.append(("under", c, share, -1))
        elif per_class:  # no mask: the images where each class takes the largest share
            total = max(1, int(counts.sum()))
            for c in np.flatnonzero(counts).tolist():
                share = float(counts[c]) / total
                if self._top(self.over, c).accepts(share, index):
                    wanted.append(("over", c, share, c))
        if not wanted:
            return []
        payload = self._payload(batch, row, index, pred, truth, counts, scores)
        classes = top_predicted(torch.as_tensor(counts), int(self.cfg.cam_classes))
        for gallery, key, score, explained in wanted:
            if gallery == "worst":
                self.worst.push(score, index, payload)
            elif gallery == "spread":
                self.spread[index] = payload
            else:
                self._top(self.over if gallery == "over" else self.under, key).push(score, index, payload)
            if explained >= 0 and explained not in classes:
                classes.append(explained)
        payload["_pending"] = True
        return [(row, payload, classes)]

    def _top(self, tops: Dict[int, BoundedTop], cls: int) -> BoundedTop:
        if cls not in tops:
            tops[cls] = BoundedTop(int(self.cfg.per_class_images))
        return tops[cls]

    def _payload(self, batch: Batch, row: int, index: int, pred: torch.Tensor, truth: Optional[np.ndarray],
                 counts: np.ndarray, scores: Dict[str, Any]) -> dict:
        """What a gallery needs of one image: a thumbnail at the image's own aspect ratio, the masks brought to
        its size (nearest), the numbers for its caption."""
        height, width = pred.shape
        size = int(self.ctx.report.thumbnail_size)
        scale = min(1.0, size / max(height, width))
        thumb_size = (max(1, round(height * scale)), max(1, round(width * scale)))
        pixels = batch.images[row].permute(1, 2, 0).contiguous().numpy()  # (h, w, 3): the model's input
        thumb = np.asarray(Image.fromarray(pixels).resize(thumb_size[::-1], Image.BILINEAR))  # (th, tw, 3)
        small_pred = resize_mask(pred.cpu().numpy(), thumb_size).astype(np.int16)
        small_truth = None if truth is None else resize_mask(truth, thumb_size).astype(np.int16)
        return {"path": batch.paths[row], "index": index, "thumb": thumb, "pred": small_pred, "truth": small_truth,
                "iou": scores.get("iou"), "pixel_accuracy": scores.get("pixel_accuracy"),
                "fp": None if not scores else np.asarray(scores["false_positive"], dtype=np.int64),
                "fn": None if not scores else np.asarray(scores["false_negative"], dtype=np.int64),
                "confused_as": None if not scores else scores["confused_as"].astype(np.int64),
                "counts": counts.astype(np.int64), "size": (height, width), "cams": {}}

    def _add_cams(self, logits: torch.Tensor, activation: torch.Tensor, shown: List[Tuple[int, dict, List[int]]],
                  batch_size: int) -> None:
        classes: List[List[int]] = [[] for _ in range(batch_size)]
        for row, _, wanted in shown:
            classes[row] = wanted
        grid = (lambda t: t.permute(0, 3, 1, 2)) if self.channels_last else (lambda t: t)
        if activation.dim() != 4:
            raise ConfigError("analysis.segmentation.cam_layer", self.layer,
                              f"a layer whose output is a feature map (B, C, h, w); it outputs "
                              f"{tuple(activation.shape)}")
        maps = class_cams(logits, activation, grid, str(self.cfg.cam_method), classes)
        for row, payload, wanted in shown:
            payload["cams"] = {c: m.numpy().astype(np.float32) for c, m in zip(wanted, maps[row])}
            if maps[row]:
                self.cam_grid = tuple(maps[row][0].shape)

    # --- state -------------------------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        return {"num_classes": self.num_classes, "conf": self.conf, "pred_pixels": self.pred_pixels,
                "pred_images": self.pred_images, "images": self.images, "labelled": self.labelled,
                "refused": self.refused, "problems": list(self.problems), "worst": self.worst, "spread": dict(self.spread),
                "over": dict(self.over), "under": dict(self.under), "cam_grid": self.cam_grid,
                "csv": self.csv.ref() if self.csv is not None else None}

    def merge(self, state: Dict[str, Any]) -> None:
        self.num_classes = self.num_classes or int(state["num_classes"])
        self._init_state()
        if state["conf"] is not None:
            self.conf += state["conf"]
            self.pred_pixels += state["pred_pixels"]
            self.pred_images += state["pred_images"]
        self.images += state["images"]
        self.labelled += state["labelled"]
        self.refused += state["refused"]
        self.problems.extend(state["problems"])
        self.worst.merge(state["worst"])
        self.spread.update(state["spread"])
        for mine, theirs in ((self.over, state["over"]), (self.under, state["under"])):
            for cls, top in theirs.items():
                self._top(mine, cls).merge(top)
        self.cam_grid = self.cam_grid or state["cam_grid"]
        self.csv = absorb_csv(self.csv, state["csv"], self.ctx.results_dir / "segmentation_images.csv", CSV_HEADER)

    # --- the report --------------------------------------------------------------------------------------------

    def finalize(self) -> Optional[Section]:
        if self.csv is not None:
            self.csv.close()
        section = Section(id="segmentation", title="Segmentation")
        if not self.images:
            section.elements.append(Text("No image was processed, so there is nothing to score."))
            return section
        names = self._names()
        colours = class_colours(self.num_classes)
        scores = metrics(self.conf) if self.labelled else None
        self._write_files(scores, names)
        dpi = int(self.ctx.report.figure_dpi)
        if scores is not None:
            section.summary = (f"mIoU {_pct(scores['miou'])}, pixel accuracy {_pct(scores['pixel_accuracy'])} over "
                               f"{self.labelled} of {self.images} images with masks")
        else:
            section.summary = f"{self.images} images, no masks: predicted classes only"
        section.elements.append(KeyValues(self._facts(scores)))
        self._problem_alerts(section)
        if scores is not None:
            self._metric_elements(section, scores, names, dpi)
        else:
            self._prediction_elements(section, names, dpi)
        shown_classes = self._classes_on_page()
        section.elements.append(legend(names, colours, shown_classes, name="segmentation_legend", dpi=dpi))
        self._galleries(section, names, colours)
        return section

    def _names(self) -> List[str]:
        names = list(self.ctx.loaded.class_names or [])
        if len(names) != self.num_classes:
            names = [f"class {i}" for i in range(self.num_classes)]
        return names

    def _write_files(self, scores: Optional[Dict[str, Any]], names: List[str]) -> None:
        results = self.ctx.results_dir
        empty = {"miou": None, "pixel_accuracy": None, "mean_accuracy": None, "fw_iou": None, "labelled_pixels": 0,
                 "per_class": [{"iou": None, "accuracy": None, "pixels": 0, "predicted_pixels": None}
                               for _ in range(self.num_classes)]}
        data = dict(scores if scores is not None else empty)
        data["per_class"] = [dict(entry, name=names[c], predicted_pixels_all=int(self.pred_pixels[c]),
                                  predicted_images=int(self.pred_images[c]))
                             for c, entry in enumerate(data["per_class"])]
        data.update(images=self.images, labelled_images=self.labelled, class_names=names,
                    ignore_index=self.ignore_index, masks=str(self.masks_root) if self.masks_root else None,
                    mask_mapping={str(k): v for k, v in self.mapping.items()} if self.mapping else None,
                    problems=[{"path": p, "reason": r} for p, r in self.problems],
                    cam_layer=self.layer, cam_method=str(self.cfg.cam_method) if self.layer else None)
        (results / "segmentation.json").write_text(json.dumps(data, indent=1, allow_nan=False))
        np.save(results / "confusion_pixels.npy", self.conf)

    def _facts(self, scores: Optional[Dict[str, Any]]) -> List[Tuple[str, Any]]:
        facts: List[Tuple[str, Any]] = [("images", self.images), ("classes", self.num_classes)]
        if scores is not None:
            facts += [("images with masks", self.labelled), ("labelled pixels", f"{scores['labelled_pixels']:,}"),
                      ("mean IoU", f"{_pct(scores['miou'])} (mean over the classes in the masks or predicted)"),
                      ("pixel accuracy", _pct(scores["pixel_accuracy"])),
                      ("mean class accuracy", _pct(scores["mean_accuracy"])),
                      ("frequency-weighted IoU", _pct(scores["fw_iou"])),
                      ("ignored mask value", self.ignore_index)]
        facts.append(("how it is counted", "logits resized to each image's own size (bilinear), argmax there; one "
                                           "confusion matrix over every labelled pixel of the folder"))
        if self.layer:
            facts.append(("Grad-CAM", f"{self.cfg.cam_method} on {self.layer}"
                                      + (f" ({self.cam_grid[0]}×{self.cam_grid[1]})" if self.cam_grid else "")
                                      + "; score of class c: its logits summed over the pixels predicted as c"))
        return facts

    def _problem_alerts(self, section: Section) -> None:
        if self.masks is not None and self.labelled < self.images:
            missing = self.images - self.labelled - self.refused
            section.alerts.append(Alert("info" if not self.refused else "warning",
                                        f"{self.images - self.labelled} of {self.images} images are not scored: "
                                        f"{missing} without a mask file (unlabelled), {self.refused} whose mask was "
                                        f"refused (see the mask problems)"))
        if self.problems:
            section.alerts.append(Alert("warning", f"{len(self.problems)} mask problem(s): see the table below "
                                                   f"(all of them in segmentation.json)"))
            section.elements.append(Table(columns=["image", "mask problem"],
                                          rows=[[p, r] for p, r in self.problems[:PROBLEMS_SHOWN]]))
        if self.layer_note:
            section.elements.append(Text(self.layer_note))

    def _metric_elements(self, section: Section, scores: Dict[str, Any], names: List[str], dpi: int) -> None:
        per_class = scores["per_class"]
        rows = []
        for c, entry in enumerate(per_class):
            if not entry["pixels"] and not entry["predicted_pixels"]:
                continue
            rows.append([c, names[c], _pct(entry["iou"]), _pct(entry["accuracy"]), f"{entry['pixels']:,}",
                         f"{entry['predicted_pixels']:,}"])
        section.elements.append(Table(columns=["id", "class", "IoU", "accuracy", "pixels in masks",
                                               "pixels predicted (labelled)"], rows=rows,
                                      caption="Classes present in the masks or predicted; accuracy is the share of "
                                              "a class's labelled pixels predicted as it"))
        present = [c for c, entry in enumerate(per_class) if entry["iou"] is not None]
        if present:
            order = sorted(present, key=lambda c: (per_class[c]["iou"], c))
            section.elements.append(plots.horizontal_bars(
                [per_class[c]["iou"] for c in order], [names[c] for c in order], name="segmentation_iou",
                xlabel="IoU", xlim=(0.0, 1.0), dpi=dpi, highlight_below=0.5,
                caption="IoU per class (worst first; red: below 0.5)"))
        shown = sorted(present, key=lambda c: (-int(self.conf[c].sum() + self.conf[:, c].sum()), c))[:30]
        shown.sort()
        section.elements.append(plots.confusion_matrix(
            self.conf[np.ix_(shown, shown)], [names[c] for c in shown], [names[c] for c in shown],
            name="segmentation_confusion", dpi=dpi, ylabel="true (mask)",
            caption="Pixels, rows normalised: where each class's labelled pixels went"
                    + (" (the 30 classes with the most pixels)" if len(present) > 30 else "")))

    def _prediction_elements(self, section: Section, names: List[str], dpi: int) -> None:
        total = max(1, int(self.pred_pixels.sum()))
        order = [c for c in np.argsort(-self.pred_pixels, kind="stable").tolist() if self.pred_pixels[c]]
        section.elements.append(Table(columns=["id", "class", "share of pixels", "images"],
                                      rows=[[c, names[c], f"{self.pred_pixels[c] / total:.1%}",
                                             int(self.pred_images[c])] for c in order],
                                      caption="Predicted classes over every pixel of the folder (no masks given: "
                                              "set dataset.masks to score them)"))
        if order:
            section.elements.append(plots.horizontal_bars(
                [self.pred_pixels[c] / total for c in order], [names[c] for c in order], name="segmentation_shares",
                xlabel="share of predicted pixels", dpi=dpi, caption="Share of the folder's pixels per predicted class"))

    def _classes_on_page(self) -> List[int]:
        """The classes the legend lists: those in the masks or predicted."""
        seen = (self.conf.sum(axis=1) > 0) | (self.pred_pixels > 0)
        return np.flatnonzero(seen).tolist()

    def _galleries(self, section: Section, names: List[str], colours: np.ndarray) -> None:
        if self.worst.capacity and self.labelled:
            strips = [self._strip(p, names, colours) for _, _, p in self.worst.items()]
            if strips:
                section.elements.append(Text("Worst images (lowest IoU over the classes present first): image | "
                                             "mask | prediction | Grad-CAM of the predicted classes"))
                section.elements.extend(strips)
        if self.spread:
            section.elements.append(Text("A spread of the folder (evenly spaced in the sorted file list)"))
            section.elements.extend(self._strip(self.spread[i], names, colours) for i in sorted(self.spread))
        ranked = sorted(self.over.keys() | self.under.keys(),
                        key=lambda c: (-int(self.conf[c].sum() if self.labelled else self.pred_pixels[c]), c))
        for c in ranked[: int(self.cfg.classes_shown)]:
            for tops, what in ((self.over, "over-predicted"), (self.under, "under-predicted")):
                top = tops.get(c)
                if top is None or not len(top):
                    continue
                title = (f"{names[c]}: most {what}" if self.labelled
                         else f"{names[c]}: images where it takes the largest share")
                section.elements.append(Text(title))
                section.elements.extend(self._strip(p, names, colours, focus=c, what=what)
                                        for _, _, p in top.items())

    def _strip(self, payload: dict, names: List[str], colours: np.ndarray, focus: int = -1,
               what: str = "") -> ImageStrip:
        thumb = payload["thumb"]
        lines = [f"{payload['size'][1]}×{payload['size'][0]} px"]
        if payload["iou"] is not None:
            lines.append(f"IoU over the classes present {payload['iou']:.1%}, pixel accuracy "
                         f"{payload['pixel_accuracy']:.1%}")
        if focus >= 0 and payload["fp"] is not None:
            if what == "over-predicted":
                lines.append(f"{names[focus]}: {int(payload['fp'][focus]):,} pixels predicted where the mask says "
                             f"otherwise")
            else:
                lines.append(f"{names[focus]}: {int(payload['fn'][focus]):,} of its pixels missed, most of them "
                             f"predicted as {names[int(payload['confused_as'][focus])]}")
        panels = [GalleryItem(image=thumb, title="image")]
        if payload["truth"] is not None:
            truth = colourise(payload["truth"], colours, self.ignore_index)
            labelled = payload["truth"] != self.ignore_index  # ignored pixels: the image as it is
            panels.append(GalleryItem(image=blend(thumb, truth, where=labelled), title="mask",
                                      lines=[_class_list(payload["truth"], names, self.ignore_index)]))
        elif self.masks is not None:
            panels.append(GalleryItem(image=None, title="mask", lines=["no usable mask"]))
        predicted = colourise(payload["pred"], colours, self.ignore_index)
        panels.append(GalleryItem(image=blend(thumb, predicted), title="prediction",
                                  lines=[_class_list(payload["pred"], names, self.ignore_index)],
                                  status="neutral"))
        for c, cam in payload["cams"].items():
            if focus >= 0 and c != focus and what:
                continue
            panels.append(GalleryItem(image=heat_on_thumbnail(thumb, torch.from_numpy(cam)),
                                      title=f"Grad-CAM: {names[c]}",
                                      lines=[] if np.any(cam) else ["all zero: the score has no gradient here"]))
        return ImageStrip(title=payload["path"], lines=lines, panels=panels)


def _class_list(mask: np.ndarray, names: List[str], ignore_index: int, limit: int = 4) -> str:
    """The classes of a (thumbnail) mask, most pixels first."""
    values, counts = np.unique(mask[mask != ignore_index], return_counts=True)
    order = np.argsort(-counts, kind="stable")[:limit]
    listed = [names[int(values[i])] for i in order if 0 <= int(values[i]) < len(names)]
    return ", ".join(listed) + (" ..." if len(values) > limit else "")


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _number(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.6f}"
