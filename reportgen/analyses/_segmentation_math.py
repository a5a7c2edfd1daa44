"""The numbers of semantic segmentation, as pure functions: labels from logits at the image's size, confusion
counts, and the metrics torchvision's reference evaluation reports (references/segmentation/utils.py,
`ConfusionMatrix`), made defined where that one gives NaN.

Confusion matrices are the mergeable state: they add up over images, batches and shards, and every metric is
computed from the sum at the end.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F


def upsample_argmax(logits: torch.Tensor, size: Tuple[int, int], chunk: int = 16) -> torch.Tensor:
    """(K, h, w) logits -> (H, W) int64 labels: argmax over classes of the logits bilinearly resized to `size` =
    (H, W) (align_corners=False, as torchvision's segmentation references and models do), in float32.

    Only `chunk` classes are resized at a time, so memory is chunk * H * W floats instead of K * H * W (150 classes
    at 2048x1024 would be 1.2 GB). Bilinear resizing treats each channel on its own, so the chunks give the same
    values; ties go to the lowest class index and NaN counts as the maximum, exactly as torch.argmax of the whole
    resized tensor (a later chunk wins only where it is strictly greater, or NaN over a number)."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be (K, h, w), got shape {tuple(logits.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    size = (int(size[0]), int(size[1]))
    best_value: Optional[torch.Tensor] = None  # (H, W) float32
    best_index: Optional[torch.Tensor] = None  # (H, W) int64
    for start in range(0, logits.shape[0], chunk):
        part = logits[start:start + chunk].float()[None]  # (1, c, h, w)
        resized = F.interpolate(part, size=size, mode="bilinear", align_corners=False)[0]  # (c, H, W)
        value, index = resized.max(dim=0)  # (H, W) each; first maximum within the chunk, NaN wins
        index = index + start
        if best_value is None:
            best_value, best_index = value, index
            continue
        wins = (value > best_value) | (torch.isnan(value) & ~torch.isnan(best_value))  # (H, W) bool
        best_value = torch.where(wins, value, best_value)
        best_index = torch.where(wins, index, best_index)
    if best_index is None:
        raise ValueError("logits have no classes (K = 0)")
    return best_index


def confusion(target: torch.Tensor, pred: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(K, K) int64 pixel counts, rows = ground truth, columns = prediction, on the device of the inputs.

    Counts only pixels whose target is a class, i.e. in [0, K) (torchvision's reference: bincount of K * target +
    pred) and not `ignore_index` (which torchvision relies on being out of range; here it may be any value).
    `target` and `pred` are integer tensors of one shape; `pred` must hold classes in [0, K)."""
    if target.shape != pred.shape:
        raise ValueError(f"target {tuple(target.shape)} and pred {tuple(pred.shape)} must have one shape")
    k = int(num_classes)
    target, pred = target.reshape(-1).long(), pred.reshape(-1).long()  # (N,)
    scored = (target >= 0) & (target < k) & (target != ignore_index)  # (N,) bool
    target, pred = target[scored], pred[scored]  # (n,)
    if pred.numel() and not bool(((pred >= 0) & (pred < k)).all()):
        raise ValueError(f"predictions must be class indices in [0, {k - 1}]")
    counts = torch.bincount(k * target + pred, minlength=k * k)  # (K * K,)
    return counts.reshape(k, k)


def metrics(conf: np.ndarray) -> Dict[str, Any]:
    """Dataset metrics from a (K, K) confusion (rows: truth, columns: prediction), as torchvision's reference
    `ConfusionMatrix.compute`: pixel accuracy = diagonal / total; per-class accuracy = diagonal / row sums;
    per-class IoU = diagonal / (rows + columns - diagonal). Made defined where that one is NaN:

    - `miou`: mean IoU over the classes whose IoU is defined, those in the ground truth or predicted (torchvision's
      plain mean is NaN as soon as one class never appears);
    - `mean_accuracy`: mean per-class accuracy over the classes in the ground truth;
    - `fw_iou`: frequency-weighted IoU, sum over classes in the ground truth of (rows / total) * IoU;
    - `per_class`: per class {iou, accuracy, pixels (ground-truth pixels), predicted_pixels (predicted on labelled
      pixels)}, None (JSON null) where undefined;
    - `labelled_pixels`: the total. With no labelled pixel every metric is None.
    """
    conf = np.asarray(conf, dtype=np.int64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion must be (K, K), got shape {conf.shape}")
    diag = np.diag(conf).astype(np.float64)  # (K,)
    rows = conf.sum(axis=1)  # (K,) ground-truth pixels per class
    cols = conf.sum(axis=0)  # (K,) predicted pixels per class
    total = int(rows.sum())
    union = rows + cols - diag  # (K,)
    iou = np.divide(diag, union, out=np.full(len(diag), np.nan), where=union > 0)  # (K,) NaN: undefined
    accuracy = np.divide(diag, rows, out=np.full(len(diag), np.nan), where=rows > 0)  # (K,)
    per_class = [{"iou": _number(iou[c]), "accuracy": _number(accuracy[c]), "pixels": int(rows[c]),
                  "predicted_pixels": int(cols[c])} for c in range(len(diag))]
    result: Dict[str, Any] = {"pixel_accuracy": None, "mean_accuracy": None, "miou": None, "fw_iou": None,
                              "labelled_pixels": total, "per_class": per_class}
    if total == 0:
        return result
    present = rows > 0
    result.update(pixel_accuracy=float(diag.sum() / total), mean_accuracy=float(accuracy[present].mean()),
                  miou=float(iou[union > 0].mean()),
                  fw_iou=float((rows[present] / total * iou[present]).sum()))
    return result


def image_scores(conf_image: np.ndarray) -> Dict[str, Any]:
    """One image's numbers from its own (K, K) confusion: `iou` (mean IoU over the classes in its ground truth or
    prediction), `pixel_accuracy` (both None when it has no labelled pixel), `classes_present` and
    `classes_predicted` (sorted class ids in the ground truth / predicted on labelled pixels), `false_positive`
    (K,) (pixels predicted as the class where the truth is another: over-prediction) and `false_negative` (K,)
    (pixels of the class predicted as another: under-prediction), int64 arrays."""
    conf = np.asarray(conf_image, dtype=np.int64)
    summary = metrics(conf)
    diag = np.diag(conf)  # (K,)
    rows, cols = conf.sum(axis=1), conf.sum(axis=0)  # (K,) each
    return {"iou": summary["miou"], "pixel_accuracy": summary["pixel_accuracy"],
            "classes_present": _ids(rows > 0), "classes_predicted": _ids(cols > 0),
            "false_positive": cols - diag, "false_negative": rows - diag}


def predicted_shares(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K,) int64 pixel count of each predicted class, on pred's device: what a run without masks can say about a
    segmentation (which classes the model sees, and how much of them)."""
    flat = pred.reshape(-1).long()  # (N,)
    if flat.numel() and not bool(((flat >= 0) & (flat < num_classes)).all()):
        raise ValueError(f"predictions must be class indices in [0, {num_classes - 1}]")
    return torch.bincount(flat, minlength=int(num_classes))


def _number(value: float) -> Optional[float]:
    return None if np.isnan(value) else float(value)


def _ids(flags: np.ndarray) -> List[int]:
    return [int(c) for c in np.flatnonzero(flags)]
