"""`gradcam`: where the model looked, for every image of the folder, inside the one pass.

The capture engine makes the target layer's output an autograd leaf (parameters frozen), so
`torch.autograd.grad(score, activation)` differentiates only the head after that layer: no parameter gradients, no
second forward. Methods (Selvaraju et al. 2017; Chattopadhay et al. 2018; Jiang et al. 2021; Draelos & Carin 2020):

- gradcam:   relu(sum_c mean_hw(dS/dA)_c * A_c)
- gradcam++: channel weights sum_hw(relu(dS/dA) * alpha), alpha from the 2nd/3rd-power gradient formula
- layercam:  relu(sum_c relu(dS/dA)_c * A_c)          (element-wise weights, sharper maps)
- hirescam:  relu(sum_c (dS/dA)_c * A_c)              (element-wise, faithful to the score)

Default target layer (`reportgen.analyses._cam_layer`): the last layer whose output is a grid of the image that the
predicted class's score depends on (nonzero gradient on a one-image probe), never inside an attention module, never
a first axis that is not the images, the trailing identity / LayerNorm / upsampling pool passed over. Channels first
or last is decided by the image (`reportgen.engine.grids`). This gives a CNN's last stage, timm Swin's `layers`, a
ViT's last block's first norm (`ln_1`, `norm1`, `layernorm_before`: the block's output reaches a class-token head
only through the class token, so its patch gradients are zero), the last token stage of Mixer and LeViT. Tokens
(B, prefix + rows * columns, C) are laid out on the model's own patch grid, the prefix tokens (class, distillation,
registers) dropped.
A layer whose output is not a grid is never used: chosen by `layer`, it is a config error; when the model has no
spatial layer to default to, the section says so and names `analysis.gradcam.layer`.

Maps that say nothing are counted and named in an alert, not drawn as if they were normal: all-zero maps (and,
among them, those whose gradient is zero everywhere: the score does not depend on the layer, e.g. torchvision's
zero-initialised ViT head with random weights) and maps with NaN or Inf.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from reportgen.analyses.base import Analysis, Batch, Requirements, RunContext, register
from reportgen.analyses._cam_layer import default_cam_layer, grid_calls
from reportgen.engine.layers import probe_calls, select_layers
from reportgen.engine.tensors import TokenLayout, to_grid
from reportgen.errors import ConfigError
from reportgen.inputs.labels import display_names, match_labels, output_synsets
from reportgen.report import plots
from reportgen.report.elements import Alert, Gallery, GalleryItem, KeyValues, Section, Text
from reportgen.report.overlays import HEATMAP_CMAP, heat_on_thumbnail, normalise_maps
from reportgen.report.thumbnails import thumbnail
from reportgen.state.reducers import BoundedTop
from reportgen.state.run_state import allow_in_state
from reportgen.state.streams import RowStore, absorb_rows

allow_in_state(TokenLayout)  # the target layer's token layout is part of the saved state (checkpoints, shards)

METHODS = ["gradcam", "gradcam++", "layercam", "hirescam"]
TARGETS = ["predicted", "label"]


@dataclass
class GradCAMConfig:
    layer: Optional[str] = None  # target layer (null: last spatial feature layer; ViT: last block's first norm)
    method: str = "gradcam"  # gradcam | gradcam++ | layercam | hirescam
    target: str = "predicted"  # predicted | label (folder class, else predicted) | a class index such as 207
    classes_shown: int = 12  # per-class mean CAMs drawn (the most frequent target classes)


def cam_from(method: str, activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) activations and d score / d activations -> (B, h, w) maps after ReLU, before normalising."""
    if method == "gradcam":
        weights = grads.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        cam = (weights * activations).sum(dim=1)
    elif method == "gradcam++":
        grads2, grads3 = grads.pow(2), grads.pow(3)
        sum_activations = activations.sum(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        alpha = grads2 / (2 * grads2 + sum_activations * grads3 + 1e-7)
        alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
        weights = (grads.clamp_min(0) * alpha).sum(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        cam = (weights * activations).sum(dim=1)
    elif method == "layercam":
        cam = (grads.clamp_min(0) * activations).sum(dim=1)
    elif method == "hirescam":
        cam = (grads * activations).sum(dim=1)
    else:
        raise ConfigError("analysis.gradcam.method", method, "a CAM method", METHODS)
    return cam.clamp_min(0)  # (B, h, w)


def default_target_layer(model: nn.Module, example: torch.Tensor) -> Optional[str]:
    """The default target layer's call key (`reportgen.analyses._cam_layer`); None when no layer is a grid."""
    return default_cam_layer(model, example)


def grid_layout(model: nn.Module, layer: str, example: torch.Tensor) -> Optional[Tuple[str, Any]]:
    """How `layer`'s output (a call key, on a probe of `example`) lies on a grid of the image: ("nchw", None),
    ("nhwc", None) or ("tokens", TokenLayout); None when it does not (a vector, a 1x1 map, tokens without the
    model's grid, a first axis that is not the images, a tensor inside an attention module, an output that is not a
    plain tensor or does not depend on the input)."""
    found = [call.layout for call in grid_calls(model, example) if call.key == layer]
    return (found[0].kind, found[0].tokens) if found else None


def _grid_layers(model: nn.Module, example: torch.Tensor) -> list:
    """Call keys of the layers whose output lies on a grid (the valid choices for `layer`), last ones first."""
    return [call.key for call in reversed(grid_calls(model, example))][:12]


@register("gradcam")
class GradCAM(Analysis):
    Config = GradCAMConfig
    title = "Grad-CAM"
    layer_option = "analysis.gradcam.layer"
    tasks = frozenset({"classification"})
    why_not = ("Grad-CAM explains one class score per image, and they output none (a segmentation model's class "
               "explanations are in its Segmentation section)")
    oom_safe = True  # gradients, maps and softmax are computed before any state changes

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        if cfg.method not in METHODS:
            raise ConfigError("analysis.gradcam.method", cfg.method, "a CAM method", METHODS)
        target = str(cfg.target)
        if target not in TARGETS and not target.isdigit():
            raise ConfigError("analysis.gradcam.target", target, "predicted, label or a class index", TARGETS)

    def __init__(self, cfg: Any, ctx: RunContext):
        super().__init__(cfg, ctx)
        self.check_config(cfg)
        target = str(cfg.target)
        self.fixed_class = int(target) if target.isdigit() else None
        self.label_to_output = match_labels(ctx.dataset_classes, ctx.loaded.class_names, ctx.loaded.synsets)
        self.layer: Optional[str] = None
        self.layout: Optional[Tuple[str, Any]] = None  # how the layer's output lies on a grid (see grid_layout)
        self.missing: Optional[str] = None  # why there is no target layer (no spatial layer to default to)
        self.store: Optional[RowStore] = None
        self.grid: Optional[tuple] = None
        self.count = 0
        self.class_sum: Dict[int, np.ndarray] = {}  # target class -> sum of normalised CAMs
        self.class_count: Dict[int, int] = {}
        self.gallery = BoundedTop(int(ctx.report.gallery_size))
        self.nonfinite = 0  # images whose map holds NaN or Inf
        self.zero = 0  # images whose map is all zero (finite)
        self.zero_grad = 0  # ... of which the gradient w.r.t. the layer is zero everywhere

    def begin(self, example: Batch) -> None:
        model = self.ctx.model
        probe = example.inputs[:1]
        if self.cfg.layer:
            self.layer = select_layers(model, [self.cfg.layer], "analysis.gradcam.layer")[-1]
            self.layout = grid_layout(model, self.layer, probe)
            if self.layout is None:
                calls = [c for c in probe_calls(model, probe) if c.name == self.layer]
                got = ("nothing (it is not called)" if not calls else "×".join(map(str, calls[0].shape))
                       + ("" if calls[0].plain else " inside a tuple or output object"))
                raise ConfigError("analysis.gradcam.layer", self.cfg.layer,
                                  f"a layer whose output is a plain tensor on a spatial grid, (B, C, h, w), "
                                  f"channels-last (B, h, w, C) or patch tokens (B, prefix + rows*columns, C); "
                                  f"{self.layer} outputs {got}", _grid_layers(model, probe))
            return
        self.layer = default_target_layer(model, probe)
        if self.layer is None:
            self.missing = (f"Not applicable: no layer of {type(model).__name__} outputs a spatial grid or patch "
                            f"tokens to default to; choose one with analysis.gradcam.layer=<module name>.")
        else:
            self.layout = grid_layout(model, self.layer, probe)

    def requires(self) -> Requirements:
        return Requirements(gradients=[self.layer]) if self.layer else Requirements()

    def _grid(self, tensor: torch.Tensor) -> torch.Tensor:
        """The target layer's output (or its gradient) as (B, C, h, w)."""
        kind, tokens = self.layout
        if kind == "nhwc":
            return tensor.permute(0, 3, 1, 2)  # (B, C, h, w)
        return to_grid(tensor, tokens)  # (B, C, h, w) or (B, C, rows, columns) without the prefix tokens

    def update(self, batch: Batch, outputs: Any, captures: Any) -> None:
        if self.layer is None:
            return
        logits = outputs.logits  # (B, K), with the graph from the leaf
        if self.fixed_class is not None and self.fixed_class >= logits.shape[1]:
            raise ConfigError("analysis.gradcam.target", self.fixed_class,
                              f"a class index below the model's {logits.shape[1]} outputs")
        activation = captures[self.layer]  # the leaf: (B, C, h, w) or (B, N, C)
        targets = self._targets(batch, logits)  # (B,)
        score = logits.gather(1, targets[:, None]).sum()
        (grads,) = torch.autograd.grad(score, activation, retain_graph=True)
        maps, grads = self._grid(activation.detach().float()), self._grid(grads.float())  # (B, C, h, w)
        cams = cam_from(self.cfg.method, maps, grads)  # (B, h, w)
        probs = torch.softmax(logits.detach().float(), dim=1)  # (B, K)
        confidence, predicted = probs.max(dim=1)  # (B,)
        normalised = normalise_maps(cams)  # (B, h, w) in [0, 1]
        finite = torch.isfinite(cams).flatten(1).all(dim=1)  # (B,)
        zero = finite & (cams == 0).flatten(1).all(dim=1)  # (B,)
        no_grad = (grads == 0).flatten(1).all(dim=1)  # (B,) the score does not depend on the layer
        cams_np, norm_np = cams.cpu().numpy().astype(np.float32), normalised.cpu().numpy()
        targets_np, conf_np = targets.cpu().numpy(), confidence.cpu().numpy()
        predicted_np, labels_np = predicted.cpu().numpy(), batch.labels.cpu().numpy()
        self.nonfinite += int((~finite).sum().item())
        self.zero += int(zero.sum().item())
        self.zero_grad += int((zero & no_grad).sum().item())
        if self.store is None:
            self.grid = tuple(cams_np.shape[1:])
            self.store = RowStore(self.ctx.results_dir / ".gradcam", self.ctx.row_capacity,
                                  {"cams": (self.grid, np.float32), "classes": ((), np.int64)})
        self.store.append(batch.paths, cams=cams_np, classes=targets_np)
        for row, index in enumerate(batch.indices.tolist()):
            cls = int(targets_np[row])
            self.class_sum[cls] = self.class_sum.get(cls, 0) + norm_np[row]
            self.class_count[cls] = self.class_count.get(cls, 0) + 1
            label = int(labels_np[row])
            expected = int(self.label_to_output[label]) if label >= 0 and len(self.label_to_output) else -1
            wrong = expected >= 0 and int(predicted_np[row]) != expected
            priority = (2.0 if wrong else 0.0) + (1.0 - float(conf_np[row]))
            if self.gallery.accepts(priority, index):  # overlays are drawn in finalize, for the kept ones only
                self.gallery.push(priority, index, {
                    "path": batch.paths[row], "image": batch.images[row].clone(), "cam": cams_np[row].copy(),
                    "target": cls, "predicted": int(predicted_np[row]), "confidence": float(conf_np[row]),
                    "label": label, "wrong": wrong, "expected": expected})
        self.count += len(batch.paths)

    def _layout_text(self) -> str:
        kind, tokens = self.layout or ("nchw", None)
        if kind == "nhwc":
            return "channels-last map (B, h, w, C)"
        if kind == "tokens":
            prefix = f", the first {tokens.prefix} (class / distillation / register) dropped" if tokens.prefix else ""
            return f"tokens on the {tokens.grid[0]}×{tokens.grid[1]} patch grid{prefix}"
        return "feature map (B, C, h, w)"

    def _zero_text(self) -> str:
        """The all-zero alert: how many, and the likely reason for each kind."""
        text = f"{self.zero} of {self.count} Grad-CAM maps are all zero, so they show nothing."
        if self.zero_grad:
            text += (f" {self.zero_grad} of them because the gradient of the target score with respect to "
                     f"{self.layer} is zero everywhere: the score does not depend on the target layer (a "
                     f"zero-initialised or untrained head gives zero gradients, as torchvision's ViT head has with "
                     f"random weights; or the class score no longer sees the image after this layer).")
        if self.zero - self.zero_grad:
            text += (f" {self.zero - self.zero_grad} because the weighted sum is negative at every location and the "
                     f"CAM's ReLU removes it: at this layer the image holds evidence against the target class only.")
        return text

    def _targets(self, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        predicted = logits.detach().argmax(dim=1)  # (B,)
        if self.fixed_class is not None:
            return torch.full_like(predicted, self.fixed_class)
        if self.cfg.target == "label" and not self.ctx.loaded.synsets and logits.shape[1] == 1000:
            # a nameless 1000-output head is in ImageNet's sorted-synset order (as predictions reads it)
            self.label_to_output = match_labels(self.ctx.dataset_classes, self.ctx.loaded.class_names,
                                                output_synsets(self.ctx.loaded.synsets, 1000))
        if self.cfg.target == "label" and len(self.label_to_output):
            mapping = torch.as_tensor(self.label_to_output, device=logits.device)
            labels = batch.labels
            mapped = torch.where(labels >= 0, mapping[labels.clamp_min(0)], torch.full_like(labels, -1))
            return torch.where(mapped >= 0, mapped, predicted)
        return predicted

    def state_dict(self) -> Dict[str, Any]:
        return {"layer": self.layer, "layout": self.layout, "missing": self.missing, "count": self.count,
                "class_sum": self.class_sum, "class_count": self.class_count, "gallery": self.gallery,
                "nonfinite": self.nonfinite, "zero": self.zero, "zero_grad": self.zero_grad, "grid": self.grid,
                "store": self.store.ref() if self.store is not None else None}

    def merge(self, state: Dict[str, Any]) -> None:
        self.count += state["count"]
        self.nonfinite += state["nonfinite"]
        self.zero += state.get("zero", 0)  # states saved before these counts existed have none
        self.zero_grad += state.get("zero_grad", 0)
        self.grid = self.grid or state["grid"]
        self.layout = self.layout or state["layout"]
        self.missing = self.missing or state["missing"]
        for cls, total in state["class_sum"].items():
            self.class_sum[cls] = self.class_sum.get(cls, 0) + total
            self.class_count[cls] = self.class_count.get(cls, 0) + state["class_count"][cls]
        self.gallery.merge(state["gallery"])
        self.store = absorb_rows(self.store, state["store"], self.ctx.results_dir / ".gradcam", self.ctx.row_capacity)

    def finalize(self) -> Optional[Section]:
        section = Section(id="gradcam", title="Grad-CAM")
        if self.store is not None:
            self.store.pack(self.ctx.results_dir / "gradcam.npz", layer=np.array(self.layer))
        if self.missing:
            section.summary = "not applicable: no spatial layer"
            section.elements.append(Text(self.missing))
            return section
        if not self.count:
            section.elements.append(Text("No image was processed, so there are no class activation maps."))
            return section
        names = display_names(self.ctx.loaded.class_names, max(list(self.class_sum) + [0]) + 1)
        target_text = {"predicted": "the predicted class", "label": "the folder's class (predicted when none)"}
        section.summary = (f"{self.cfg.method} on {self.layer} for {self.count} images, target: "
                           f"{target_text.get(str(self.cfg.target), 'class ' + str(self.cfg.target))}")
        section.elements.append(KeyValues([
            ("method", self.cfg.method), ("target layer", self.layer), ("read as", self._layout_text()),
            ("map resolution", "×".join(str(d) for d in self.grid)), ("images", self.count),
            ("colour scale", f"each map min-max normalised to [0, 1], colormap {HEATMAP_CMAP} (bright = more)"),
        ]))
        if self.nonfinite:
            section.alerts.append(Alert("error", f"{self.nonfinite} of {self.count} Grad-CAM maps contain NaN or Inf "
                                                 f"(shown as 0), from the target layer's output or its gradient"))
        if self.zero:
            section.alerts.append(Alert("warning", self._zero_text()))
        items = []
        for _, _, item in self.gallery.items():
            lines = [f"target: {names[item['target']]}",
                     f"predicted: {names[item['predicted']]} {item['confidence']:.1%}"]
            if item["label"] >= 0:
                lines.insert(0, f"label: {self.ctx.dataset_classes[item['label']]}")
            if not item["cam"].any():
                lines.append("map all zero: nothing to show")
            status = "neutral" if item["expected"] < 0 else ("bad" if item["wrong"] else "ok")
            cam = torch.from_numpy(item["cam"])  # (h, w) raw map
            thumb = thumbnail(item["image"], int(self.ctx.report.thumbnail_size))
            full = item["image"].permute(1, 2, 0).numpy()  # (H, W, 3): the model's input
            items.append(GalleryItem(image=heat_on_thumbnail(thumb, cam), title=item["path"], lines=lines,
                                     status=status, full=heat_on_thumbnail(full, cam)))
        note = ("misclassified first, then lowest confidence" if len(self.label_to_output)
                and (self.label_to_output >= 0).any() else "lowest confidence first")
        section.elements.append(Gallery(title="Class activation maps", items=items, note=note))
        top = sorted(self.class_count, key=lambda c: (-self.class_count[c], c))[: int(self.cfg.classes_shown)]
        means = [self.class_sum[c] / self.class_count[c] for c in top]
        titles = [f"{names[c]} (n={self.class_count[c]})" for c in top]
        section.elements.append(plots.map_grid(means, titles, name="class_mean_cam", cmap=HEATMAP_CMAP,
                                               caption="Mean normalised CAM per target class (most frequent "
                                                       "classes): where the model looks for each class on average",
                                               dpi=int(self.ctx.report.figure_dpi)))
        return section
