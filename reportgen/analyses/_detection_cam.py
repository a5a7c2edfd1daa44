"""Explanations of single detections of torchvision detectors (Faster / Mask / Keypoint R-CNN, RetinaNet, FCOS,
SSD, SSDlite), computed as a bounded SECOND pass at report time over the images a gallery shows, never over the
whole folder.

Why a second pass: a detector's box scores only exist after post-processing (score threshold, NMS, top-k), and
each explained box needs its own backward; doing that for every image of the pass would multiply its cost by the
number of boxes. Galleries show a bounded set of images, so this pass costs one forward per shown image plus one
backward per explained box (`SecondPassCost` counts them, with the seconds spent, for the report to state).

- `box_score_cams`: Grad-CAM (or gradcam++ / layercam / hirescam) of ONE detection's score, as pytorch-grad-cam's
  `FasterRCNNBoxScoreTarget` defines it: the model runs again on the image (eval mode), the output box of the same
  label with the highest IoU with the explained box is matched (IoU strictly above `iou_threshold`), and the target
  is that box's score plus its IoU with the explained box (`iou_term=False`: the score alone). Differences from
  pytorch-grad-cam, on purpose: the best match is searched among the boxes of the same label (theirs takes the best
  IoU over every label, then gives 0 when its label differs: RetinaNet, FCOS and SSD output one box with several
  labels, so theirs can miss a box that is there), and the gradient is taken w.r.t. a gradient leaf made by the
  capture engine (parameters frozen, no parameter gradients). Post-processing selects boxes by index, which is not
  differentiable, but the selected scores are: their gradient reaches every feature map they were computed from.
  At an exact re-match (IoU 1) the IoU term's gradient is 0, so the target is then effectively the score.
- `eigen_cams`: EigenCAM (Muhammad & Yeasin 2020), gradient-free and class-agnostic, as pytorch-grad-cam computes
  it: the layer's (h*w, C) activations, centred per channel, projected onto their first right-singular vector
  (numpy's SVD; the sign is left as the SVD returns it, as pytorch-grad-cam's EigenCAM does, then the CAM's ReLU;
  `sign_correction=True` flips a map whose largest magnitude is negative, Seg-Eigen-CAM's correction).
- `renormalise_in_box`: a map brought to the image's size, zero outside one box and min-max normalised inside
  (the idea of pytorch-grad-cam's detection tutorial's `renormalize_cam_in_bounding_boxes`), so a box's map is
  read on its own scale.

Images are processed one at a time: torchvision's transform pads a batch to its largest image, so batching images
of different sizes would change the feature maps explained. Each map is cropped to the image's own extent (the
transform's resized size inside its padded batch; a padded cell row is dropped before the CAM is reduced, a cell
that straddles the border is kept) and resampled bilinearly to the image's original size (or a smaller one with
`max_side`).

Default layer (`default_detection_layer`): the LAST plain (1, C, h, w) map of the detector's `backbone` that every
level the backbone outputs depends on (found by a probe forward of the backbone through the engine's ModuleProbe
and one gradient per level), outside the FPN. pytorch-grad-cam's Faster R-CNN tutorial targets `model.backbone`,
whose output is an OrderedDict of levels (it needs `fasterrcnn_reshape_transform`, which also fails on RetinaNet and
FCOS, whose levels have no `pool`); a gradient leaf needs a plain tensor, and a layer every level depends on is one
every box score can reach (a single FPN level would give all-zero maps for boxes read from other levels). The FPN
is passed over: its last module every level depends on is the 1×1 lateral convolution of the body's last stage,
linear, whose Grad-CAM equals the stage's own up to a constant before the ReLU. Per family (torchvision 0.29):
- Faster R-CNN ResNet-50 FPN (v1, v2), Mask and Keypoint R-CNN: `backbone.body.layer4` (stride 32)
- Faster R-CNN MobileNetV3-Large FPN (and its 320 variant): `backbone.body.16`, the body's last returned block
- RetinaNet and FCOS ResNet-50 FPN: `backbone.body.layer4`
- SSD300 VGG16: `backbone.features`, the conv4_3 stage (stride 8), the source of its first level
- SSDlite320 MobileNetV3-Large: `backbone.features.0`, the C4 part (stride 16), the source of its first level
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork, box_iou

from reportgen.analyses.gradcam import METHODS, cam_from
from reportgen.engine.capture import CaptureEngine, ModuleProbe

PROBE_SIDE = 160  # side of the default-layer probe (a multiple of 32, as FPN levels need); SSDs use their fixed size


@dataclass
class SecondPassCost:
    """What the second pass cost, accumulated over calls (pass the same object to several calls)."""

    images: int = 0  # images run through the model
    forwards: int = 0
    backwards: int = 0  # one per explained (matched) detection
    seconds: float = 0.0
    explained: int = 0  # detections asked for
    unmatched: List[Tuple[int, int]] = field(default_factory=list)  # (image, detection): no box of its label above
    # the IoU threshold on the re-run (e.g. nondeterministic GPU kernels moved it): its map is all zero
    zero_gradient: List[Tuple[int, int]] = field(default_factory=list)  # (image, detection): matched, but the score
    # does not depend on the layer (gradient zero everywhere): its map is all zero

    def text(self) -> str:
        """One line for the report: `2 images, 2 forwards + 5 backwards, 1.3 s`."""
        line = (f"{self.images} images, {self.forwards} forwards + {self.backwards} backwards, "
                f"{self.seconds:.1f} s")
        if self.unmatched:
            line += f"; {len(self.unmatched)} of {self.explained} detections not found again (maps left empty)"
        if self.zero_gradient:
            line += f"; {len(self.zero_gradient)} with a score that does not depend on the layer (maps empty)"
        return line


def default_detection_layer(model: nn.Module, example: Optional[torch.Tensor] = None) -> Tuple[Optional[str], str]:
    """(layer, why): the last plain (1, C, h, w) output of a module inside `model.backbone`, outside its FPN, that
    every level the backbone outputs depends on (see the module docstring); (None, why not) when there is none.
    `example`: a (3, H, W) image for the probe (default: a random PROBE_SIDE square, or the transform's fixed size)."""
    modules = dict(model.named_modules())
    backbone = modules.get("backbone")
    if backbone is None:
        return None, (f"{type(model).__name__} has no `backbone` module (not a torchvision-style detector); "
                      f"choose a layer whose output is a (B, C, h, w) map")
    fpn_prefixes = [n + "." for n, m in modules.items() if isinstance(m, FeaturePyramidNetwork)]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    source = _probe_image(model, example).to(device=device, dtype=dtype)  # (1, 3, H, W)
    outputs: Dict[str, torch.Tensor] = {}  # name -> output, in the order the calls returned
    calls: Dict[str, int] = defaultdict(int)
    levels: List[torch.Tensor] = []

    def keep(key: str, name: str, module: nn.Module, args: Any, output: Any) -> None:
        calls[name] += 1
        if name == "backbone":
            levels.extend(_tensors(output))
        elif (name.startswith("backbone.") and not any(name.startswith(p) for p in fpn_prefixes)
              and isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[0] == 1
              and min(output.shape[2:]) > 1 and output.grad_fn is not None and name not in outputs):
            outputs[name] = output

    try:
        with ModuleProbe(model, on_end=keep, freeze=True), torch.enable_grad():
            source.requires_grad_()  # so every map computed from the image is on the graph
            backbone(source)
            names = [n for n in outputs if calls[n] == 1]  # a reused module has no single output to explain
            reaching = set(names)
            generator = torch.Generator().manual_seed(0)
            for level in [lv for lv in levels if lv.grad_fn is not None]:
                weights = torch.randn(level.shape, generator=generator).to(level)  # a sum could cancel out
                grads = torch.autograd.grad((level * weights).sum(), [outputs[n] for n in names],
                                            retain_graph=True, allow_unused=True)
                reaching &= {n for n, g in zip(names, grads) if g is not None and bool(g.abs().sum() > 0)}
    except (RuntimeError, TypeError, ValueError) as exc:
        return None, f"the probe forward of {type(model).__name__}.backbone failed ({exc}); choose a layer"
    if not levels:
        return None, f"{type(model).__name__}.backbone returned no tensor computed from the image; choose a layer"
    chosen = [n for n in names if n in reaching]
    if not chosen:
        return None, (f"no plain (B, C, h, w) map inside {type(model).__name__}.backbone feeds all of its "
                      f"{len(levels)} output levels; choose a layer")
    name = chosen[-1]
    _, channels, height, width = outputs[name].shape
    return name, (f"{name}: the last map of the backbone (outside the FPN) that all {len(levels)} levels it outputs "
                  f"depend on, so every box score can reach it; {channels}×{height}×{width} on a "
                  f"{source.shape[-2]}×{source.shape[-1]} probe")


def _probe_image(model: nn.Module, example: Optional[torch.Tensor]) -> torch.Tensor:
    """(1, 3, H, W): `example`, else a seeded random image at the transform's fixed size or PROBE_SIDE square."""
    if example is not None:
        return example.detach().float()[None]
    fixed = getattr(getattr(model, "transform", None), "fixed_size", None)
    height, width = (int(fixed[0]), int(fixed[1])) if fixed else (PROBE_SIDE, PROBE_SIDE)
    return torch.rand((1, 3, height, width), generator=torch.Generator().manual_seed(0))


def _tensors(output: Any) -> List[torch.Tensor]:
    """Every tensor of a module output: a tensor, or the values of a dict / items of a list or tuple."""
    if isinstance(output, torch.Tensor):
        return [output]
    items = output.values() if isinstance(output, Mapping) else output if isinstance(output, (list, tuple)) else []
    return [t for item in items for t in _tensors(item)]


def box_score_cams(model: nn.Module, images: Sequence[torch.Tensor], detections: Sequence[Mapping[str, Any]],
                   layer: str, method: str = "gradcam", iou_threshold: float = 0.5, iou_term: bool = True,
                   max_side: Optional[int] = None, cost: Optional[SecondPassCost] = None) -> List[List[np.ndarray]]:
    """For each image, one CAM per detection to explain (same order): the raw map (after the CAM's ReLU, not
    normalised) of `method` for that box's score (see the module docstring), float32, at the image's size (longest
    side at most `max_side` when given). `images`: (3, H, W) floats in [0, 1] at their original size;
    `detections`: per image a mapping with `boxes` (N, 4) xyxy in original pixels and `labels` (N,), the model's
    label ids. One forward per image with detections, one backward per matched detection, counted in `cost`."""
    if method not in METHODS:
        raise ValueError(f"box_score_cams: method {method!r} is not one of {', '.join(METHODS)}")
    wanted = _check_inputs(images, detections)
    cost = cost if cost is not None else SecondPassCost()
    device, dtype = _device_dtype(model)
    maps: List[List[np.ndarray]] = []
    with _Pass(model, gradients=[layer]) as run:
        for index, (image, (boxes, labels)) in enumerate(zip(images, wanted)):
            if not len(boxes):
                maps.append([])
                continue
            start = time.perf_counter()
            output, leaf, extent = run.forward(image.to(device=device, dtype=dtype))
            cost.images += 1
            cost.forwards += 1
            cost.explained += len(boxes)
            with torch.enable_grad():  # the matched scores must stay on the graph from the leaf
                targets = [box_target(output, box, int(label), iou_threshold, iou_term)
                           for box, label in zip(boxes, labels)]
            matched = [j for j, t in enumerate(targets) if t is not None]
            cells = _kept_cells(leaf.shape[-2:], extent)
            acts = leaf.detach().float()[:, :, :cells[0], :cells[1]]  # (1, C, kh, kw) inside the image
            size = _output_size(image.shape[-2:], max_side)
            row = [np.zeros(size, dtype=np.float32) for _ in range(len(boxes))]
            for j in matched:
                (grads,) = torch.autograd.grad(targets[j], leaf, retain_graph=j != matched[-1], allow_unused=True)
                cost.backwards += 1
                if grads is None or not bool(grads.any()):
                    cost.zero_gradient.append((index, j))
                    continue
                grads = grads.float()[:, :, :cells[0], :cells[1]]  # (1, C, kh, kw)
                cam = cam_from(method, acts, grads)[0]  # (kh, kw)
                row[j] = _grid_to_image(cam.cpu().numpy(), _spans(leaf.shape[-2:], extent), size)
            cost.unmatched.extend((index, j) for j, t in enumerate(targets) if t is None)
            maps.append(row)
            cost.seconds += time.perf_counter() - start
    return maps


def box_target(output: Mapping[str, torch.Tensor], box: torch.Tensor, label: int, iou_threshold: float = 0.5,
               iou_term: bool = True) -> Optional[torch.Tensor]:
    """The differentiable target of one explained box in a detector's output for its image: the score of the
    output box with label `label` that overlaps `box` (xyxy) best, plus that IoU when `iou_term`; None when no box
    of that label overlaps it by more than `iou_threshold`."""
    boxes, labels, scores = output["boxes"], output["labels"], output["scores"]  # (N, 4), (N,), (N,)
    same = torch.nonzero(labels == label).flatten()  # (M,)
    if not len(same):
        return None
    ious = box_iou(box.to(boxes)[None], boxes[same])[0]  # (M,)
    best = int(ious.argmax())
    if not bool(ious[best] > iou_threshold):
        return None
    score = scores[same[best]]
    return score + ious[best] if iou_term else score


def eigen_cams(model: nn.Module, images: Sequence[torch.Tensor], layer: str, sign_correction: bool = False,
               max_side: Optional[int] = None, cost: Optional[SecondPassCost] = None) -> List[np.ndarray]:
    """For each image, its EigenCAM on `layer` (see the module docstring): the projection of the layer's centred
    (h*w, C) activations inside the image onto their first right-singular vector, after the CAM's ReLU, not
    normalised, float32 at the image's size (longest side at most `max_side`). One forward per image, no backward."""
    _check_images(images)
    cost = cost if cost is not None else SecondPassCost()
    device, dtype = _device_dtype(model)
    maps: List[np.ndarray] = []
    with _Pass(model, activations=[layer]) as run:
        for image in images:
            start = time.perf_counter()
            _, activation, extent = run.forward(image.to(device=device, dtype=dtype))
            cost.images += 1
            cost.forwards += 1
            cells = _kept_cells(activation.shape[-2:], extent)
            acts = activation[0, :, :cells[0], :cells[1]].float().cpu().numpy()  # (C, kh, kw)
            cam = np.maximum(first_component(acts, sign_correction), 0)  # (kh, kw)
            size = _output_size(image.shape[-2:], max_side)
            maps.append(_grid_to_image(cam, _spans(activation.shape[-2:], extent), size))
            cost.seconds += time.perf_counter() - start
    return maps


def first_component(activations: np.ndarray, sign_correction: bool = False) -> np.ndarray:
    """(C, h, w) activations -> (h, w): the (h*w, C) matrix, centred per channel, projected onto its first
    right-singular vector (pytorch-grad-cam's `get_2d_projection`, NaN read as 0); `sign_correction` flips the map
    when its most negative value outweighs its largest (`get_2d_projection_with_sign_correction`)."""
    channels = activations.shape[0]
    matrix = np.nan_to_num(activations.astype(np.float32), nan=0.0).reshape(channels, -1).T  # (h*w, C)
    matrix = matrix - matrix.mean(axis=0)
    _, _, vt = np.linalg.svd(matrix, full_matrices=False)  # vt: (min(h*w, C), C)
    projection = (matrix @ vt[0]).reshape(activations.shape[1:])  # (h, w)
    if sign_correction and abs(projection.min()) > abs(projection.max()):
        projection = -projection
    return projection.astype(np.float32)


def renormalise_in_box(cam: np.ndarray, box: Sequence[float], image_size: Tuple[int, int],
                       out_size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """(h, w) map over the whole image -> float32 map at `out_size` (default `image_size`, both (H, W)): resampled
    bilinearly, zero outside `box` (xyxy in pixels of an image of `image_size`), min-max normalised to [0, 1]
    inside it (all zero when the map is constant there). A pixel is inside when its centre is; a box smaller than a
    pixel keeps the pixel under its centre."""
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2:
        raise ValueError(f"renormalise_in_box: expected an (h, w) map, got shape {cam.shape}")
    coords = np.asarray(box, dtype=np.float64).reshape(-1)
    if coords.shape != (4,) or not np.isfinite(coords).all():
        raise ValueError(f"renormalise_in_box: expected one finite xyxy box, got {box!r}")
    height, width = int(image_size[0]), int(image_size[1])
    out_h, out_w = (height, width) if out_size is None else (int(out_size[0]), int(out_size[1]))
    resampled = _grid_to_image(cam, cam.shape, (out_h, out_w))  # (out_h, out_w)
    x1, x2 = coords[[0, 2]] * (out_w / width)
    y1, y2 = coords[[1, 3]] * (out_h / height)
    rows, cols = _centres_inside(y1, y2, out_h), _centres_inside(x1, x2, out_w)
    result = np.zeros((out_h, out_w), dtype=np.float32)
    inside = resampled[rows, cols]
    spread = float(inside.max() - inside.min()) if inside.size else 0.0
    if spread > 0:
        result[rows, cols] = (inside - inside.min()) / spread
    return result


def _centres_inside(low: float, high: float, size: int) -> slice:
    """Pixels (of `size`) whose centre c + 0.5 lies in [low, high); the one under the middle when there is none."""
    first, stop = max(0, math.ceil(low - 0.5)), min(size, math.ceil(high - 0.5))
    if stop <= first:
        first = min(max(int(math.floor((low + high) / 2)), 0), size - 1)
        stop = first + 1
    return slice(first, stop)


class _Pass:
    """The engine around the second pass: a CaptureEngine for the layer (a gradient leaf or a stored activation)
    and a ModuleProbe on the detector's `transform` to read where the image lies in the padded batch it makes.
    Hooks removed and the model's mode and parameter flags restored on exit, on every path."""

    def __init__(self, model: nn.Module, activations: Sequence[str] = (), gradients: Sequence[str] = ()):
        self.model = model
        self.layer = (list(gradients) + list(activations))[0]
        self.engine = CaptureEngine(model, activations=activations, gradients=gradients)
        self.sizes: Dict[str, Tuple[int, int]] = {}
        has_transform = isinstance(getattr(model, "transform", None), nn.Module)
        self.probe = ModuleProbe(model, on_end=self._read_transform, modules=["transform"] if has_transform else [])

    def __enter__(self) -> "_Pass":
        self.engine.__enter__()
        try:
            self.probe.__enter__()
        except BaseException:
            self.engine.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        try:
            self.probe.__exit__(*exc_info)
        finally:
            self.engine.__exit__(*exc_info)

    def _read_transform(self, key: str, name: str, module: nn.Module, args: Any, output: Any) -> None:
        """GeneralizedRCNNTransform returns (ImageList, targets): the resized size and the padded batch's size."""
        image_list = output[0] if isinstance(output, (tuple, list)) else output
        sizes = getattr(image_list, "image_sizes", None)
        tensors = getattr(image_list, "tensors", None)
        if sizes and isinstance(tensors, torch.Tensor):
            self.sizes = {"resized": tuple(int(s) for s in sizes[0]), "padded": tuple(tensors.shape[-2:])}

    def forward(self, image: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, Optional[tuple]]:
        """Run the model on one (3, H, W) image: (its output dict, the layer's (1, C, h, w) capture, (resized,
        padded) sizes from the transform or None when the model has none)."""
        self.engine.start_batch()
        self.sizes = {}
        with self.engine.forward_mode():
            output = self.model([image])
        captured = self.engine.captures.tensors.get(self.layer)
        if captured is None:
            note = self.engine.captures.notes.get(self.layer, "it was not called in the forward")
            raise ValueError(f"layer {self.layer!r} gave no tensor to explain ({note})")
        if captured.dim() != 4 or captured.shape[0] != 1:
            raise ValueError(f"layer {self.layer!r} outputs {tuple(captured.shape)}; a detection CAM needs an "
                             f"image-level (1, C, h, w) map (a backbone stage, not a per-box head)")
        if self.engine.needs_grad and not captured.requires_grad:
            note = self.engine.captures.notes.get(self.layer, "")
            raise ValueError(f"layer {self.layer!r} cannot become a gradient leaf: its output is not a plain "
                             f"tensor ({note}); choose a module that returns a (B, C, h, w) tensor")
        if not isinstance(output, (list, tuple)) or not output or not isinstance(output[0], Mapping):
            raise ValueError(f"{type(self.model).__name__} returned {type(output).__name__}, not a list of "
                             f"per-image dicts (boxes, labels, scores) as torchvision detectors do in eval mode")
        extent = (self.sizes["resized"], self.sizes["padded"]) if self.sizes else None
        return output[0], captured, extent


def _kept_cells(grid: Sequence[int], extent: Optional[tuple]) -> Tuple[int, int]:
    """Rows and columns of a (h, w) map that cover some of the image (the rest cover only padding)."""
    spans = _spans(grid, extent)
    return (min(int(grid[0]), max(1, math.ceil(spans[0] - 1e-6))),
            min(int(grid[1]), max(1, math.ceil(spans[1] - 1e-6))))


def _spans(grid: Sequence[int], extent: Optional[tuple]) -> Tuple[float, float]:
    """How many cells of a (h, w) map the image's extent covers, per side (fractions where it ends mid-cell)."""
    if extent is None:
        return float(grid[0]), float(grid[1])
    (resized_h, resized_w), (padded_h, padded_w) = extent
    return grid[0] * resized_h / padded_h, grid[1] * resized_w / padded_w


def _grid_to_image(grid: np.ndarray, spans: Sequence[float], size: Tuple[int, int]) -> np.ndarray:
    """Bilinear resampling (half-pixel centres, edges clamped, as F.interpolate with align_corners=False and
    cv2.resize) of the first `spans` cells of a (kh, kw) grid onto `size` (H, W) pixels; float32."""
    rows = _resample_matrix(size[0], grid.shape[0], spans[0])  # (H, kh)
    cols = _resample_matrix(size[1], grid.shape[1], spans[1])  # (W, kw)
    return (rows @ grid.astype(np.float64) @ cols.T).astype(np.float32)  # (H, W)


def _resample_matrix(n_out: int, n_in: int, span: float) -> np.ndarray:
    """(n_out, n_in) weights: output pixel i samples the input at cell coordinate (i + 0.5) * span / n_out."""
    source = np.clip((np.arange(n_out) + 0.5) * (span / n_out) - 0.5, 0, n_in - 1)  # (n_out,) cell centres
    low = np.floor(source).astype(np.int64)
    high = np.minimum(low + 1, n_in - 1)
    frac = source - low
    weights = np.zeros((n_out, n_in))
    np.add.at(weights, (np.arange(n_out), low), 1 - frac)
    np.add.at(weights, (np.arange(n_out), high), frac)
    return weights


def _output_size(image_size: Sequence[int], max_side: Optional[int]) -> Tuple[int, int]:
    height, width = int(image_size[0]), int(image_size[1])
    if max_side is None or max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    param = next(model.parameters(), None)
    if param is None:
        return torch.device("cpu"), torch.float32
    return param.device, param.dtype if param.is_floating_point() else torch.float32


def _check_images(images: Sequence[torch.Tensor]) -> None:
    for index, image in enumerate(images):
        if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"image {index}: expected a (3, H, W) float tensor in [0, 1], got {shape}")


def _check_inputs(images: Sequence[torch.Tensor],
                  detections: Sequence[Mapping[str, Any]]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(boxes (N, 4) float32, labels (N,) int64) per image, after checking the inputs agree."""
    _check_images(images)
    if len(images) != len(detections):
        raise ValueError(f"{len(images)} images but {len(detections)} detection lists: give one per image")
    wanted = []
    for index, found in enumerate(detections):
        if not isinstance(found, Mapping) or "boxes" not in found or "labels" not in found:
            raise ValueError(f"detections of image {index}: expected a mapping with 'boxes' (N, 4) and 'labels' "
                             f"(N,), got {type(found).__name__}")
        boxes = torch.as_tensor(np.asarray(_cpu(found["boxes"]), dtype=np.float32)).reshape(-1, 4)  # (N, 4)
        labels = torch.as_tensor(np.asarray(_cpu(found["labels"]), dtype=np.int64)).reshape(-1)  # (N,)
        if len(boxes) != len(labels):
            raise ValueError(f"detections of image {index}: {len(boxes)} boxes but {len(labels)} labels")
        wanted.append((boxes, labels))
    return wanted


def _cpu(value: Any) -> Any:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
