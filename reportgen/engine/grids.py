"""How a module's output lies on the image, decided from evidence rather than from a list of model names.

A 4-D output (B, a, b, c) is either channels-first (B, C, h, w) or channels-last (B, h, w, C). The image decides
first: a feature grid is the input seen at one stride, so its two sides shrink the input's two sides by about the
same factor. (B, 768, 7, 7) of a 224 x 224 input can only be channels-first (a 768 x 7 "grid" has strides 0.3 and
32); (B, 7, 7, 288) only channels-last. Only when both readings fit (C equal to a side) does the module's own layout
break the tie (`channels_last_output`: timm's `output_fmt`, Swin's channels-last modules, a trailing LayerNorm).

A 3-D output (B, N, C) is a grid of tokens only where the model says how its patches are laid out
(`token_layout_of`), or where N equals a grid the same forward made (the last 4-D grid before it, halved per stage
by patch merging, as LeViT's stages flatten its convolutional stem).

Whatever the rank, the first axis must be the images: MobileViT's and TNT's blocks fold patches into the batch
axis ((4B, 16, C), (196B, 16, C)), which is no grid of any image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple

from torch import nn

from reportgen.engine.tensors import TokenLayout, channels_last_output, class_tokens, token_layout_of

@dataclass(frozen=True)
class GridLayout:
    """Where a layer's output has its grid: `nchw`, `nhwc` or `tokens` (with the token layout)."""

    kind: str
    size: Tuple[int, int]  # (h, w) of the grid
    tokens: Optional[TokenLayout] = None


def plausible_grid(rows: int, columns: int, height: int, width: int) -> bool:
    """Whether a rows x columns grid can be a height x width input seen at one stride: at least 2 x 2, no larger
    than the input, the same stride along both axes (within a fifth, for padding and rounding), and, for a large
    grid, near a whole stride (a 196 x 196 grid of token pairs is no 224 x 224 image seen at any stride)."""
    if min(rows, columns) < 2 or rows > height or columns > width:
        return False
    along_h, along_w = height / rows, width / columns
    if abs(along_h - along_w) > 0.2 * max(along_h, along_w):
        return False
    stride = max(1, round(along_h))
    return abs(rows - height / stride) <= max(1.5, 0.1 * height / stride)


def spatial_layout(shape: Sequence[int], module: nn.Module, height: int, width: int) -> Optional[str]:
    """`nchw` or `nhwc` for a 4-D output of `module` on a height x width input (see the module docstring); None
    when neither reading is a plausible grid of the image."""
    if len(shape) != 4:
        return None
    first = plausible_grid(shape[2], shape[3], height, width)
    last = plausible_grid(shape[1], shape[2], height, width)
    if first and last:
        return "nhwc" if channels_last_output(module) else "nchw"
    return "nchw" if first else "nhwc" if last else None


def token_grid(model: nn.Module, tokens: int, height: int, width: int,
               seen: Iterable[Tuple[int, int]] = ()) -> Optional[TokenLayout]:
    """The layout of a (B, tokens, C) output: the model's own (`token_layout_of`), else a grid of this forward
    (`seen`, latest first) or one made from it by patch merging (sides halved, rounding up), after the class tokens
    the model declares, if any; None when the tokens fit neither."""
    layout = token_layout_of(model, tokens, height, width)
    if layout is not None:
        return layout
    prefixes = sorted({0, class_tokens(model)})  # CvT's last stage adds its declared class token
    for rows, columns in seen:
        for merges in range(6):
            grid = (-(-rows // 2 ** merges), -(-columns // 2 ** merges))
            for prefix in prefixes:
                if grid[0] * grid[1] == tokens - prefix and plausible_grid(*grid, height, width):
                    return TokenLayout(prefix, grid, prefix > 0)
    return None


def output_grid(shape: Sequence[int], module: nn.Module, model: nn.Module, batch: int, height: int, width: int,
                seen: Iterable[Tuple[int, int]] = ()) -> Optional[GridLayout]:
    """How an output of `shape` from `module` lies on a batch of `batch` height x width images; None when it is no
    grid of the images (a vector, a 1 x 1 map, a first axis that is not the batch, tokens without a known grid)."""
    if not shape or shape[0] != batch:
        return None
    if len(shape) == 4:
        kind = spatial_layout(shape, module, height, width)
        if kind is None:
            return None
        return GridLayout(kind, (shape[2], shape[3]) if kind == "nchw" else (shape[1], shape[2]))
    if len(shape) == 3:
        layout = token_grid(model, shape[1], height, width, seen)
        if layout is None or not plausible_grid(*layout.grid, height, width):  # CaiT's class token alone is no grid
            return None
        return GridLayout("tokens", layout.grid, layout)
    return None
