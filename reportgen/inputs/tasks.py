"""What kind of vision model this is (`model.task`) and the typed outputs every analysis reads.

The task is decided once, before the pass: `model.task` when the config names one; else what the model's library
says (the source sets `LoadedModel.task` with its reason: timm `num_classes == 0`, a transformers backbone class,
torchvision's `models.segmentation` / `models.detection` module, a head replaced by `nn.Identity`); else the output of
one probe forward on a blank input. Each forward's raw output (tensor, dict, output object, list of dicts) then
becomes one `ModelOutputs` through `adapt_outputs`, so analyses never guess at shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from reportgen.config.schema import ModelTask
from reportgen.errors import RunError

TASKS = [t.value for t in ModelTask if t is not ModelTask.auto]
DETECTION_KEYS = {"boxes", "labels", "scores"}


@dataclass
class ModelOutputs:
    """One forward's output, typed by task. Only the fields of `task` are set."""

    task: str
    logits: Optional[torch.Tensor] = None  # classification: (B, K) class scores (keeps the autograd graph)
    embedding: Optional[torch.Tensor] = None  # embedding: (B, D) pooled features
    mask_logits: Optional[torch.Tensor] = None  # segmentation: (B, K, H, W) per-pixel class logits
    detections: Optional[List[Dict[str, torch.Tensor]]] = None  # detection: per image boxes (xyxy), labels, scores


def describe_output(raw: Any, depth: int = 0) -> str:
    """A short account of a raw model output for error messages: `tensor (2, 21, 224, 224)`,
    `dict {out: tensor (...), aux: tensor (...)}`, `list of 2 dict {boxes: ..., ...}`."""
    if isinstance(raw, torch.Tensor):
        return f"tensor {tuple(raw.shape)}"
    if depth > 2:
        return type(raw).__name__
    if isinstance(raw, dict) or hasattr(raw, "keys") and hasattr(raw, "__getitem__"):
        items = ", ".join(f"{k}: {describe_output(raw[k], depth + 1)}" for k in list(raw.keys())[:6])
        return f"{type(raw).__name__} {{{items}}}"
    if isinstance(raw, (list, tuple)):
        if not raw:
            return f"empty {type(raw).__name__}"
        return f"{type(raw).__name__} of {len(raw)} {describe_output(raw[0], depth + 1)}"
    return type(raw).__name__


def task_from_output(raw: Any, batch: int) -> Optional[Tuple[str, str]]:
    """(task, reason) read from a probe forward's output on `batch` images, or None when it fits no task.

    A (B, D) tensor cannot say whether D counts classes or feature dimensions: it is a classification unless the
    source said otherwise (the sources recognise backbones from their libraries' own facts)."""
    if _detections(raw, batch) is not None:
        return ModelTask.detection.value, "the output is one dict of boxes, labels and scores per image"
    masks = _mask_logits(raw)
    if masks is not None and masks.shape[0] == batch:
        return ModelTask.segmentation.value, f"the output is per-pixel logits {tuple(masks.shape)} (B, K, H, W)"
    logits = _main_tensor(raw)
    if logits is not None and logits.dim() == 2 and logits.shape[0] == batch:
        return (ModelTask.classification.value,
                f"the output is a {tuple(logits.shape)} (B, K) tensor and the model's library names no other task")
    return None


def adapt_outputs(task: str, raw: Any, batch: int) -> ModelOutputs:
    """The raw output of a forward on `batch` images as the `task`'s typed outputs; RunError when it does not fit."""
    if task == ModelTask.classification.value:
        logits = _main_tensor(raw)
        if logits is not None and logits.dim() == 2 and logits.shape[0] == batch:
            return ModelOutputs(task, logits=logits)
        expected = "class scores of shape (batch, classes)"
    elif task == ModelTask.embedding.value:
        features = _main_tensor(raw)
        if features is not None and features.dim() == 2 and features.shape[0] == batch:
            return ModelOutputs(task, embedding=features)
        expected = "pooled features of shape (batch, dimensions)"
    elif task == ModelTask.segmentation.value:
        masks = _mask_logits(raw)
        if masks is not None and masks.shape[0] == batch:
            return ModelOutputs(task, mask_logits=masks)
        expected = "per-pixel logits of shape (batch, classes, height, width) (or a dict with 'out')"
    else:
        detections = _detections(raw, batch)
        if detections is not None:
            return ModelOutputs(task, detections=detections)
        expected = "one dict of boxes, labels and scores per image"
    raise RunError(f"model.task={task} expects the model to return {expected}, but it returned "
                   f"{describe_output(raw)}; set model.task to one of {TASKS} that fits the output")


