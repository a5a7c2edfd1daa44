"""The numbers of object detection, as pure functions over per-image predictions and ground truth, plus the store
that keeps the predictions of a pass.

Mergeable state: detection metrics do not add up over images (AP needs every score of a class ranked together), so
the pass keeps every prediction compactly in a `DetectionStore` (24 bytes per detection: float32 xyxy box, float32
score, int32 label, plus 8 bytes and the escaped path per image; 100 detections on each of 10,000 images are
24 MB), stores of shards merge by concatenation, and every metric is computed once at the end from the store and
the ground truth (reportgen.inputs.annotations). The COCO evaluation then builds pycocotools' Python objects, about
1 KB per detection and per object for the time of the call.

Conventions shared by the functions below:
- boxes are xyxy in pixels of the original image; labels of predictions are the dataset's category ids (map a
  model's label ids first, reportgen.inputs.annotations.match_categories); predictions whose label is no category
  are not scored and are counted;
- `gt` is a mapping image -> ground truth (`.boxes`, `.labels`, `.ignore`, `.area`, as ImageBoxes) and `preds` a
  mapping image -> predictions (`.boxes`, `.scores`, `.labels`, as ImagePredictions or a DetectionStore); only the
  images in both are scored (a labelled image that failed to decode is not in `preds`, an unlabelled one not in
  `gt`);
- ignore regions (COCO `iscrowd`, VOC `difficult`) act as COCO crowd regions everywhere, since crowd is the only
  ignore flag COCOeval honours: a prediction of their class that matches no regular object but covers one by at
  least the IoU threshold, as intersection over the prediction's area (COCO's crowd IoU), is neither a hit nor a
  false positive, and they are never missed;
- a prediction is kept at a score threshold t when score >= t.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping as MappingABC
from typing import Any, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from reportgen.errors import ReportgenError

# the 12 numbers of COCOeval.summarize(), in its order; -1 (no ground truth in that area range) becomes None
STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
              "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")
SMALL_AREA, LARGE_AREA = 32 ** 2, 96 ** 2  # COCO's area buckets: small < 32², medium < 96², large >= 96² pixels
PRED_KINDS = ("tp", "duplicate", "wrong_class", "localization", "background", "ignored")  # see image_errors
BELOW = "below_threshold"  # kind of a prediction under the score threshold (not drawn, not counted)
BYTES_PER_DETECTION = 24  # DetectionStore: 16 (box) + 4 (score) + 4 (label)


class PycocotoolsMissing(ReportgenError, ImportError):
    """COCO evaluation was asked for without pycocotools installed."""


class ImagePredictions(NamedTuple):
    """The predictions of one image."""

    boxes: np.ndarray  # (N, 4) float32 xyxy pixels of the original image
    scores: np.ndarray  # (N,) float32
    labels: np.ndarray  # (N,) int64 dataset category ids


def as_predictions(boxes: Any, scores: Any, labels: Any) -> ImagePredictions:
    """ImagePredictions from arrays or tensors (any device), checking that the shapes agree."""
    boxes = _numpy(boxes).astype(np.float32).reshape(-1, 4)  # (N, 4)
    scores = _numpy(scores).astype(np.float32).reshape(-1)  # (N,)
    labels = _numpy(labels).astype(np.int64).reshape(-1)  # (N,)
    if not boxes.shape[0] == scores.shape[0] == labels.shape[0]:
        raise ValueError(f"boxes {boxes.shape}, scores {scores.shape} and labels {labels.shape} must describe the "
                         "same number of detections")
    return ImagePredictions(boxes, scores, labels)


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


class DetectionStore(MappingABC):
    """Every prediction of a pass, per image, in compact arrays: a read-only mapping image path -> ImagePredictions
    that `add` fills, `merge` combines across shards and `state_dict`/`from_state` save as plain arrays (npz).

    Detections whose box or score is not finite are dropped on `add` and counted in `nonfinite`, since no metric can
    rank or match them."""

    def __init__(self) -> None:
        self._paths: List[str] = []
        self._position: Dict[str, int] = {}
        self._counts: List[int] = []
        self._pending: List[Tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # per image, since the last pack
        self._blocks: List[Tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # packed (D, 4), (D,), (D,) arrays
        self._offsets: Optional[np.ndarray] = None  # (I + 1,) int64 start of each image in the packed arrays
        self.nonfinite = 0  # detections dropped on add for a non-finite box or score

    def add(self, image: str, boxes: Any, scores: Any, labels: Any) -> None:
        """Keeps the predictions of one image (an escaped path not added before)."""
        if image in self._position:
            raise ValueError(f"image {image!r} was already added to the detection store")
        pred = as_predictions(boxes, scores, labels)
        finite = np.isfinite(pred.boxes).all(axis=1) & np.isfinite(pred.scores)  # (N,) bool
        self.nonfinite += int((~finite).sum())
        if np.abs(pred.labels).max(initial=0) > np.iinfo(np.int32).max:
            raise ValueError(f"image {image!r}: label ids must fit 32 bits")
        self._position[image] = len(self._paths)
        self._paths.append(image)
        self._counts.append(int(finite.sum()))
        self._pending.append((pred.boxes[finite], pred.scores[finite], pred.labels[finite].astype(np.int32)))
        self._offsets = None
        if len(self._pending) >= 1024:
            self._pack()

    def merge(self, other: "DetectionStore") -> None:
        """Adds every image of another store (a shard); an image in both is an error, since shards are disjoint."""
        for image in other:
            if image in self._position:
                raise ValueError(f"image {image!r} is in both detection stores: shards must not overlap")
        for image in other:
            pred = other[image]
            self._position[image] = len(self._paths)
            self._paths.append(image)
            self._counts.append(len(pred.scores))
            self._pending.append((pred.boxes, pred.scores, pred.labels.astype(np.int32)))
        self.nonfinite += other.nonfinite
        self._offsets = None
        self._pack()

    def _pack(self) -> None:
        """Concatenates the per-image arrays added since the last pack into one block (fewer small objects)."""
        if self._pending:
            self._blocks.append(tuple(np.concatenate(parts) for parts in zip(*self._pending)))  # type: ignore
            self._pending = []

    def _packed(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(boxes (D, 4), scores (D,), labels (D,) int32, offsets (I + 1,)), all images in insertion order."""
        self._pack()
        if len(self._blocks) != 1:
            if self._blocks:
                self._blocks = [tuple(np.concatenate(parts) for parts in zip(*self._blocks))]  # type: ignore
            else:
                self._blocks = [(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32))]
        if self._offsets is None:
            self._offsets = np.concatenate([[0], np.cumsum(self._counts, dtype=np.int64)])
        return (*self._blocks[0], self._offsets)

    def __getitem__(self, image: str) -> ImagePredictions:
        index = self._position[image]
        boxes, scores, labels, offsets = self._packed()
        start, stop = offsets[index], offsets[index + 1]
        return ImagePredictions(boxes[start:stop], scores[start:stop], labels[start:stop].astype(np.int64))

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    @property
    def detections(self) -> int:
        """Number of detections kept."""
        return int(sum(self._counts))

    def state_dict(self) -> Dict[str, np.ndarray]:
        """Plain arrays (for np.savez): paths (I,) str, counts (I,) int64, boxes (D, 4) float32, scores (D,)
        float32, labels (D,) int32, nonfinite () int64."""
        boxes, scores, labels, _ = self._packed()
        return {"paths": np.array(self._paths, dtype=str), "counts": np.array(self._counts, dtype=np.int64),
                "boxes": boxes, "scores": scores, "labels": labels, "nonfinite": np.array(self.nonfinite)}

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray]) -> "DetectionStore":
        """The store `state_dict` described."""
        store = cls()
        counts = np.asarray(state["counts"], dtype=np.int64)
        if len(state["paths"]) != len(counts) or int(counts.sum()) != len(state["scores"]):
            raise ValueError("detection store state: paths, counts and detections do not agree")
        store._paths = [str(p) for p in state["paths"]]
        store._position = {p: i for i, p in enumerate(store._paths)}
        store._counts = [int(c) for c in counts]
        store._blocks = [(np.asarray(state["boxes"], np.float32).reshape(-1, 4),
                          np.asarray(state["scores"], np.float32), np.asarray(state["labels"], np.int32))]
        store.nonfinite = int(state.get("nonfinite", 0))
        return store


