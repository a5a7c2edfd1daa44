"""How a decoded image becomes a model input, split in two halves.

Workers resize and crop to a uint8 tensor (small to pin and copy, and the exact picture the model sees, which
galleries reuse); normalisation to float happens on the run device, batched. The numbers come from the weights'
metadata when torchvision has them, else from the config, else ImageNet's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERPOLATIONS = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side, centre-crop, then normalise with mean/std (the torchvision classification recipe)."""

    resize: int = 256
    crop: int = 224
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    @classmethod
    def resolve(cls, cfg: Any, weights_transform: Optional[Any] = None) -> "Preprocess":
        """Config values win, then the weights' transform (torchvision ImageClassification), then defaults."""
        base = cls()
        if weights_transform is not None:
            base = cls(
                resize=int(_first(weights_transform.resize_size)),
                crop=int(_first(weights_transform.crop_size)),
                mean=tuple(float(m) for m in weights_transform.mean),
                std=tuple(float(s) for s in weights_transform.std),
                interpolation=weights_transform.interpolation.value,
            )
        if cfg is None:
            return base
        interpolation = cfg.interpolation or base.interpolation
        if interpolation not in _INTERPOLATIONS:
            from reportgen.errors import ConfigError

            raise ConfigError("model.preprocess.interpolation", interpolation, "a resize filter",
                              sorted(_INTERPOLATIONS))
        return cls(
            resize=int(cfg.resize) if cfg.resize is not None else base.resize,
            crop=int(cfg.crop) if cfg.crop is not None else base.crop,
            mean=tuple(float(m) for m in cfg.mean) if cfg.mean is not None else base.mean,
            std=tuple(float(s) for s in cfg.std) if cfg.std is not None else base.std,
            interpolation=interpolation,
        )

    def to_uint8(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB image -> (3, crop, crop) uint8 tensor, resized and centre-cropped."""
        mode = _INTERPOLATIONS[self.interpolation]
        image = TF.resize(image, self.resize, interpolation=mode, antialias=True)
        image = TF.center_crop(image, [self.crop, self.crop])
        return TF.pil_to_tensor(image)  # (3, crop, crop) uint8

    def normalize(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, 3, H, W) uint8 on any device -> normalised float, computed where the tensor lives."""
        mean = torch.tensor(self.mean, device=images.device, dtype=dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=dtype).view(1, 3, 1, 1)
        return (images.to(dtype) / 255.0 - mean) / std  # (B, 3, H, W)


def _first(value: Sequence[int] | int) -> int:
    return value[0] if isinstance(value, (list, tuple)) else value
