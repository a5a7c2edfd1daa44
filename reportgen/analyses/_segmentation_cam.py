"""Grad-CAM for a segmentation model: which features made it paint class c where it did.

The score of class c in one image is the sum of its logits over the pixels the model predicts as c, at the model's
output resolution (pytorch-grad-cam's `SemanticSegmentationTarget` on the same output). Several (image, class)
pairs share one backward: images in a batch are independent in eval mode, so the gradient of the sum of every
image's own score with respect to its own activations is that image's gradient. A batch needs as many backwards as
the most classes asked for one image.

The default layer is the last module whose output is a feature map (B, C, h, w) that the score depends on (nonzero
gradient on a probe) and that is not a map of class scores (C == classes): DeepLabV3 -> the ASPP head's last ReLU,
SegFormer -> the decode head's fused features, a U-Net -> its decoder's last block. Never the logits themselves (a
CAM of the score map explains nothing), never a branch that does not reach the output (torchvision's auxiliary
classifier).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from reportgen.analyses.gradcam import cam_from
from reportgen.engine.capture import ModuleProbe
from reportgen.engine.grids import spatial_layout
from reportgen.inputs.tasks import adapt_outputs

PROBE_SIDE = 128  # the probe's longest side: the layer choice does not depend on the resolution


def default_cam_layer(model: nn.Module, example: torch.Tensor, num_classes: int) -> Optional[str]:
    """The last module (in call order) whose plain (B, C, h, w) output, C != `num_classes`, h and w > 1, has a
    nonzero gradient of the predicted classes' scores on a probe of `example`'s first image; None when none has."""
    outputs: Dict[str, torch.Tensor] = {}

    def keep(key: str, name: str, module: nn.Module, args, output) -> None:
        if (isinstance(output, torch.Tensor) and output.dim() == 4 and output.grad_fn is not None
                and spatial_layout(tuple(output.shape), module, *source.shape[-2:]) == "nchw"
                and output.shape[1] != num_classes and min(output.shape[2:]) > 1 and name not in outputs):
            outputs[name] = output

    with ModuleProbe(model, on_end=keep, freeze=True), torch.enable_grad():
        source = _probe_input(example).requires_grad_()  # so every module's output is on the graph
        logits = adapt_outputs("segmentation", model(source), 1).mask_logits  # (1, K, h, w)
        score = class_scores(logits, [logits[0].detach().argmax(0).unique()[:3].tolist()]).sum()
        names = list(outputs)  # in the order the calls returned
        grads = torch.autograd.grad(score, [outputs[n] for n in names], allow_unused=True)
    reaching = [n for n, g in zip(names, grads) if g is not None and bool(g.abs().sum() > 0)]
    return reaching[-1] if reaching else None


def _probe_input(example: torch.Tensor) -> torch.Tensor:
    """The example's first image, shrunk to at most PROBE_SIDE pixels a side (sides kept multiples of 32, which
    every segmentation network divides evenly)."""
    image = example[:1].float()
    height, width = image.shape[-2:]
    scale = min(1.0, PROBE_SIDE / max(height, width))
    size = [max(32, int(round(side * scale / 32)) * 32) for side in (height, width)]
    return torch.nn.functional.interpolate(image, size=size, mode="bilinear", align_corners=False)


def class_scores(logits: torch.Tensor, classes: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, K, h, w) logits and, per image, the classes to score (one list per image, possibly empty) -> one score
    per (image, class) pair, in order: the sum of class c's logits over the pixels predicted as c."""
    predicted = logits.detach().argmax(dim=1)  # (B, h, w)
    scores = [(logits[i, c] * (predicted[i] == c)).sum() for i, wanted in enumerate(classes) for c in wanted]
    return torch.stack(scores) if scores else logits.sum() * 0.0


def class_cams(logits: torch.Tensor, activation: torch.Tensor, grid, method: str,
               classes: Sequence[Sequence[int]]) -> List[List[torch.Tensor]]:
    """For each image, one raw (h, w) CAM per class in `classes[i]` (the same order), for the gradient leaf
    `activation`; `grid` turns the leaf (and its gradient) into (B, C, h, w). One backward per class slot."""
    slots = max((len(c) for c in classes), default=0)
    maps: List[List[torch.Tensor]] = [[] for _ in classes]
    acts = grid(activation.detach().float())  # (B, C, h, w)
    for slot in range(slots):
        wanted = [[c[slot]] if slot < len(c) else [] for c in classes]
        score = class_scores(logits, wanted).sum()
        (grads,) = torch.autograd.grad(score, activation, retain_graph=True, allow_unused=True)
        if grads is None:
            grads = torch.zeros_like(activation)
        cams = cam_from(method, acts, grid(grads.float()))  # (B, h, w)
        for i, chosen in enumerate(wanted):
            if chosen:
                maps[i].append(cams[i].detach().cpu())
    return maps


def top_predicted(pred_counts: torch.Tensor, limit: int) -> List[int]:
    """The classes with the most predicted pixels (ties: lower id first), at most `limit`."""
    order = sorted(((-int(n), c) for c, n in enumerate(pred_counts.tolist()) if n > 0))
    return [c for _, c in order[:limit]]