# ---------------------------------------------------------------------------------------------------- geometry


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) and (M, 4) xyxy -> (N, M) float64 intersection over union (0 where the union is empty)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    inter = _intersection(a, b)  # (N, M)
    union = _area(a)[:, None] + _area(b)[None, :] - inter  # (N, M)
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def box_ioa(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) and (M, 4) xyxy -> (N, M) float64 intersection over the area of each box of `a`: COCO's IoU of a
    detection `a` with a crowd region `b`."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    inter = _intersection(a, b)  # (N, M)
    area = np.broadcast_to(_area(a)[:, None], inter.shape)  # (N, M)
    return np.divide(inter, area, out=np.zeros_like(inter), where=area > 0)


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])  # (N, M, 2)
    size = np.clip(bottom_right - top_left, 0, None)  # (N, M, 2)
    return size[..., 0] * size[..., 1]


def _area(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)  # (N,)


# ------------------------------------------------------------------------------------------------ COCO metrics


def _pycocotools():
    """(COCO, COCOeval), or PycocotoolsMissing saying how to install them."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:
        raise PycocotoolsMissing(
            f"COCO detection metrics need pycocotools ({exc}): pip install 'reportgen[detection]'") from exc
    return COCO, COCOeval


def coco_evaluate(gt: Mapping[str, Any], preds: Mapping[str, Any],
                  categories: Sequence[Tuple[int, str]]) -> Dict[str, Any]:
    """COCO bbox evaluation by pycocotools' COCOeval, on COCO objects built in memory (no files).

    Images: those in both `gt` and `preds`, numbered 1.. in sorted path order; every category of `categories` is
    evaluated (ids as the dataset has them). Ground-truth `area` is passed as given (COCO files carry the mask's
    area, which decides small/medium/large), `ignore` as `iscrowd`. Returns:
    - `stats`: {name: float or None} for STAT_NAMES (COCOeval.stats; -1 -> None), and `stats_raw`: the 12 floats;
    - `per_class`: {category id: {"name", "ap" (AP@[.5:.95]), "ap50", "objects" (non-ignored ground truth),
      "detections"}}: the mean over the valid entries (> -1) of eval["precision"][T, R, k, area all, maxDets 100]
      and of its IoU-0.5 slice; None where the class has no ground truth;
    - `pr_curves`: {"recall": (101,) recall thresholds, "precision": {category id: (101,) float64 or None},
      "scores": {category id: (101,) or None}}: eval["precision"] / ["scores"] at IoU 0.5, area all, 100 dets;
    - `images`, `detections` (scored), `unscored_detections` (labels that are no category).
    """
    images = sorted(set(gt) & set(preds))
    category_ids = [int(c) for c, _ in categories]
    known = set(category_ids)
    gt_annotations, detections = [], []
    unscored = 0
    for image_id, image in enumerate(images, start=1):
        truth = gt[image]
        if getattr(truth, "normalized", False):
            raise ValueError(f"ground truth of {image!r} is still normalised: resolve it with the image sizes")
        for box, label, ignore, area in zip(np.asarray(truth.boxes, np.float64).reshape(-1, 4), truth.labels,
                                            truth.ignore, truth.area):
            x1, y1, x2, y2 = (float(v) for v in box)
            gt_annotations.append({"id": len(gt_annotations) + 1, "image_id": image_id, "category_id": int(label),
                                   "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(area),
                                   "iscrowd": int(bool(ignore))})
        pred = preds[image]
        for box, score, label in zip(np.asarray(pred.boxes).reshape(-1, 4), pred.scores, pred.labels):
            if int(label) not in known:
                unscored += 1
                continue
            x1, y1, x2, y2 = (float(v) for v in box)
            detections.append({"image_id": image_id, "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1],
                               "score": float(score)})
    COCO, COCOeval = _pycocotools()
    result: Dict[str, Any] = {"images": len(images), "detections": len(detections), "unscored_detections": unscored}
    if not images:
        return {**result, "stats": {name: None for name in STAT_NAMES}, "stats_raw": [-1.0] * len(STAT_NAMES),
                "per_class": {}, "pr_curves": None}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress on every step
        coco_gt = COCO()
        coco_gt.dataset = {"images": [{"id": i} for i in range(1, len(images) + 1)],
                           "categories": [{"id": int(c), "name": str(n)} for c, n in categories],
                           "annotations": gt_annotations}
        coco_gt.createIndex()
        if detections:
            coco_dt = coco_gt.loadRes(detections)
        else:  # loadRes reads its first entry: an empty result set is built as it would build it
            coco_dt = COCO()
            coco_dt.dataset = {"images": list(coco_gt.dataset["images"]),
                               "categories": list(coco_gt.dataset["categories"]), "annotations": []}
            coco_dt.createIndex()
        evaluation = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {**result, **_read_eval(evaluation, categories, gt_annotations, detections)}


def _read_eval(evaluation: Any, categories: Sequence[Tuple[int, str]], gt_annotations: List[Dict[str, Any]],
               detections: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The stats, per-class AP and PR curves of an accumulated COCOeval."""
    precision = evaluation.eval["precision"]  # (T, R, K, A, M): IoU, recall, category, area, maxDets
    scores = evaluation.eval["scores"]  # (T, R, K, A, M)
    raw = [float(v) for v in evaluation.stats]
    order = {int(c): k for k, c in enumerate(evaluation.params.catIds)}
    objects: Dict[int, int] = {}
    for ann in gt_annotations:
        if not ann["iscrowd"]:
            objects[ann["category_id"]] = objects.get(ann["category_id"], 0) + 1
    counts: Dict[int, int] = {}
    for det in detections:
        counts[det["category_id"]] = counts.get(det["category_id"], 0) + 1
    per_class, curves, curve_scores = {}, {}, {}
    for cid, name in categories:
        k = order[int(cid)]
        every = precision[:, :, k, 0, -1]  # (T, R) area all, 100 detections
        at_50 = precision[0, :, k, 0, -1]  # (R,)
        present = bool((at_50 > -1).any())
        per_class[int(cid)] = {"name": str(name), "ap": _valid_mean(every), "ap50": _valid_mean(at_50),
                               "objects": objects.get(int(cid), 0), "detections": counts.get(int(cid), 0)}
        curves[int(cid)] = at_50.astype(np.float64) if present else None
        curve_scores[int(cid)] = scores[0, :, k, 0, -1].astype(np.float64) if present else None
    return {"stats": {n: (None if v == -1 else v) for n, v in zip(STAT_NAMES, raw)}, "stats_raw": raw,
            "per_class": per_class,
            "pr_curves": {"recall": np.asarray(evaluation.params.recThrs, np.float64), "precision": curves,
                          "scores": curve_scores}}


