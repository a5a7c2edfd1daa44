"""`gradcam`: where the model looked, for every image of the folder, inside the one pass.

The capture engine makes the target layer's output an autograd leaf (parameters frozen), so
`torch.autograd.grad(score, activation)` differentiates only the head after that layer: no parameter gradients, no
second forward. Methods (Selvaraju et al. 2017; Chattopadhay et al. 2018; Jiang et al. 2021; Draelos & Carin 2020):

- gradcam:   relu(sum_c mean_hw(dS/dA)_c * A_c)
- gradcam++: channel weights sum_hw(relu(dS/dA) * alpha), alpha from the 2nd/3rd-power gradient formula
- layercam:  relu(sum_c relu(dS/dA)_c * A_c)          (element-wise weights, sharper maps)
- hirescam:  relu(sum_c (dS/dA)_c * A_c)              (element-wise, faithful to the score)

Vision transformers: token outputs (B, 1 + g*g, C) are reshaped to a (B, C, g, g) grid without the CLS token; the
default target there is the last encoder block's first LayerNorm (the block's output only reaches the head through
the CLS token, so its patch gradients are zero).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import nn

from reportgen.analyses.base import Analysis, Batch, Requirements, RunContext, register
from reportgen.engine.layers import last_spatial_layer, named_modules, select_layers, transformer_blocks
from reportgen.engine.tensors import to_grid
from reportgen.errors import ConfigError
from reportgen.inputs.labels import display_names, match_labels
from reportgen.report import plots
from reportgen.report.elements import Alert, Gallery, GalleryItem, KeyValues, Section, Text
from reportgen.report.overlays import HEATMAP_CMAP, heat_on_thumbnail, normalise_maps
from reportgen.report.thumbnails import thumbnail
from reportgen.state.reducers import BoundedTop
from reportgen.state.streams import RowStore, absorb_rows

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
    """ViT-like models (nn.MultiheadAttention blocks): the last block's first LayerNorm; otherwise the module of
    the last spatial (B, C, h, w) output."""
    if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        blocks = transformer_blocks(model)
        if blocks:
            modules = named_modules(model)
            norms = [n for n, m in modules.items() if n.startswith(blocks[-1] + ".") and isinstance(m, nn.LayerNorm)]
            if norms:
                return norms[0]
    return last_spatial_layer(model, example)


@register("gradcam")
class GradCAM(Analysis):
    Config = GradCAMConfig
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
        self.label_to_output = match_labels(ctx.dataset_classes, ctx.loaded.class_names)
        self.layer: Optional[str] = None
        self.store: Optional[RowStore] = None
        self.grid: Optional[tuple] = None
        self.count = 0
        self.class_sum: Dict[int, np.ndarray] = {}  # target class -> sum of normalised CAMs
        self.class_count: Dict[int, int] = {}
        self.gallery = BoundedTop(int(ctx.report.gallery_size))
        self.nonfinite = 0

    def begin(self, example: Batch) -> None:
        model = self.ctx.model
        if self.cfg.layer:
            self.layer = select_layers(model, [self.cfg.layer], "analysis.gradcam.layer")[-1]
        else:
            self.layer = default_target_layer(model, example.inputs[:1])
            if self.layer is None:
                raise ConfigError("analysis.gradcam.layer", None, "a layer with a spatial or token-grid output "
                                                                  "(the model has none to default to)")

    def requires(self) -> Requirements:
        return Requirements(gradients=[self.layer]) if self.layer else Requirements()

    def update(self, batch: Batch, logits: torch.Tensor, captures: Any) -> None:
        if self.fixed_class is not None and self.fixed_class >= logits.shape[1]:
            raise ConfigError("analysis.gradcam.target", self.fixed_class,
                              f"a class index below the model's {logits.shape[1]} outputs")
        activation = captures[self.layer]  # the leaf: (B, C, h, w) or (B, N, C)
        targets = self._targets(batch, logits)  # (B,)
        score = logits.gather(1, targets[:, None]).sum()
        (grads,) = torch.autograd.grad(score, activation, retain_graph=True)
        cams = cam_from(self.cfg.method, to_grid(activation.detach().float()), to_grid(grads.float()))  # (B, h, w)
        probs = torch.softmax(logits.detach().float(), dim=1)  # (B, K)
        confidence, predicted = probs.max(dim=1)  # (B,)
        normalised = normalise_maps(cams)  # (B, h, w) in [0, 1]
        finite = torch.isfinite(cams).flatten(1).all(dim=1)  # (B,)
        cams_np, norm_np = cams.cpu().numpy().astype(np.float32), normalised.cpu().numpy()
        targets_np, conf_np = targets.cpu().numpy(), confidence.cpu().numpy()
        predicted_np, labels_np = predicted.cpu().numpy(), batch.labels.cpu().numpy()
        self.nonfinite += int((~finite).sum().item())
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

    def _targets(self, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        predicted = logits.detach().argmax(dim=1)  # (B,)
        if self.fixed_class is not None:
            return torch.full_like(predicted, self.fixed_class)
        if self.cfg.target == "label" and len(self.label_to_output):
            mapping = torch.as_tensor(self.label_to_output, device=logits.device)
            labels = batch.labels
            mapped = torch.where(labels >= 0, mapping[labels.clamp_min(0)], torch.full_like(labels, -1))
            return torch.where(mapped >= 0, mapped, predicted)
        return predicted

    def state_dict(self) -> Dict[str, Any]:
        return {"layer": self.layer, "count": self.count, "class_sum": self.class_sum,
                "class_count": self.class_count, "gallery": self.gallery, "nonfinite": self.nonfinite,
                "grid": self.grid, "store": self.store.ref() if self.store is not None else None}

    def merge(self, state: Dict[str, Any]) -> None:
        self.count += state["count"]
        self.nonfinite += state["nonfinite"]
        self.grid = self.grid or state["grid"]
        for cls, total in state["class_sum"].items():
            self.class_sum[cls] = self.class_sum.get(cls, 0) + total
            self.class_count[cls] = self.class_count.get(cls, 0) + state["class_count"][cls]
        self.gallery.merge(state["gallery"])
        self.store = absorb_rows(self.store, state["store"], self.ctx.results_dir / ".gradcam", self.ctx.row_capacity)

    def finalize(self) -> Optional[Section]:
        section = Section(id="gradcam", title="Grad-CAM")
        if self.store is not None:
            self.store.pack(self.ctx.results_dir / "gradcam.npz", layer=np.array(self.layer))
        if not self.count:
            section.elements.append(Text("No image was processed, so there are no class activation maps."))
            return section
        names = display_names(self.ctx.loaded.class_names, max(list(self.class_sum) + [0]) + 1)
        target_text = {"predicted": "the predicted class", "label": "the folder's class (predicted when none)"}
        section.summary = (f"{self.cfg.method} on {self.layer} for {self.count} images, target: "
                           f"{target_text.get(str(self.cfg.target), 'class ' + str(self.cfg.target))}")
        section.elements.append(KeyValues([
            ("method", self.cfg.method), ("target layer", self.layer),
            ("map resolution", "×".join(str(d) for d in self.grid)), ("images", self.count),
            ("colour scale", f"each map min-max normalised to [0, 1], colormap {HEATMAP_CMAP} (bright = more)"),
        ]))
        if self.nonfinite:
            section.alerts.append(Alert("error", f"{self.nonfinite} Grad-CAM maps contain NaN or Inf (shown as 0)"))
        items = []
        for _, _, item in self.gallery.items():
            lines = [f"target: {names[item['target']]}",
                     f"predicted: {names[item['predicted']]} {item['confidence']:.1%}"]
            if item["label"] >= 0:
                lines.insert(0, f"label: {self.ctx.dataset_classes[item['label']]}")
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
