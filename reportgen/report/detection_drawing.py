"""Boxes drawn on a thumbnail: predictions as solid frames coloured by what they are (a hit, a false positive of a
given kind), ground-truth objects as dashed frames (white over black, visible on any picture), each labelled with
its class (and a prediction's score). Boxes come in pixels of the original image and are scaled to the thumbnail.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# what a prediction is (see analyses/_detection_math.image_errors) -> its frame's colour
KIND_COLOURS: Dict[str, Tuple[int, int, int]] = {
    "tp": (40, 180, 60),  # a hit
    "duplicate": (240, 160, 0),  # a second box on an object already found
    "wrong_class": (200, 40, 200),  # on an object of another class
    "localization": (255, 110, 0),  # near an object of its class, but not enough overlap
    "background": (230, 30, 30),  # on nothing
    "ignored": (140, 140, 140),  # on a crowd / difficult region: not scored
    "unscored": (60, 120, 230),  # no ground truth for this image
}
KIND_WORDS = {"tp": "hit", "duplicate": "duplicate", "wrong_class": "wrong class", "localization": "poorly placed",
              "background": "background", "ignored": "ignored region", "unscored": "prediction"}
MISSED_COLOUR = (255, 255, 255)  # dashed: a ground-truth object no prediction found
DASH = 4  # pixels on, then off, of a dashed frame


def draw_boxes(thumb: np.ndarray, scale: float, predictions: Sequence[Tuple[Sequence[float], str, str]],
               truths: Sequence[Tuple[Sequence[float], str, bool]] = ()) -> np.ndarray:
    """(h, w, 3) uint8 thumbnail -> a copy with the boxes drawn. `scale`: thumbnail pixels per original pixel.
    `predictions`: (xyxy box, label text, kind); `truths`: (xyxy box, label text, missed). Ground truth first, so a
    prediction's frame stays on top."""
    image = Image.fromarray(thumb).convert("RGB")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for box, text, missed in truths:
        xyxy = _scaled(box, scale, image.size)
        _dashed_rectangle(draw, xyxy, MISSED_COLOUR if missed else (220, 220, 220), width=2 if missed else 1)
        if missed:
            _label(draw, font, xyxy, text, MISSED_COLOUR, below=True)
    for box, text, kind in predictions:
        colour = KIND_COLOURS.get(kind, KIND_COLOURS["unscored"])
        xyxy = _scaled(box, scale, image.size)
        draw.rectangle(xyxy, outline=colour, width=2)
        _label(draw, font, xyxy, text, colour, below=False)
    return np.asarray(image)


def _scaled(box: Sequence[float], scale: float, size: Tuple[int, int]) -> Tuple[float, float, float, float]:
    width, height = size
    x1, y1, x2, y2 = (float(v) * scale for v in box)
    return (min(max(x1, 0.0), width - 1), min(max(y1, 0.0), height - 1),
            min(max(x2, 0.0), width - 1), min(max(y2, 0.0), height - 1))


def _dashed_rectangle(draw: ImageDraw.ImageDraw, xyxy: Tuple[float, float, float, float],
                      colour: Tuple[int, int, int], width: int) -> None:
    """A dashed frame: black dashes under the coloured ones, offset by one dash, so it shows on light and dark."""
    x1, y1, x2, y2 = xyxy
    edges = [((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)), ((x2, y2), (x1, y2)), ((x1, y2), (x1, y1))]
    for (ax, ay), (bx, by) in edges:
        length = max(abs(bx - ax), abs(by - ay))
        steps = max(1, int(length // DASH))
        for i in range(steps):
            t0, t1 = i / steps, min(1.0, (i + 1) / steps)
            start, end = (ax + (bx - ax) * t0, ay + (by - ay) * t0), (ax + (bx - ax) * t1, ay + (by - ay) * t1)
            draw.line([start, end], fill=colour if i % 2 == 0 else (0, 0, 0), width=width)


def _label(draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont, xyxy: Tuple[float, float, float, float],
           text: str, colour: Tuple[int, int, int], below: bool) -> None:
    """The text on a filled tab at the frame's top-left corner (inside when there is no room above)."""
    if not text:
        return
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    width, height = right - left + 4, bottom - top + 2
    x = xyxy[0]
    y = xyxy[3] if below else xyxy[1] - height
    if y < 0:
        y = xyxy[1]
    draw.rectangle((x, y, x + width, y + height), fill=colour)
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    draw.text((x + 2, y + 1 - top), text, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255), font=font)


def thumbnail_of(image: np.ndarray, size: int) -> Tuple[np.ndarray, float]:
    """(H, W, 3) uint8 -> (thumbnail whose longest side is at most `size`, its scale: thumbnail / original)."""
    height, width = image.shape[:2]
    scale = min(1.0, size / max(height, width))
    if scale >= 1.0:
        return image.copy(), 1.0
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(new_size, Image.BILINEAR)), new_size[0] / width


def legend_lines(kinds: Optional[Sequence[str]] = None) -> str:
    """One line naming every frame style, for a gallery's note."""
    kinds = list(kinds or KIND_COLOURS)
    return ("solid frames: predictions (" + ", ".join(KIND_WORDS[k] for k in kinds) + "); dashed: ground truth "
            "(white, thicker: missed)")