def _valid_mean(values: np.ndarray) -> Optional[float]:
    """Mean of the entries > -1 (COCOeval's 'absent'), as COCOeval.summarize averages; None when there is none."""
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else None


# -------------------------------------------------------------------------------------------- greedy matching


class _Match(NamedTuple):
    gt_of: np.ndarray  # (D,) int64 index of the ground truth each prediction hit, -1 if none
    ignored: np.ndarray  # (D,) bool: prediction on an ignore region of its class (neither hit nor miss)
    iou: np.ndarray  # (D, G) float64 IoU of every prediction with every ground-truth box


def _match(truth: Any, pred: Any, iou_threshold: float) -> _Match:
    """COCO-style greedy matching in one image, class by class: predictions by descending score (stable on ties),
    each takes the unmatched regular object of its class with the highest IoU >= the threshold (the first on ties);
    one that finds none but covers an ignore region of its class (box_ioa >= the threshold) is ignored."""
    gt_boxes = np.asarray(truth.boxes, np.float64).reshape(-1, 4)
    gt_labels, gt_ignore = np.asarray(truth.labels).reshape(-1), np.asarray(truth.ignore, bool).reshape(-1)
    boxes, scores, labels = np.asarray(pred.boxes).reshape(-1, 4), np.asarray(pred.scores), np.asarray(pred.labels)
    iou = box_iou(boxes, gt_boxes)  # (D, G)
    ioa = box_ioa(boxes, gt_boxes)  # (D, G)
    same = labels[:, None] == gt_labels[None, :]  # (D, G) bool
    taken = np.zeros(len(gt_labels), dtype=bool)  # (G,)
    gt_of = np.full(len(labels), -1, dtype=np.int64)  # (D,)
    ignored = np.zeros(len(labels), dtype=bool)  # (D,)
    for d in np.argsort(-scores, kind="stable"):
        candidates = np.where(same[d] & ~gt_ignore & ~taken, iou[d], -1.0)  # (G,)
        if candidates.size and candidates.max() >= iou_threshold:
            g = int(np.argmax(candidates))
            gt_of[d], taken[g] = g, True
        elif (same[d] & gt_ignore & (ioa[d] >= iou_threshold)).any():
            ignored[d] = True
    return _Match(gt_of, ignored, iou)


