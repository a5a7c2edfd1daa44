"""Small display copies of the images the model saw, for galleries (kept only for bounded sets of images)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def thumbnail(image: torch.Tensor, size: int) -> np.ndarray:
    """(3, H, W) uint8 tensor -> (h, w, 3) uint8 array whose longest side is at most `size` (antialiased).

    PIL, not torch: on the CPU, torch's small per-image ops cost ~50 ms here against ~5 ms for PIL's resize, and
    this runs inside the pass for every image that enters a gallery."""
    pixels = image.detach().cpu().permute(1, 2, 0).contiguous().numpy()  # (H, W, 3)
    height, width = pixels.shape[:2]
    scale = min(1.0, size / max(height, width))
    if scale >= 1.0:
        return pixels.copy()
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(pixels).resize(new_size, Image.BILINEAR, reducing_gap=None))
