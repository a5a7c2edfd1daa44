"""How a decoded image becomes a model input, split in two halves.

Workers resize and crop to a uint8 tensor (small to pin and copy, and the exact picture the model sees, which
galleries reuse); normalisation to float happens on the run device, batched. The numbers come from the model's
library (torchvision weights' metadata, timm's data config, a Hugging Face image processor) unless the config sets
them, else ImageNet's.

Four geometries cover the libraries' evaluation recipes (`crop_mode`):
- center: shorter side to `resize`, then centre crop `crop` (torchvision; timm's default "center")
- squash: both sides to `resize` (aspect ratio not kept), then centre crop `crop` (timm "squash"; a Hugging Face
  processor with size {height, width}, where crop == resize when it does not crop)
- border: longer side to `resize`, then centre crop or pad to `crop` with the mean colour (timm "border")
- whole: shorter side to `resize`, no crop, each side rounded to a multiple of `size_divisor` when set
  (torchvision's segmentation weights: every labelled pixel is seen; images keep their own aspect ratio, so a batch
  holds images of several sizes: see loader.py's `RawBatch.groups`)
- none: the image as decoded, at its own size (torchvision's detectors resize and normalise inside the model, so
  their boxes come back in the image's own pixels); `resize`/`crop` only size the blank probe
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
    "lanczos": InterpolationMode.LANCZOS,
    "box": InterpolationMode.BOX,
    "hamming": InterpolationMode.HAMMING,
}
CROP_MODES = ("center", "squash", "border", "whole", "none")
CHANNELS = (1, 3)  # grayscale or RGB decode


@dataclass(frozen=True)
class Preprocess:
    """Resize, crop (see the module docstring for `crop_mode`), then normalise with per-channel mean/std."""

    resize: int = 256
    crop: int = 224
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_mode: str = "center"
    channels: int = 3  # 1: images are decoded to grayscale ("L"), 3: to RGB
    crop_offset: str = "round"  # centre crop's top/left: round((size - crop) / 2) as torchvision and timm do, or
    #   "floor" as transformers' image processors do (the two differ by a pixel when size - crop is odd)
    size_divisor: int = 1  # whole: each resized side rounded to a multiple of this (a U-Net's total stride)
    max_size: int = 0  # whole: the longer side at most this (a transformers detector's longest_edge); 0: no cap

    @classmethod
    def from_torchvision(cls, transform: Any, channels: int = 3) -> "Preprocess":
        """The numbers of a torchvision weights' `transforms()` (ImageClassification)."""
        return cls(resize=int(_first(transform.resize_size)), crop=int(_first(transform.crop_size)),
                   mean=tuple(float(m) for m in transform.mean), std=tuple(float(s) for s in transform.std),
                   interpolation=transform.interpolation.value, channels=channels)

    @classmethod
    def from_torchvision_segmentation(cls, transform: Any, channels: int = 3) -> "Preprocess":
        """The numbers of a torchvision segmentation weights' `transforms()` (SemanticSegmentation): shorter side to
        `resize_size`, no crop (`crop` = `resize`: the square the probes use)."""
        size = int(_first(transform.resize_size))
        return cls(resize=size, crop=size, mean=tuple(float(m) for m in transform.mean),
                   std=tuple(float(s) for s in transform.std), interpolation=transform.interpolation.value,
                   crop_mode="whole", channels=channels)

    @classmethod
    def resolve(cls, cfg: Any, base: Optional["Preprocess"] = None, source: str = "ImageNet defaults") -> "Preprocess":
        """Config values (`model.preprocess.*`) win over `base` (what the model's library says, named by `source` in
        errors), which wins over the defaults. Mean/std must have one value per input channel."""
        from reportgen.errors import ConfigError

        base = base or cls()
        get = (lambda key: None) if cfg is None else (lambda key: cfg.get(key))
        interpolation = get("interpolation") or base.interpolation
        if interpolation not in INTERPOLATIONS:
            raise ConfigError("model.preprocess.interpolation", interpolation, "a resize filter",
                              sorted(INTERPOLATIONS))
        crop_mode = get("crop_mode") or base.crop_mode
        if crop_mode not in CROP_MODES:
            raise ConfigError("model.preprocess.crop_mode", crop_mode, "a resize/crop geometry", list(CROP_MODES))
        channels = int(get("channels")) if get("channels") is not None else base.channels
        if channels not in CHANNELS:
            raise ConfigError("model.preprocess.channels", channels, "1 (grayscale) or 3 (RGB) input channels",
                              [str(c) for c in CHANNELS])
        divisor = int(get("size_divisor")) if get("size_divisor") is not None else base.size_divisor
        max_size = int(get("max_size")) if get("max_size") is not None else base.max_size
        if divisor < 1:
            raise ConfigError("model.preprocess.size_divisor", divisor, "a positive number of pixels (1: any size)")
        resolved = dataclasses.replace(
            base, size_divisor=divisor, max_size=max_size,
            resize=int(get("resize")) if get("resize") is not None else base.resize,
            crop=int(get("crop")) if get("crop") is not None else base.crop,
            mean=tuple(float(m) for m in get("mean")) if get("mean") is not None else base.mean,
            std=tuple(float(s) for s in get("std")) if get("std") is not None else base.std,
            interpolation=interpolation, crop_mode=crop_mode, channels=channels)
        for key in ("mean", "std"):
            values = getattr(resolved, key)
            if len(values) != channels:
                origin = "model.preprocess" if get(key) is not None else source
                raise ConfigError(f"model.preprocess.{key}", list(values),
                                  f"{channels} value(s), one per input channel (the model takes {channels} "
                                  f"channel(s); these {len(values)} came from {origin}); set "
                                  f"model.preprocess.mean and model.preprocess.std to the values it was trained with")
        if resolved.resize < 1 or resolved.crop < 1:
            raise ConfigError("model.preprocess.resize", [resolved.resize, resolved.crop],
                              "positive resize and crop sizes in pixels")
        return resolved

    def for_segmentation(self, cfg: Any) -> "Preprocess":
        """A segmentation model scores every pixel of the user's masks, so no crop may drop any: a geometry that
        crops (center, border) becomes `whole` at the same `resize`, unless `model.preprocess.crop_mode` names one.
        `squash` with no crop (a transformers processor's {height, width}) already sees the whole image."""
        if self.crop_mode in ("whole", "squash") and (self.crop_mode == "whole" or self.crop >= self.resize):
            return self
        if cfg is not None and cfg.get("crop_mode"):
            return self
        return dataclasses.replace(self, crop_mode="whole", crop=self.resize)

    def for_detection(self, cfg: Any, resizes_inside: bool) -> "Preprocess":
        """A detector's boxes are in the pixels of what it got, so it gets the whole image as decoded (`none`: a
        crop would lose objects) unless `model.preprocess.crop_mode` names a geometry; one that resizes and
        normalises inside (torchvision's) also gets [0, 1] values (mean 0, std 1) unless the config sets them."""
        get = (lambda key: None) if cfg is None else (lambda key: cfg.get(key))
        plain = resizes_inside
        keeps_all = self.crop_mode in ("whole", "none") or (self.crop_mode == "squash" and self.crop >= self.resize)
        return dataclasses.replace(
            self, crop_mode=get("crop_mode") or (self.crop_mode if keeps_all else "none"),
            mean=(0.0,) * self.channels if plain and get("mean") is None else self.mean,
            std=(1.0,) * self.channels if plain and get("std") is None else self.std)

    def describe(self) -> Dict[str, Any]:
        """The effective numbers, as the manifest records them."""
        return {"resize": self.resize, "crop": self.crop, "crop_mode": self.crop_mode,
                "interpolation": self.interpolation, "mean": list(self.mean), "std": list(self.std),
                "channels": self.channels, "crop_offset": self.crop_offset, "size_divisor": self.size_divisor,
                "max_size": self.max_size}

    def summary(self) -> str:
        """One line for the report's overview."""
        geometry = {"center": f"shorter side {self.resize}, centre crop {self.crop}",
                    "squash": f"stretch to {self.resize}x{self.resize}"
                              + (f", centre crop {self.crop}" if self.crop != self.resize else ""),
                    "border": f"longer side {self.resize}, crop/pad to {self.crop}",
                    "none": "the image as decoded (the model resizes inside)",
                    "whole": f"shorter side {self.resize}, whole image (no crop)"
                             + (f", longer side at most {self.max_size}" if self.max_size else "")
                             + (f", sides multiples of {self.size_divisor}" if self.size_divisor > 1 else "")
                    }[self.crop_mode]
        return (f"{geometry}, {self.interpolation}, {'grayscale' if self.channels == 1 else 'RGB'}, "
                f"mean {list(self.mean)}, std {list(self.std)}")

    def to_uint8(self, image: Image.Image) -> torch.Tensor:
        """PIL image (RGB or L) -> (channels, crop, crop) uint8 tensor, resized and cropped; `whole`: (channels,
        h, w) with the shorter side `resize`."""
        image = image.convert("L" if self.channels == 1 else "RGB")
        mode = INTERPOLATIONS[self.interpolation]
        if self.crop_mode == "none":
            return TF.pil_to_tensor(image)  # (C, H, W) uint8, as decoded
        if self.crop_mode == "whole":
            return TF.pil_to_tensor(TF.resize(image, self.whole_size(image.height, image.width), interpolation=mode,
                                              antialias=True))  # (C, h, w) uint8
        if self.crop_mode == "squash":
            image = TF.resize(image, [self.resize, self.resize], interpolation=mode, antialias=True)
        elif self.crop_mode == "border":
            ratio = max(image.height / self.resize, image.width / self.resize)
            size = [max(1, round(image.height / ratio)), max(1, round(image.width / ratio))]  # (h, w), longer = resize
            image = TF.resize(image, size, interpolation=mode, antialias=True)
            image = _pad_to(image, self.crop, tuple(round(255 * m) for m in self.mean))
        else:
            image = TF.resize(image, self.resize, interpolation=mode, antialias=True)
        if self.crop_offset == "floor" and min(image.width, image.height) >= self.crop:
            top, left = (image.height - self.crop) // 2, (image.width - self.crop) // 2
            image = TF.crop(image, top, left, self.crop, self.crop)
        else:
            image = TF.center_crop(image, [self.crop, self.crop])
        return TF.pil_to_tensor(image)  # (C, crop, crop) uint8

    def whole_size(self, height: int, width: int) -> List[int]:
        """[h, w] of an image after the `whole` resize: shorter side `resize`, the longer int(resize * long / short)
        (torchvision's rule); with `max_size`, the shorter side is lowered so the longer one stays within it, by the
        rule of transformers' shortest_edge/longest_edge processors (DETR's); then each side rounded to the nearest
        multiple of `size_divisor`."""
        short, long = min(height, width), max(height, width)
        size, exact = self.resize, None
        if self.max_size and long / short * size > self.max_size:
            exact = self.max_size * short / long  # the shorter side that puts the longer one at max_size
            size = int(round(exact))
        if short == size:
            h, w = height, width
        else:
            sides = (size, int((exact if exact is not None else size) * long / short))
            h, w = sides if height <= width else sides[::-1]
        if self.size_divisor > 1:
            h, w = (max(self.size_divisor, round(side / self.size_divisor) * self.size_divisor) for side in (h, w))
        return [h, w]

    def normalize(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, C, H, W) uint8 on any device -> normalised float, computed where the tensor lives."""
        mean = torch.tensor(self.mean, device=images.device, dtype=dtype).view(1, -1, 1, 1)  # (1, C, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=dtype).view(1, -1, 1, 1)  # (1, C, 1, 1)
        return (images.to(dtype) / 255.0 - mean) / std  # (B, C, H, W)


def _pad_to(image: Image.Image, size: int, fill: Tuple[int, ...]) -> Image.Image:
    """Pad symmetrically to at least size x size with `fill` (the border mode's mean colour)."""
    pad_w, pad_h = max(0, size - image.width), max(0, size - image.height)
    if not pad_w and not pad_h:
        return image
    left, top = pad_w // 2, pad_h // 2
    return TF.pad(image, [left, top, pad_w - left, pad_h - top], fill=fill[0] if image.mode == "L" else fill)


def _first(value: Sequence[int] | int) -> int:
    return value[0] if isinstance(value, (list, tuple)) else value
