"""Heatmaps laid over the pictures the model saw (Grad-CAM, attention, activation maps), as uint8 RGB arrays ready
for a Gallery. One colormap and one alpha for every overlay in a report, so maps compare at a glance."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps

HEATMAP_CMAP = "inferno"
HEATMAP_ALPHA = 0.55


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """(B, h, w) -> each map min-max scaled to [0, 1] (a constant map becomes all zeros); NaN/Inf become 0."""
    maps = torch.nan_to_num(maps.float(), nan=0.0, posinf=0.0, neginf=0.0)
    flat = maps.flatten(1)  # (B, h*w)
    low = flat.min(dim=1).values.view(-1, 1, 1)
    span = (flat.max(dim=1).values.view(-1, 1, 1) - low).clamp_min(1e-12)
    return (maps - low) / span


def resize_maps(maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h, w) -> (B, height, width), bilinear (what Grad-CAM tools use to lay a map over its image)."""
    return F.interpolate(maps[:, None].float(), size=(height, width), mode="bilinear", align_corners=False)[:, 0]


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = HEATMAP_ALPHA, cmap: str = HEATMAP_CMAP) -> np.ndarray:
    """(H, W, 3) uint8 image and (H, W) map in [0, 1] -> (H, W, 3) uint8 blend, map colour-mapped."""
    colours = colormaps[cmap](np.clip(heat, 0.0, 1.0))[..., :3]  # (H, W, 3) float in [0, 1]
    blended = (1.0 - alpha) * image.astype(np.float32) / 255.0 + alpha * colours
    return (np.clip(blended, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def heat_on_thumbnail(thumb: np.ndarray, raw_map: torch.Tensor) -> np.ndarray:
    """A raw (h, w) map, normalised and upsampled to the (H, W, 3) thumbnail, blended over it."""
    heat = resize_maps(normalise_maps(raw_map[None]), thumb.shape[0], thumb.shape[1])[0]  # (H, W)
    return overlay(thumb, heat.cpu().numpy())