# ------------------------------------------------------------------------------------ precision, recall and F1


def pr_curves(gt: Mapping[str, Any], preds: Mapping[str, Any], categories: Sequence[Tuple[int, str]],
              iou_threshold: float = 0.5, thresholds: Optional[Sequence[float]] = None) -> Dict[str, Any]:
    """Precision, recall and F1 against the score threshold, per class and over all classes (micro: every
    prediction and object together), from the greedy matching of `_match` at `iou_threshold`.

    Greedy matching in score order means the predictions kept at a threshold t match exactly as the first ones of
    the full matching, so one matching gives the whole curve. `thresholds`: the score thresholds to report (None:
    every distinct score, descending). Each curve: {"thresholds", "precision", "recall", "f1", "tp", "fp" (arrays
    over the thresholds), "objects" (regular ground truth), "best": {"threshold", "precision", "recall", "f1"} at
    the highest F1 (the highest threshold on ties) or None}. Precision is NaN where no prediction is kept, recall
    NaN where the class has no object. Returns {"classes": {category id: curve}, "all": curve, "images",
    "unscored_detections", "iou_threshold"}. Unlike COCOeval nothing is capped at 100 detections per image.
    """
    ids = [int(c) for c, _ in categories]
    known = set(ids)
    found: Dict[int, List[Tuple[np.ndarray, np.ndarray]]] = {c: [] for c in ids}  # class -> (scores, hit) parts
    objects = {c: 0 for c in ids}
    images = sorted(set(gt) & set(preds))
    unscored = 0
    for image in images:
        truth, pred = gt[image], _scored(preds[image], known)
        unscored += len(preds[image].labels) - len(pred.labels)
        match = _match(truth, pred, iou_threshold)
        regular = ~np.asarray(truth.ignore, bool)
        for c in ids:
            objects[c] += int((np.asarray(truth.labels)[regular] == c).sum())
            mine = (pred.labels == c) & ~match.ignored  # (D,) bool
            found[c].append((pred.scores[mine], match.gt_of[mine] >= 0))
    curves = {c: _curve(*_joined(found[c]), objects[c], thresholds) for c in ids}
    every = _joined([part for c in ids for part in found[c]])
    return {"classes": curves, "all": _curve(*every, sum(objects.values()), thresholds), "images": len(images),
            "unscored_detections": unscored, "iou_threshold": iou_threshold}


