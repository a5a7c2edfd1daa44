"""Ground-truth masks of a segmentation run: one PNG per image, `<dataset.masks>/a/b.png` for image `a/b.jpg`, whose
pixel value (or palette index) is the class of that pixel.

A mask is read exactly as stored: never resized (a mask of another size than its image is refused, not guessed
at), never converted through colours (a palette PNG's index is the class, whatever colour the palette gives it) and
never EXIF-transposed, while images are (`reportgen.inputs.data.decode_image` applies their EXIF orientation): a mask
is an array of class ids, not a photo, and annotation tools write it in the upright image's pixel grid.

Every problem with one mask is a line naming the mask file, never an exception: one bad mask must not stop a run
over a folder. A missing mask is no problem at all: that image is unlabelled.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Mapping, Optional, Tuple

import numpy as np
from PIL import Image

from reportgen.errors import ConfigError
from reportgen.inputs.paths import escape_name, os_name

# PIL modes whose pixel value is the class: 8-bit grey, palette (the index), 16/32-bit grey, 1-bit
INDEX_MODES = ("L", "P", "I;16", "I;16L", "I;16B", "I", "1")
MAX_MASK_VALUE = 65535  # PNG holds at most 16 bits per grey or palette sample
_SHOWN_VALUES = 8  # out-of-range values listed in a warning; the rest are counted


@dataclass
class MaskRead:
    """What reading one image's mask gave.

    - `missing`: no mask file; the image is unlabelled (not a problem). `mask` and `problem` are None.
    - `mask` set, `problem` None: a clean mask, scored.
    - `mask` set, `problem` set: scored with a warning (e.g. values outside the classes, now ignored).
    - `mask` None, `problem` set: not scored (`fatal`); the line says why and what to do, and ends with "the
      image is not scored".
    """

    mask: Optional[np.ndarray] = None  # (H, W) int64 class ids; ignored pixels hold ignore_index
    problem: Optional[str] = None  # one line naming the mask file: the reason it was refused, or a warning
    missing: bool = False  # no mask file for this image

    @property
    def fatal(self) -> bool:
        """The mask could not be used: the image is not scored, and `problem` says why."""
        return self.mask is None and self.problem is not None

    @property
    def warning(self) -> Optional[str]:
        """The problem line of a mask that was still scored; None otherwise."""
        return self.problem if self.mask is not None else None


class MaskFolder:
    """The masks under `root` for a model of `num_classes` classes; `mapping` (mask value -> class index, or None
    when mask values are the class indices) is applied to every mask, and unmapped values become `ignore_index`."""

    def __init__(self, root: Path, ignore_index: int, mapping: Optional[Mapping[int, int]], num_classes: int):
        root = Path(root)
        if not root.is_dir():
            raise ConfigError("dataset.masks", str(root),
                              "an existing folder of PNG masks (the mask of image `a/b.jpg` is `a/b.png` in it), or "
                              "null for a run without ground truth")
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.root = root
        self.ignore_index = int(ignore_index)
        self.num_classes = int(num_classes)
        self._lut = None if mapping is None else self._lookup_table(mapping)  # (max key + 1,) int64

    def _lookup_table(self, mapping: Mapping[int, int]) -> np.ndarray:
        """mask value -> class index for every value up to the largest key (ignore_index where unmapped); refuses
        entries that could not work, naming the entry and the valid range."""
        expected_value = (f"class indices in [0, {self.num_classes - 1}] (the model has {self.num_classes} classes) "
                          f"or dataset.ignore_index ({self.ignore_index})")
        for key, value in mapping.items():
            if not _is_int(key) or not 0 <= int(key) <= MAX_MASK_VALUE:
                raise ConfigError("dataset.mask_mapping", {key: value},
                                  f"integer mask values in [0, {MAX_MASK_VALUE}] as keys (PNG masks hold 8- or "
                                  "16-bit values)")
            if not _is_int(value) or not (0 <= int(value) < self.num_classes or int(value) == self.ignore_index):
                raise ConfigError("dataset.mask_mapping", {key: value}, expected_value)
        size = max((int(k) for k in mapping), default=-1) + 1
        lut = np.full(size, self.ignore_index, dtype=np.int64)  # (max key + 1,)
        for key, value in mapping.items():
            lut[int(key)] = int(value)
        return lut

    def relative_name(self, escaped_image_path: str) -> str:
        """The escaped name of the mask relative to `root`: the image's path with its suffix replaced by .png."""
        return str(PurePosixPath(escaped_image_path).with_suffix(".png"))

    def path_for(self, escaped_image_path: str) -> Path:
        """The mask file the image `escaped_image_path` (an escaped name, see reportgen.inputs.paths) should have,
        as the real file-system path."""
        return self.root / os_name(self.relative_name(escaped_image_path))

    def read(self, escaped_image_path: str, image_size: Tuple[int, int]) -> MaskRead:
        """The mask of one image whose decoded (EXIF-upright) size is `image_size` = (height, width); see MaskRead
        for what each outcome means."""
        path = self.path_for(escaped_image_path)
        label = f"mask '{self.relative_name(escaped_image_path)}'"
        if not os.path.lexists(path):
            return MaskRead(missing=True)
        try:
            raw = self._decode(path, label, tuple(int(s) for s in image_size))
        except _Refused as refused:
            return MaskRead(problem=escape_name(f"{refused}; the image is not scored"))
        except Exception as exc:  # any decoder error: truncated, not an image, unreadable file
            message = f"{type(exc).__name__}: {exc}"
            for full in (repr(str(path))[1:-1], str(path)):
                message = message.replace(full, self.relative_name(escaped_image_path))  # not the machine's folder
            return MaskRead(problem=escape_name(f"{label} could not be read ({message}); the image is not scored"))
        mask = self._classes(raw)  # (H, W) int64
        return MaskRead(mask=mask, problem=self._out_of_range(mask, label))

    def _decode(self, path: Path, label: str, image_size: Tuple[int, int]) -> np.ndarray:
        """The stored pixel values (H, W), after checking format, mode and size (before decoding the pixels)."""
        if not path.is_file():
            raise _Refused(f"{label} is not a file")
        with Image.open(path) as image:
            if image.format != "PNG":
                raise _Refused(f"{label} is {image.format or 'an unknown format'} data, not a PNG: masks must be "
                               "lossless index or palette PNGs (lossy compression changes class ids at edges)")
            if image.mode not in INDEX_MODES:
                raise _Refused(f"{label}: {_mode_reason(image.mode)}")
            mask_size = (image.height, image.width)
            if mask_size != image_size:
                rotated = " (the image's EXIF orientation may have turned it; masks are read as stored)" \
                    if mask_size == image_size[::-1] else ""
                raise _Refused(f"{label} is {mask_size[0]}x{mask_size[1]} (height x width) but its image is "
                               f"{image_size[0]}x{image_size[1]}{rotated}: masks are never resized; save the mask "
                               "at the image's size")
            image.seek(0)
            return np.asarray(image)  # (H, W): uint8, uint16, int32 or bool; palette indices, never colours

    def _classes(self, raw: np.ndarray) -> np.ndarray:
        """Stored values -> (H, W) int64 class ids through the mapping (unmapped values -> ignore_index)."""
        values = raw.astype(np.int64)  # (H, W)
        if self._lut is None:
            return values
        mask = np.full(values.shape, self.ignore_index, dtype=np.int64)  # (H, W)
        known = (values >= 0) & (values < len(self._lut))
        mask[known] = self._lut[values[known]]
        return mask

    def _out_of_range(self, mask: np.ndarray, label: str) -> Optional[str]:
        """Sets values that are neither a class nor ignore_index to ignore_index (in place) and says which, with
        their pixel counts; None when there were none."""
        bad = ((mask < 0) | (mask >= self.num_classes)) & (mask != self.ignore_index)  # (H, W) bool
        if not bad.any():
            return None
        values, counts = np.unique(mask[bad], return_counts=True)
        mask[bad] = self.ignore_index
        shown = ", ".join(f"{v} ({c:,} px)" for v, c in zip(values[:_SHOWN_VALUES], counts[:_SHOWN_VALUES]))
        more = f" and {len(values) - _SHOWN_VALUES} more values" if len(values) > _SHOWN_VALUES else ""
        return escape_name(
            f"{label}: {int(bad.sum()):,} pixels hold values that are no model class (0..{self.num_classes - 1}) and "
            f"not dataset.ignore_index ({self.ignore_index}): {shown}{more}; they were scored as ignored. Map mask "
            "values to class indices with dataset.mask_mapping, or set dataset.ignore_index")


class _Refused(Exception):
    """A mask that opened but cannot be used; the message is the problem line."""


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _mode_reason(mode: str) -> str:
    """Why a PNG of this PIL mode is refused, and what to do."""
    if mode in ("RGB", "RGBA"):
        return (f"an {mode} mask (colour-coded): reportgen reads index or palette PNGs whose pixel value is the "
                "class; convert it to a palette PNG")
    if mode == "LA":
        return ("a grey + alpha (LA) mask: reportgen reads index or palette PNGs whose pixel value is the class; "
                "save it without the alpha channel")
    return (f"a PNG of mode {mode}: reportgen reads index or palette PNGs (8- or 16-bit grey, palette, 1-bit) "
            "whose pixel value is the class")
