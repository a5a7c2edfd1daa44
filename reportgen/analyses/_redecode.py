"""Images decoded again at finalize for a gallery whose members are known only once every image is seen (nearest
neighbours, likely label issues, error slices, strategy clusters): the model's input as a thumbnail."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from reportgen.inputs.data import decode_image
from reportgen.inputs.paths import os_name
from reportgen.report.thumbnails import thumbnail

REDECODE_PIXELS = 1 << 40  # these images already passed dataset.max_pixels in the pass


def decode_thumbnail(ctx: Any, path: str, size: Optional[int] = None) -> Optional[np.ndarray]:
    """The image at `path` (relative to the dataset folder) as the model saw it (resized, cropped), as a (h, w, 3)
    uint8 thumbnail of `size` (default: report.thumbnail_size); None when it cannot be read now (changed or
    removed since the pass: the gallery says so)."""
    pixels = decode_model_input(ctx, path)
    if pixels is None:
        return None
    if pixels.shape[0] == 1:
        pixels = pixels.repeat(3, 1, 1)  # (3, H, W)
    return thumbnail(pixels, int(size if size is not None else ctx.report.thumbnail_size))


def decode_original(ctx: Any, path: str) -> Optional[np.ndarray]:
    """The image at `path` as decoded, before any resize: (H, W, 3) uint8 RGB (what boxes in the image's own pixels
    are drawn on); None when it cannot be read now."""
    if ctx.dataset_root is None:
        return None
    try:
        return np.asarray(decode_image(Path(ctx.dataset_root) / os_name(path), REDECODE_PIXELS).convert("RGB"))
    except Exception:
        return None


def decode_model_input(ctx: Any, path: str) -> Optional[torch.Tensor]:
    """The image at `path` as the model got it: (C, H, W) uint8, resized and cropped by the run's preprocessing
    (a detector's: as decoded); None when it cannot be read now."""
    if ctx.dataset_root is None:
        return None
    try:
        decoded = decode_image(Path(ctx.dataset_root) / os_name(path), REDECODE_PIXELS)
        return ctx.loaded.preprocess.to_uint8(decoded)  # (C, H, W) uint8, C = 1 or 3
    except Exception:
        return None