def _main_tensor(raw: Any) -> Optional[torch.Tensor]:
    """The tensor a model means by its output: itself, `.logits` / `.pooler_output` / `.image_embeds` of an output
    object, or the first element of a tuple (timm and torchvision return plain tensors)."""
    if isinstance(raw, torch.Tensor):
        return raw
    for key in ("logits", "image_embeds", "pooler_output"):
        value = _field(raw, key)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(raw, (tuple, list)) and raw and isinstance(raw[0], torch.Tensor):
        return raw[0]
    return None


def _mask_logits(raw: Any) -> Optional[torch.Tensor]:
    """(B, K, H, W) logits: a 4-d tensor, torchvision's `{'out': ..., 'aux': ...}` (the `out` head), or `.logits`."""
    tensor = raw if isinstance(raw, torch.Tensor) else _field(raw, "out")
    if tensor is None:
        tensor = _field(raw, "logits")
    if isinstance(tensor, torch.Tensor) and tensor.dim() == 4 and min(tensor.shape[2:]) > 1:
        return tensor
    return None


def _detections(raw: Any, batch: int) -> Optional[List[Dict[str, torch.Tensor]]]:
    """torchvision's eval-mode detector output: a list of one dict per image with boxes, labels and scores."""
    if isinstance(raw, (list, tuple)) and len(raw) == batch and raw and all(
            isinstance(item, dict) and DETECTION_KEYS <= set(item) for item in raw):
        return list(raw)
    return None


def _field(raw: Any, key: str) -> Any:
    """`raw[key]` of a dict or transformers ModelOutput, else `raw.key`, else None."""
    mapping = hasattr(raw, "keys") and hasattr(raw, "__getitem__") and not isinstance(raw, torch.Tensor)
    if isinstance(raw, dict) or mapping:
        try:
            return raw[key] if key in raw.keys() else None
        except (KeyError, TypeError):
            return None
    return getattr(raw, key, None) if not isinstance(raw, (torch.Tensor, list, tuple)) else None


def resizes_inside(model: torch.nn.Module) -> bool:
    """Whether the model resizes and normalises its input itself (torchvision's detectors: a `transform` that is a
    GeneralizedRCNNTransform), so it must get the image as decoded."""
    return type(getattr(model, "transform", None)).__name__ == "GeneralizedRCNNTransform"


def identity_head_task(module: torch.nn.Module) -> Tuple[Optional[str], str]:
    """('embedding', reason) when the model's last layer is an nn.Identity (a head removed to use the model as a
    backbone, e.g. `model.fc = nn.Identity()`), else (None, ''). Only for a (B, D) output: a segmentation network
    may end in an Identity too (segmentation_models_pytorch's `activation=None`)."""
    leaves = [(name, m) for name, m in module.named_modules() if not list(m.children())]
    if leaves and isinstance(leaves[-1][1], torch.nn.Identity):
        return "embedding", f"its last layer, {leaves[-1][0]}, is nn.Identity: a backbone whose head was removed"
    return None, ""


def decide_task(requested: Any, loaded: Any, model: torch.nn.Module, example: torch.Tensor) -> Tuple[str, str]:
    """(task, reason): `model.task` when set, else the source's (library's) decision, else the output of a probe
    forward (a (B, D) output of a model whose last layer is nn.Identity: a backbone). The probe forward on `example` (two blank images) runs in every case, so an output that fits no task, or
    not the task named, stops here, before the pass, with what was seen."""
    requested = getattr(requested, "value", requested) or ModelTask.auto.value
    try:
        with torch.no_grad():
            raw = model(example)
    except Exception as exc:
        raise RunError(f"the model's forward failed on a probe of two blank images {tuple(example.shape)} (before "
                       f"any file was read): {type(exc).__name__}: {exc}") from exc
    seen = task_from_output(raw, int(example.shape[0]))
    if requested != ModelTask.auto.value:
        task, reason = requested, "set by model.task"
    elif loaded.task is not None:
        task, reason = loaded.task, loaded.task_reason
    elif seen is not None:
        task, reason = seen
        if task == ModelTask.classification.value and identity_head_task(model)[0]:
            task, reason = identity_head_task(model)  # (B, D) from a model whose head was removed: a backbone
    else:
        raise RunError(f"the model's output fits no task: a probe forward on {tuple(example.shape)} returned "
                       f"{describe_output(raw)}. Expected (batch, classes) scores, (batch, dimensions) features, "
                       f"(batch, classes, height, width) logits or one dict of boxes, labels and scores per image; "
                       f"set model.task to one of {TASKS} if the model's output is one of these")
    try:
        adapt_outputs(task, raw, int(example.shape[0]))  # raises with what was seen when the output does not fit
    except RunError as exc:
        if requested != ModelTask.auto.value:
            raise
        raise RunError(f"the model's library says its task is {task} ({reason}), but a probe forward on "
                       f"{tuple(example.shape)} returned {describe_output(raw)}, which is not what a {task} model "
                       f"returns. If the output is one of {TASKS}'s, set model.task; otherwise this model is not "
                       f"supported") from exc
    return task, reason
