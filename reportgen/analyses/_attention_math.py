"""Attention arithmetic on whole batches, on the device: attention rollout, per-query entropy, mean attention
distance between query and key grids, torchvision Swin's window attention probabilities recomputed from the
attention module's input (Swin never materialises them outside `shifted_window_attention`), and the window layouts
that put per-window values (torchvision, timm and transformers Swin) back on the token grid.

Everything here is plain tensor code with no hooks and no report logic, so tests can hold it against independent
implementations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def row_entropy(weights: torch.Tensor) -> torch.Tensor:
    """(..., S) rows of probabilities -> (...) entropy in nats (0 log 0 = 0). ln S is a uniform row's entropy."""
    return -torch.special.xlogy(weights, weights).sum(dim=-1)


def rollout(layers: Sequence[torch.Tensor], discard_ratio: float = 0.0) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) for a whole batch: per layer, average the heads, add the identity
    (the residual path), renormalise rows, and multiply the layers in call order, R = A_L ... A_2 A_1.

    layers: each (B, heads, N, N), or already head-averaged (B, N, N), in the order the layers ran.
    `discard_ratio` > 0 first zeroes that fraction of each image's smallest head-averaged weights (never the class
    token's own weight), as vit-explain does. Returns (B, N, N): row i says how much each input token flows into
    output token i.
    """
    result: Optional[torch.Tensor] = None
    for weights in layers:
        fused = weights.float().mean(dim=1) if weights.dim() == 4 else weights.float()  # (B, N, N)
        batch, tokens, _ = fused.shape
        if discard_ratio > 0:
            flat = fused.reshape(batch, -1).clone()  # (B, N*N)
            count = int(flat.shape[1] * discard_ratio)
            if count:
                lowest = flat.topk(count, dim=1, largest=False).indices  # (B, count)
                drop = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, lowest, True)
                drop[:, 0] = False  # keep the class token's attention to itself
                flat = flat.masked_fill(drop, 0.0)
            fused = flat.view(batch, tokens, tokens)
        eye = torch.eye(tokens, device=fused.device, dtype=fused.dtype)  # (N, N)
        step = fused + eye  # (B, N, N)
        step = step / step.sum(dim=-1, keepdim=True)
        result = step if result is None else torch.bmm(step, result)  # (B, N, N)
    if result is None:
        raise ValueError("rollout needs at least one attention layer")
    return result


def patch_grid(patches: int, height: int, width: int) -> Optional[Tuple[int, int]]:
    """(rows, columns) of a patch grid with `patches` cells and the image's aspect ratio (within 15%), or None."""
    best: Optional[Tuple[int, int]] = None
    target = math.log(height / width)
    for rows in range(1, patches + 1):
        if patches % rows:
            continue
        error = abs(math.log(rows / (patches // rows)) - target)
        if error < 0.15 and (best is None or error < abs(math.log(best[0] / best[1]) - target)):
            best = (rows, patches // rows)
    return best


def grid_distances(queries: Tuple[int, int], keys: Tuple[int, int], extent: Tuple[float, float],
                   device: Optional[torch.device] = None) -> torch.Tensor:
    """(Q, P) Euclidean distances between the cell centres of a query grid and a key grid (rows, columns; cells
    row-major) laid over the same extent (height, width, e.g. in input pixels): the same grid for self-attention,
    a coarser key grid for spatial-reduction attention."""
    def centres(rows: int, columns: int) -> torch.Tensor:  # (rows * columns, 2)
        ys, xs = torch.meshgrid(torch.arange(rows, device=device), torch.arange(columns, device=device),
                                indexing="ij")
        return torch.stack([(ys.flatten() + 0.5) * (extent[0] / rows),
                            (xs.flatten() + 0.5) * (extent[1] / columns)], dim=1).double()

    return torch.cdist(centres(*queries), centres(*keys)).float()  # (Q, P)


def mean_distance(weights: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """(..., Q, P) attention over P positions and (Q, P) distances -> (..., Q) attention-weighted mean distance,
    the weights renormalised over those P positions (e.g. over patches without the class token)."""
    total = weights.sum(dim=-1).clamp_min(1e-12)
    return torch.einsum("...qk,qk->...q", weights, distances) / total  # row-wise dot, no (..., Q, P) temporary


@dataclass
class WindowLayout:
    """How a Swin block cut its (B, H, W, C) input into windows: torchvision and transformers pad, then shift
    cyclically over the padded grid; timm shifts over the input grid, then pads (`shift_first`)."""

    height: int  # input grid before padding
    width: int
    padded_height: int
    padded_width: int
    window: Tuple[int, int]  # (wh, ww) tokens per window side
    shift: Tuple[int, int]  # cyclic shift actually applied (0 where the window covers the whole side)
    shift_first: bool = False  # timm: roll the H x W grid, then pad; else pad, then roll the padded grid

    @property
    def windows(self) -> Tuple[int, int]:
        return self.padded_height // self.window[0], self.padded_width // self.window[1]


def is_swin_attention(module: nn.Module) -> bool:
    """torchvision's Swin window attention (v1 or v2)."""
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    return isinstance(module, ShiftedWindowAttention)


def swin_window_attention(x: torch.Tensor, module: nn.Module) -> Tuple[torch.Tensor, WindowLayout]:
    """The attention probabilities a torchvision `ShiftedWindowAttention(V2)` computes for input x (B, H, W, C),
    step for step as `torchvision.models.swin_transformer.shifted_window_attention` does (pad, cyclic shift,
    window partition, scaled q k^T or v2's cosine attention, relative position bias, shift mask, softmax; no
    dropout: eval mode). Returns (B, windows, heads, T, T) with T = wh * ww, and the layout."""
    batch, height, width, channels = x.shape
    wh, ww = module.window_size
    pad_b, pad_r = (wh - height % wh) % wh, (ww - width % ww) % ww
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))  # (B, pH, pW, C)
    padded_h, padded_w = x.shape[1], x.shape[2]
    shift = [int(s) for s in module.shift_size]
    if wh >= padded_h:
        shift[0] = 0
    if ww >= padded_w:
        shift[1] = 0
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    layout = WindowLayout(height, width, padded_h, padded_w, (wh, ww), (shift[0], shift[1]))
    n_h, n_w = layout.windows
    windows = x.view(batch, n_h, wh, n_w, ww, channels).permute(0, 1, 3, 2, 4, 5)
    windows = windows.reshape(batch, n_h * n_w, wh * ww, channels)  # (B, nW, T, C)
    heads = module.num_heads
    logit_scale = getattr(module, "logit_scale", None)
    bias = module.qkv.bias
    if logit_scale is not None and bias is not None:  # v2 zeroes the key bias
        bias = bias.clone()
        third = bias.numel() // 3
        bias[third: 2 * third].zero_()
    # queries and keys only (the first two thirds of the qkv projection): values do not enter the probabilities
    qk = F.linear(windows, module.qkv.weight[: 2 * channels], None if bias is None else bias[: 2 * channels])
    qk = qk.reshape(batch, n_h * n_w, wh * ww, 2, heads, channels // heads).permute(3, 0, 1, 4, 2, 5)
    q, k = qk[0], qk[1]  # (B, nW, heads, T, d)
    if logit_scale is not None:
        logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)  # (B, nW, heads, T, T)
        logits = logits * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        logits = (q * (channels // heads) ** -0.5) @ k.transpose(-2, -1)  # (B, nW, heads, T, T)
    logits = logits + module.get_relative_position_bias()  # (1, heads, T, T) broadcast
    if sum(shift) > 0:
        logits = logits + _shift_mask(layout, x.device, x.dtype)[None, :, None]  # (1, nW, 1, T, T)
    return F.softmax(logits, dim=-1), layout


def _shift_mask(layout: WindowLayout, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(nW, T, T) additive mask (0 or -100) that stops tokens brought together by the cyclic shift from
    attending to each other; the same regions and constant as torchvision."""
    (wh, ww), (sh, sw) = layout.window, layout.shift
    regions = torch.zeros((layout.padded_height, layout.padded_width), device=device, dtype=dtype)
    count = 0
    for h in ((0, -wh), (-wh, -sh), (-sh, None)):
        for w in ((0, -ww), (-ww, -sw), (-sw, None)):
            regions[h[0]: h[1], w[0]: w[1]] = count
            count += 1
    n_h, n_w = layout.windows
    regions = regions.view(n_h, wh, n_w, ww).permute(0, 2, 1, 3).reshape(n_h * n_w, wh * ww)  # (nW, T)
    mask = regions.unsqueeze(1) - regions.unsqueeze(2)  # (nW, T, T)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def window_layout(height: int, width: int, window: Tuple[int, int], shift: Tuple[int, int],
                  shift_first: bool) -> WindowLayout:
    """The layout of an H x W grid cut into windows: padded up to whole windows, the shift as the block applies it
    (timm and transformers blocks already clamp window and shift to small inputs)."""
    wh, ww = window
    return WindowLayout(height, width, -(-height // wh) * wh, -(-width // ww) * ww, (wh, ww),
                        (int(shift[0]), int(shift[1])), shift_first)


def centre_window(layout: WindowLayout) -> int:
    """Index of the window that holds the input grid's centre token (after the cyclic shift)."""
    (wh, ww), (sh, sw) = layout.window, layout.shift
    rolled_h, rolled_w = ((layout.height, layout.width) if layout.shift_first
                          else (layout.padded_height, layout.padded_width))
    row = ((layout.height // 2 - sh) % rolled_h) // wh
    column = ((layout.width // 2 - sw) % rolled_w) // ww
    return row * layout.windows[1] + column


def windows_to_grid(values: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """Per-token values (B, nW, K, T) back on the input grid (B, K, H, W): windows reassembled, the cyclic shift
    undone, the padding cropped."""
    batch, _, channels, _ = values.shape
    (wh, ww), (n_h, n_w) = layout.window, layout.windows
    grid = values.reshape(batch, n_h, n_w, channels, wh, ww).permute(0, 3, 1, 4, 2, 5)  # (B, K, nH, wh, nW, ww)
    grid = grid.reshape(batch, channels, layout.padded_height, layout.padded_width)  # (B, K, pH, pW)
    if layout.shift_first:  # timm: crop the padding, then undo the shift over the input grid
        grid = grid[:, :, : layout.height, : layout.width]  # (B, K, H, W)
        return torch.roll(grid, shifts=layout.shift, dims=(2, 3)) if sum(layout.shift) > 0 else grid
    if sum(layout.shift) > 0:
        grid = torch.roll(grid, shifts=layout.shift, dims=(2, 3))
    return grid[:, :, : layout.height, : layout.width]
