"""Layer outputs in the layouts analyses reduce over: a (B, C, h, w) grid where there is one (CNN maps, ViT patch
tokens, Swin's channels-last maps), else (B, C, positions). Shared by Grad-CAM and the activation statistics so a
"channel" and a "position" mean the same everywhere.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn


def to_grid(tensor: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) as is; token outputs (B, N, C) -> (B, C, g, g), dropping a leading CLS token when N = 1 + g*g."""
    if tensor.dim() == 4:
        return tensor
    if tensor.dim() == 3:
        batch, tokens, channels = tensor.shape
        for skip in (1, 0):
            side = math.isqrt(tokens - skip)
            if side * side == tokens - skip and side > 0:
                return tensor[:, skip:].transpose(1, 2).reshape(batch, channels, side, side)  # (B, C, g, g)
    raise ValueError(f"cannot lay out an output of shape {tuple(tensor.shape)} as a spatial grid "
                     f"(expected (B, C, h, w) or (B, [1 +] g*g, C) tokens)")


def channels_last_output(module: nn.Module) -> bool:
    """Whether a 4-D output of `module` is (B, h, w, C): torchvision Swin's blocks, stages and patch merging work
    channels-last, and so does a plain nn.LayerNorm (it normalises the last dimension) ending a container."""
    if any(type(m).__module__ == "torchvision.models.swin_transformer" for m in module.modules()):
        return True
    leaves = [m for m in module.modules() if not list(m.children())]
    return bool(leaves) and type(leaves[-1]) is nn.LayerNorm


def channel_view(tensor: torch.Tensor, channels_last: bool = False
                 ) -> Tuple[torch.Tensor, Optional[Tuple[int, int]]]:
    """Any layer output -> ((B, C, P) values, (h, w) grid or None), P positions per channel.

    4-D maps (channels-last ones permuted first) and ViT tokens with a square patch grid keep their grid (the class
    token is left out, as in every map); other token outputs (B, N, C) have N positions and no grid; (B, C) vectors
    have one position; anything else flattens the dimensions after the channel one."""
    if tensor.dim() == 4 and channels_last:
        tensor = tensor.permute(0, 3, 1, 2)  # (B, C, h, w)
    if tensor.dim() == 3:
        try:
            tensor = to_grid(tensor)  # (B, C, g, g)
        except ValueError:
            return tensor.transpose(1, 2).contiguous(), None  # (B, C, N)
    if tensor.dim() == 4:
        return tensor.flatten(2), (int(tensor.shape[2]), int(tensor.shape[3]))  # (B, C, h*w)
    if tensor.dim() == 2:
        return tensor[:, :, None], None  # (B, C, 1)
    if tensor.dim() < 2:
        raise ValueError(f"a layer output of shape {tuple(tensor.shape)} has no channel dimension")
    return tensor.flatten(2), None  # (B, C, P)
