"""Layer outputs in the layouts analyses reduce over: a (B, C, h, w) grid where there is one (CNN maps, ViT patch
tokens, Swin's channels-last maps), else (B, C, positions). Shared by Grad-CAM, attention and the activation
statistics so a "channel", a "position" and a "patch grid" mean the same everywhere.

Token outputs (B, N, C) of a vision transformer hold `prefix` tokens (class, distillation, register tokens) before
the patch tokens. Where the model says how its patches are laid out (`token_layout_of`: the patch embedding's grid,
timm's `num_prefix_tokens`), that layout is used; only for a model that does not say is the grid guessed (a square
grid, with or without one class token).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

# modules of these libraries work channels-last: (B, h, w, C) blocks, stages and patch merging
_CHANNELS_LAST_MODULES = ("torchvision.models.swin_transformer", "timm.models.swin_transformer",
                          "timm.models.swin_transformer_v2")


@dataclass(frozen=True)
class TokenLayout:
    """Where the patches are in a (B, N, C) token sequence: N = prefix + rows * columns."""

    prefix: int  # class, distillation and register tokens before the patch tokens
    grid: Tuple[int, int]  # (rows, columns) of the patch tokens, row-major
    class_token: bool  # token 0 is the class token the head reads (not a register token or average pooling)

    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1]


def patch_grid_of(model: nn.Module, height: int, width: int) -> Optional[Tuple[int, int]]:
    """(rows, columns) of the patch tokens the model's patch embedding makes from a height x width input: timm's
    PatchEmbed (`dynamic_img_pad` rounds up), else the first convolution whose stride equals its kernel (> 1), the
    patch projection of transformers' and torchvision's ViTs. None when the model has neither."""
    for module in model.modules():
        declares_grid = hasattr(module, "grid_size") or hasattr(module, "proj")  # timm PatchEmbed, TNT PixelEmbed
        if type(module).__name__.endswith(("PatchEmbed", "PixelEmbed")) and hasattr(module, "patch_size") \
                and declares_grid:
            ph, pw = _pair(module.patch_size)
            if getattr(module, "dynamic_img_pad", False):
                return -(-height // ph), -(-width // pw)
            return height // ph, width // pw
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and tuple(module.stride) == tuple(module.kernel_size) \
                and max(module.kernel_size) > 1:
            return height // module.stride[0], width // module.stride[1]
    return None


def token_layout_of(model: nn.Module, tokens: int, height: int, width: int) -> Optional[TokenLayout]:
    """The layout of a sequence of `tokens` the model makes from a height x width input: its patch grid, and the
    tokens before it (timm declares them as `num_prefix_tokens`; otherwise all tokens beyond the grid, as
    transformers' ViT (1 class token) and DeiT (class and distillation tokens) put them first). Fewer tokens than
    patches: a later stage of a hierarchical model (transformers Swin), whose patch merging halved the grid's sides
    once per stage. None when the model declares no patch grid or the sequence fits neither."""
    grid = patch_grid_of(model, height, width)
    if grid is None:
        return None
    prefix = tokens - grid[0] * grid[1]
    if prefix < 0:  # a hierarchical model's later stage: patch merging halved the grid's sides (rounding up)
        for merges in range(1, 6):
            merged = (-(-grid[0] // 2 ** merges), -(-grid[1] // 2 ** merges))
            for prefix in sorted({0, class_tokens(model)}):  # CoaT keeps a class token per stage
                if merged[0] * merged[1] == tokens - prefix:
                    return TokenLayout(prefix, merged, prefix > 0)
        return None
    timm_vit = next((m for m in model.modules() if isinstance(getattr(m, "num_prefix_tokens", None), int)), None)
    if timm_vit is not None and prefix != timm_vit.num_prefix_tokens:
        return None
    class_token = prefix > 0
    if timm_vit is not None:  # timm: a class token only with class_token=True, read by the head unless pooled
        pool = getattr(timm_vit, "global_pool", "token")
        class_token = bool(getattr(timm_vit, "has_class_token", prefix > 0)) and pool in ("token", None)
    return TokenLayout(prefix, grid, class_token)


def class_tokens(model: nn.Module) -> int:
    """How many class tokens the model declares as parameters (`cls_token`, CoaT's per-stage `cls_token4`), read
    by their (1, tokens, C) shape; 0 when it declares none."""
    counts = [int(p.shape[1]) for n, p in model.named_parameters()
              if re.search(r"(^|\.)(cls|class)_tokens?\d*$", n) and p.dim() == 3]
    return max(counts, default=0)


def guess_token_layout(tokens: int) -> Optional[TokenLayout]:
    """For a model that declares no patch grid: a square grid, after one class token or without one."""
    for prefix in (1, 0):
        side = math.isqrt(max(tokens - prefix, 0))
        if side > 0 and side * side == tokens - prefix:
            return TokenLayout(prefix, (side, side), prefix == 1)
    return None


def to_grid(tensor: torch.Tensor, layout: Optional[TokenLayout] = None) -> torch.Tensor:
    """(B, C, h, w) as is; token outputs (B, N, C) -> (B, C, rows, columns) without the prefix tokens, laid out by
    `layout` (the model's own, see `token_layout_of`) or, without one, by `guess_token_layout`."""
    if tensor.dim() == 4:
        return tensor
    if tensor.dim() == 3:
        batch, tokens, channels = tensor.shape
        layout = layout or guess_token_layout(tokens)
        if layout is not None and layout.prefix + layout.patches == tokens:
            patches = tensor[:, layout.prefix:]  # (B, rows * columns, C)
            return patches.transpose(1, 2).reshape(batch, channels, *layout.grid)  # (B, C, rows, columns)
    raise ValueError(f"cannot lay out an output of shape {tuple(tensor.shape)} as a spatial grid "
                     f"(expected (B, C, h, w) or (B, prefix + patches, C) tokens"
                     + (f" with {layout.prefix} prefix tokens and a {layout.grid[0]}x{layout.grid[1]} patch grid)"
                        if layout else ")"))


def channels_last_output(module: nn.Module) -> bool:
    """Whether a 4-D output of `module` is (B, h, w, C): torchvision's and timm's Swin blocks, stages and patch
    merging work channels-last, so does a timm module that declares `output_fmt` NHWC (Swin's patch embedding),
    and so does a plain nn.LayerNorm (it normalises the last dimension) ending a container."""
    output_fmt = getattr(module, "output_fmt", None)
    if output_fmt is not None:
        return str(getattr(output_fmt, "value", output_fmt)) == "NHWC"
    if any(type(m).__module__ in _CHANNELS_LAST_MODULES for m in module.modules()):
        return True
    leaves = [m for m in module.modules() if not list(m.children())]
    return bool(leaves) and type(leaves[-1]) is nn.LayerNorm


def channel_view(tensor: torch.Tensor, channels_last: bool = False, layout: Optional[TokenLayout] = None
                 ) -> Tuple[torch.Tensor, Optional[Tuple[int, int]]]:
    """Any layer output -> ((B, C, P) values, (h, w) grid or None), P positions per channel.

    4-D maps (channels-last ones permuted first) and ViT tokens with a patch grid keep their grid (the prefix tokens
    are left out, as in every map; `layout` as for `to_grid`); other token outputs (B, N, C) have N positions and no
    grid; (B, C) vectors have one position; anything else flattens the dimensions after the channel one."""
    if tensor.dim() == 4 and channels_last:
        tensor = tensor.permute(0, 3, 1, 2)  # (B, C, h, w)
    if tensor.dim() == 3:
        try:
            tensor = to_grid(tensor, layout)  # (B, C, rows, columns)
        except ValueError:
            return tensor.transpose(1, 2).contiguous(), None  # (B, C, N)
    if tensor.dim() == 4:
        return tensor.flatten(2), (int(tensor.shape[2]), int(tensor.shape[3]))  # (B, C, h*w)
    if tensor.dim() == 2:
        return tensor[:, :, None], None  # (B, C, 1)
    if tensor.dim() < 2:
        raise ValueError(f"a layer output of shape {tuple(tensor.shape)} has no channel dimension")
    return tensor.flatten(2), None  # (B, C, P)


def _pair(value) -> Tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))
