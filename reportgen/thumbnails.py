"""Small display copies of the images the model saw, for galleries (kept only for bounded sets of images)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def thumbnail(image: torch.Tensor, size: int) -> np.ndarray:
    """(3, H, W) uint8 tensor -> (h, w, 3) uint8 array whose longest side is at most `size` (antialiased)."""
    image = image.detach().cpu()
    _, height, width = image.shape
    scale = min(1.0, size / max(height, width))
    if scale < 1.0:
        new_size = (max(1, round(height * scale)), max(1, round(width * scale)))
        resized = F.interpolate(image[None].float(), size=new_size, mode="bilinear", antialias=True,
                                align_corners=False)  # (1, 3, h, w)
        image = resized[0].round().clamp(0, 255).to(torch.uint8)
    return image.permute(1, 2, 0).contiguous().numpy()  # (h, w, 3)