def _scored(pred: Any, known: set) -> ImagePredictions:
    """The predictions whose label is a category."""
    labels = np.asarray(pred.labels, np.int64).reshape(-1)
    keep = np.isin(labels, list(known))  # (D,) bool
    return ImagePredictions(np.asarray(pred.boxes).reshape(-1, 4)[keep], np.asarray(pred.scores).reshape(-1)[keep],
                            labels[keep])


def _joined(parts: List[Tuple[np.ndarray, np.ndarray]]) -> Tuple[np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros(0), np.zeros(0, bool)
    return np.concatenate([p[0] for p in parts]).astype(np.float64), np.concatenate([p[1] for p in parts])


def _curve(scores: np.ndarray, hit: np.ndarray, objects: int,
           thresholds: Optional[Sequence[float]]) -> Dict[str, Any]:
    """The curve of one set of (score, hit) predictions against `objects` regular ground-truth boxes."""
    order = np.argsort(-scores, kind="stable")
    scores, hit = scores[order], hit[order]  # (D,) descending
    tp_cum = np.cumsum(hit)  # (D,)
    if thresholds is None:
        last = np.r_[scores[1:] != scores[:-1], True] if scores.size else np.zeros(0, bool)  # end of each tie run
        levels = scores[last]  # (T,) descending distinct scores
        kept = np.flatnonzero(last) + 1  # (T,) predictions kept at each level
    else:
        levels = np.asarray(thresholds, np.float64).reshape(-1)
        kept = np.searchsorted(-scores, -levels, side="right")  # (T,) count of scores >= each threshold
    tp = np.where(kept > 0, tp_cum[np.maximum(kept - 1, 0)] if scores.size else 0, 0).astype(np.int64)  # (T,)
    fp = (kept - tp).astype(np.int64)  # (T,)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(kept > 0, tp / np.maximum(kept, 1), np.nan)
        recall = np.full(len(levels), np.nan) if objects == 0 else tp / objects
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        f1 = np.where(np.isnan(precision) | np.isnan(recall), np.nan, f1)
    best = None
    if np.isfinite(f1).any():
        top = np.nanmax(f1)
        candidates = np.flatnonzero(f1 == top)
        i = int(candidates[np.argmax(levels[candidates])])
        best = {"threshold": float(levels[i]), "precision": float(precision[i]), "recall": float(recall[i]),
                "f1": float(f1[i])}
    return {"thresholds": levels, "precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp,
            "objects": int(objects), "best": best}


# ---------------------------------------------------------------------------------------------- confusion matrix


def confusion_matrix(gt: Mapping[str, Any], preds: Mapping[str, Any], categories: Sequence[Tuple[int, str]],
                     score_threshold: float = 0.5, iou_threshold: float = 0.5) -> Dict[str, Any]:
    """Object-level confusion with a background row and column (the convention of the Ultralytics and
    TensorFlow Object Detection API confusion matrices), at `iou_threshold`.

    In each image, the predictions with score >= `score_threshold` are matched to the regular ground-truth boxes by
    IoU >= `iou_threshold` whatever their classes, greedily by descending IoU (ties: higher score, then lower box
    index), each box at most once. A matched pair counts (ground-truth class, predicted class): the diagonal is
    right, off-diagonal a class confusion. An unmatched object counts (class, background): missed. An unmatched
    prediction counts (background, class): a false positive, unless it covers an ignore region of its class
    (box_ioa >= the threshold), when it is not counted. Predictions whose label is no category are not counted.

    Returns {"matrix": (K + 1, K + 1) int64, rows = ground truth, columns = prediction, index K = background
    (the background-background cell is always 0), "ids": K category ids then None, "names": K names then
    "background", "ignored" (predictions on ignore regions), "unscored_detections", "images", "score_threshold",
    "iou_threshold"}.
    """
    ids = [int(c) for c, _ in categories]
    index = {c: k for k, c in enumerate(ids)}
    k_bg = len(ids)
    matrix = np.zeros((k_bg + 1, k_bg + 1), dtype=np.int64)
    images = sorted(set(gt) & set(preds))
    ignored = unscored = 0
    for image in images:
        truth = gt[image]
        pred = _scored(preds[image], set(ids))
        unscored += len(preds[image].labels) - len(pred.labels)
        keep = pred.scores >= score_threshold
        boxes, scores, labels = pred.boxes[keep], pred.scores[keep], pred.labels[keep]
        regular = ~np.asarray(truth.ignore, bool).reshape(-1)  # (N,)
        gt_boxes = np.asarray(truth.boxes, np.float64).reshape(-1, 4)
        gt_labels = np.asarray(truth.labels, np.int64).reshape(-1)
        object_labels = gt_labels[regular]  # (G,)
        iou = box_iou(gt_boxes[regular], boxes)  # (G, D)
        g_idx, d_idx = np.nonzero(iou >= iou_threshold)
        order = np.lexsort((g_idx, -scores[d_idx], -iou[g_idx, d_idx]))  # by IoU, then score, then box
        gt_done = np.zeros(iou.shape[0], bool)
        pred_done = np.zeros(iou.shape[1], bool)
        for g, d in zip(g_idx[order], d_idx[order]):
            if not gt_done[g] and not pred_done[d]:
                gt_done[g] = pred_done[d] = True
                matrix[index[int(object_labels[g])], index[int(labels[d])]] += 1
        for g in np.flatnonzero(~gt_done):
            matrix[index[int(object_labels[g])], k_bg] += 1
        ioa = box_ioa(boxes, gt_boxes[~regular])  # (D, I)
        on_ignore = ((labels[:, None] == gt_labels[~regular][None, :]) & (ioa >= iou_threshold)).any(axis=1)
        for d in np.flatnonzero(~pred_done):
            if on_ignore[d]:
                ignored += 1
            else:
                matrix[k_bg, index[int(labels[d])]] += 1
    return {"matrix": matrix, "ids": ids + [None], "names": [str(n) for _, n in categories] + ["background"],
            "ignored": ignored, "unscored_detections": unscored, "images": len(images),
            "score_threshold": score_threshold, "iou_threshold": iou_threshold}


# ------------------------------------------------------------------------------------------- per-image errors


def image_errors(truth: Any, pred: Any, score_threshold: float, iou_threshold: float = 0.5,
                 background_iou: float = 0.1) -> Dict[str, Any]:
    """What each box of one image is, at a score threshold, for a gallery to draw (a simple TIDE-like split,
    Bolya et al. 2020, with its thresholds: foreground IoU 0.5, background IoU 0.1).

    The predictions kept (score >= `score_threshold`) are matched as `_match` does (per class, by score); a kept
    prediction is then the first that applies of:
    - "tp": it matched an object of its class;
    - "ignored": it covers an ignore region of its class;
    - "duplicate": IoU >= `iou_threshold` with an object of its class already matched by a higher-scored box;
    - "wrong_class": IoU >= `iou_threshold` with an object of another class;
    - "localization": best IoU with any object in [`background_iou`, `iou_threshold`) (poor localisation, of its
      class or another: TIDE's 'both' error is folded in here);
    - "background": IoU < `background_iou` with every object.
    An object is "matched" (a tp hit it), "missed", or "ignored" (an ignore region); a missed object may still be
    the one a wrong_class or localization box was aimed at (see pred_gt).

    Returns {"pred_kind": list of str per prediction in input order (BELOW for those under the threshold),
    "pred_gt": (D,) int64 the object each box is judged against (tp: matched; duplicate: the matched object of its
    class with the highest IoU; wrong_class: the other-class object with the highest IoU; localization: the object
    with the highest IoU; else -1), "gt_kind": list of str per object, "gt_pred": (G,) int64 matched prediction or
    -1, "counts": {kind: n for PRED_KINDS, "missed": n}}. Labels are compared as given (no category filter).
    """
    boxes = np.asarray(pred.boxes).reshape(-1, 4)
    scores, labels = np.asarray(pred.scores).reshape(-1), np.asarray(pred.labels, np.int64).reshape(-1)
    gt_labels = np.asarray(truth.labels, np.int64).reshape(-1)
    gt_ignore = np.asarray(truth.ignore, bool).reshape(-1)
    kept = np.flatnonzero(scores >= score_threshold)  # (d,) input positions of the kept predictions
    match = _match(truth, ImagePredictions(boxes[kept], scores[kept], labels[kept]), iou_threshold)
    pred_kind = [BELOW] * len(labels)
    pred_gt = np.full(len(labels), -1, dtype=np.int64)
    gt_pred = np.full(len(gt_labels), -1, dtype=np.int64)
    matched = np.zeros(len(gt_labels), bool)
    matched[match.gt_of[match.gt_of >= 0]] = True
    for j, d in enumerate(kept):
        iou = np.where(gt_ignore, -1.0, match.iou[j])  # (G,) regular objects only
        same = gt_labels == labels[d]  # (G,) bool
        if match.gt_of[j] >= 0:
            kind, target = "tp", int(match.gt_of[j])
            gt_pred[target] = d
        elif match.ignored[j]:
            kind, target = "ignored", -1
        elif (hits := np.where(same & matched & (iou >= iou_threshold), iou, -1.0)).max(initial=-1) >= 0:
            kind, target = "duplicate", int(np.argmax(hits))
        elif (hits := np.where(~same & (iou >= iou_threshold), iou, -1.0)).max(initial=-1) >= 0:
            kind, target = "wrong_class", int(np.argmax(hits))
        elif iou.max(initial=-1) >= background_iou:
            kind, target = "localization", int(np.argmax(iou))
        else:
            kind, target = "background", -1
        pred_kind[d], pred_gt[d] = kind, target
    gt_kind = ["ignored" if gt_ignore[g] else "matched" if matched[g] else "missed" for g in range(len(gt_labels))]
    counts = {kind: pred_kind.count(kind) for kind in PRED_KINDS}
    counts["missed"] = gt_kind.count("missed")
    return {"pred_kind": pred_kind, "pred_gt": pred_gt, "gt_kind": gt_kind, "gt_pred": gt_pred, "counts": counts}


def error_totals(gt: Mapping[str, Any], preds: Mapping[str, Any], score_threshold: float,
                 iou_threshold: float = 0.5, background_iou: float = 0.1) -> Dict[str, int]:
    """The `counts` of image_errors summed over the images in both `gt` and `preds`."""
    totals = {kind: 0 for kind in PRED_KINDS + ("missed",)}
    for image in sorted(set(gt) & set(preds)):
        counts = image_errors(gt[image], preds[image], score_threshold, iou_threshold, background_iou)["counts"]
        for kind, n in counts.items():
            totals[kind] += n
    return totals


# ----------------------------------------------------------------------------------- without ground truth


def prediction_stats(preds: Mapping[str, Any], score_threshold: float = 0.0, score_bins: int = 20) -> Dict[str, Any]:
    """What a detector predicts on a folder, with no ground truth needed.

    `score_histogram` counts EVERY stored detection in `score_bins` equal bins over [0, 1] (the last bin closed;
    scores outside [0, 1] counted apart), so the threshold can be chosen from it; everything else counts the
    detections with score >= `score_threshold`: `per_class` {label: n}, `boxes_per_image` {"histogram": (M + 1,)
    int64 number of images with 0..M boxes, "mean", "max"}, `sizes` {"small", "medium", "large"} by box area in
    pixels (COCO's buckets: < 32², < 96², larger) and `sizes_per_class` {label: {bucket: n}}.
    """
    edges = np.linspace(0.0, 1.0, score_bins + 1)
    histogram = np.zeros(score_bins, dtype=np.int64)
    below = above = 0
    per_class: Dict[int, int] = {}
    sizes = {"small": 0, "medium": 0, "large": 0}
    sizes_per_class: Dict[int, Dict[str, int]] = {}
    per_image = []
    for image in preds:
        pred = preds[image]
        scores = np.asarray(pred.scores, np.float64).reshape(-1)
        histogram += np.histogram(scores, bins=edges)[0]
        below += int((scores < 0).sum())
        above += int((scores > 1).sum())
        keep = scores >= score_threshold
        labels = np.asarray(pred.labels, np.int64).reshape(-1)[keep]
        area = _area(np.asarray(pred.boxes, np.float64).reshape(-1, 4)[keep])  # (n,)
        per_image.append(int(keep.sum()))
        bucket = np.where(area < SMALL_AREA, 0, np.where(area < LARGE_AREA, 1, 2))  # (n,)
        for label, b in zip(labels.tolist(), bucket.tolist()):
            name = ("small", "medium", "large")[b]
            per_class[label] = per_class.get(label, 0) + 1
            sizes[name] += 1
            sizes_per_class.setdefault(label, {"small": 0, "medium": 0, "large": 0})[name] += 1
    counts = np.asarray(per_image, dtype=np.int64)
    return {"images": len(per_image), "detections": int(counts.sum()), "score_threshold": score_threshold,
            "score_histogram": {"edges": edges, "counts": histogram, "below_0": below, "above_1": above},
            "per_class": dict(sorted(per_class.items())),
            "boxes_per_image": {"histogram": np.bincount(counts, minlength=1),
                                "mean": float(counts.mean()) if counts.size else None,
                                "max": int(counts.max()) if counts.size else None},
            "sizes": sizes, "sizes_per_class": dict(sorted(sizes_per_class.items()))}
