"""Faithfulness scores of saliency maps, as pure functions of a forward: RISE's deletion and insertion curves
(Petsiuk et al. 2018, the authors' `evaluation.py`) and ROAD's MoRF and LeRF curves (Rong, Leemann et al. 2022).

Both perturb the input many times per image (`forwards_needed`), so every perturbed input is built in chunks of
`batch_size` across images and steps and forwarded at once, never one forward per image per step.

RISE, as the authors: pixels (all channels together) ranked by the map, `step` per step, `n = ceil(HW / step)` steps
and n + 1 points; deletion sets them to 0 in the normalised input (the mean colour), insertion restores them into
`rise_blur` of the input. Ties in the map keep raster order (a stable sort); the authors' flipped `np.argsort` puts
them in an unspecified order. AUC is the trapezoid on [0, 1].

ROAD follows pytorch-grad-cam's `metrics/road.py` (itself the authors' `NoisyLinearImputer`): the same system (the
weighted mean of the 8 neighbours, out-of-image neighbours dropped) and N(0, noise_std²) noise on the imputed pixels
only, not clipped. It differs where the ROAD paper and its code (`road/imputed_dataset.py`) say otherwise:

- levels are the percent of pixels REMOVED, floor(HW * level / 100) of them, as the authors' `int(HW * th_p)`, in
  both orders. pytorch-grad-cam's `percentile` p removes the pixels at or above the p-th percentile of the map, so
  (100 - p) % of them (one pixel more at some sizes: its interpolated percentile), for MoRF and LeRF alike; its
  averages over 10..90 % are symmetric, so the two agree there (up to that pixel).
- the images are imputed in [0, 1] and normalised afterwards, so the noise is 0.01 of the pixel range as in the
  paper; pytorch-grad-cam imputes the tensor it forwards, i.e. adds the noise after normalisation. Without noise the
  two are the same: the imputation commutes with a per-channel affine map (its weights sum to one).
- the map is min-max scaled per image, then ties are broken by uniform [0, 1e-4) jitter drawn from `seed` (the
  authors scale with (max - min + 1e-5) and add 1e-4 Gaussian jitter from the global NumPy generator;
  pytorch-grad-cam has none: a constant region at its percentile is removed as a whole). Without the 1e-5 a map of tiny
  values (raw gradients) is ranked by its values, not by the jitter.
- the score is the softmax probability of the target after removal, not its difference to the clean score
  (pytorch-grad-cam's `return_diff`); `road_combined` is the same number, the clean score cancels.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import scipy.ndimage
import scipy.sparse
import scipy.sparse.linalg
import torch
import torch.nn.functional as F

ROAD_LEVELS = (10, 20, 30, 40, 50, 70, 90)  # percent of pixels removed

Forward = Callable[[torch.Tensor], torch.Tensor]  # (N, C, H, W) normalised inputs -> (N, K) logits, no grad

# (row offset, column offset, weight) of the 8 neighbours in ROAD's linear imputation: 1/6 edges, 1/12 diagonals
_NEIGHBOURS = ((0, 1, 1 / 6), (0, -1, 1 / 6), (1, 0, 1 / 6), (-1, 0, 1 / 6),
               (1, 1, 1 / 12), (1, -1, 1 / 12), (-1, 1, 1 / 12), (-1, -1, 1 / 12))
_JITTER = 1e-4


def rise_kernel(size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """(size, size) float32 kernel of RISE's `gkern`: scipy.ndimage.gaussian_filter (reflecting borders) of a unit
    impulse at the centre. The reflected tails make it much flatter than a sampled Gaussian; it is not renormalised."""
    impulse = np.zeros((size, size))
    impulse[size // 2, size // 2] = 1.0
    return torch.from_numpy(scipy.ndimage.gaussian_filter(impulse, sigma).astype(np.float32))


def rise_blur(inputs: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) normalised inputs -> each channel convolved with `rise_kernel()`, zero padding size // 2 (RISE's
    insertion substrate: its conv2d with the kernel on the diagonal of a (C, C, 11, 11) weight)."""
    kernel = rise_kernel().to(device=inputs.device, dtype=inputs.dtype)  # (k, k)
    channels, size = inputs.shape[1], kernel.shape[0]
    weight = kernel.expand(channels, 1, size, size)  # (C, 1, k, k), one group per channel
    return F.conv2d(inputs, weight, padding=size // 2, groups=channels)


def auc(curves: np.ndarray) -> np.ndarray:
    """(..., n + 1) curves sampled evenly on [0, 1] -> (...) trapezoid areas, RISE's
    (sum - first / 2 - last / 2) / n."""
    curves = np.asarray(curves, dtype=np.float64)
    if curves.shape[-1] < 2:
        raise ValueError(f"a curve needs at least 2 points, got shape {curves.shape}")
    return (curves.sum(axis=-1) - curves[..., 0] / 2 - curves[..., -1] / 2) / (curves.shape[-1] - 1)


def steps_for(height: int, width: int, step: Optional[int]) -> int:
    """Pixels per deletion / insertion step: `step` itself, or with None ceil(H * W / 32), so 32 steps (at most) at
    any size (224 x 224: 1568 pixels, the authors' large-scale 224 * 8 would be 28 steps)."""
    if step is None:
        return max(1, math.ceil(height * width / 32))
    if int(step) < 1:
        raise ValueError(f"step must be at least 1 pixel, got {step}")
    return int(step)


def deletion_insertion(forward: Forward, inputs: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor,
                       step: int, batch_size: int = 64) -> Dict[str, np.ndarray]:
    """{"deletion": (B, n+1), "insertion": (B, n+1)} softmax probabilities of `targets` along RISE's curves;
    n = ceil(H*W/step).

    Deletion: pixels (all channels together) set to 0 in the normalised input, most salient first (ranked per pixel
    by `maps` (B, H, W)); insertion: from rise_blur(inputs), the original pixels restored most salient first. Both
    ends included. Every (image, step) input is built on the inputs' device and forwarded in chunks of `batch_size`
    across images and steps (never one forward per image per step)."""
    count, _, height, width = _check(inputs, maps, targets)
    step = steps_for(height, width, step)
    pixels = height * width
    n = math.ceil(pixels / step)
    rank = _descending_rank(maps.to(inputs.device).reshape(count, pixels)).reshape(count, height, width)
    shown = torch.clamp(torch.arange(n + 1, device=inputs.device) * step, max=pixels)  # (n+1,) pixels changed
    starts = torch.stack([inputs, rise_blur(inputs)])  # (2, B, C, H, W): deletion, insertion
    finishes = torch.stack([torch.zeros_like(inputs), inputs])  # (2, B, C, H, W)
    targets = targets.to(inputs.device).long()

    def build(items: torch.Tensor) -> torch.Tensor:  # items (m,) over (curve, image, step) -> (m, C, H, W)
        curve, image, i = items // (count * (n + 1)), items // (n + 1) % count, items % (n + 1)
        changed = rank[image] < shown[i][:, None, None]  # (m, H, W) bool
        return torch.where(changed[:, None], finishes[curve, image], starts[curve, image])

    total = 2 * count * (n + 1)
    image_of = torch.arange(total, device=inputs.device) // (n + 1) % count  # (2 * B * (n+1),)
    probs = _probabilities(forward, build, targets[image_of], total, batch_size, inputs.device)
    probs = probs.reshape(2, count, n + 1)
    return {"deletion": probs[0], "insertion": probs[1]}


def noisy_linear_impute(images01: torch.Tensor, removed: torch.Tensor, noise_std: float = 0.01,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """ROAD's noisy linear imputation: (B, C, H, W) images in [0, 1] before normalisation, (B, H, W) bool removed
    pixels -> images whose removed pixels are the weighted mean of their 8 neighbours (1/6 edge neighbours, 1/12
    diagonals, out-of-image neighbours dropped and the weights renormalised), solved as one sparse linear system per
    image and channel (scipy.sparse.linalg.spsolve), plus N(0, noise_std^2) noise on the imputed pixels.

    The channels share the system's matrix, so each image is one spsolve with C right-hand sides, in float64. The
    noise is drawn per image as a (C, removed) float32 tensor from `generator` (a CPU one; None: torch's global
    generator), as pytorch-grad-cam's randn_like. Returned on the images' device and dtype."""
    if images01.dim() != 4 or removed.shape != (images01.shape[0],) + tuple(images01.shape[-2:]):
        raise ValueError(f"images must be (B, C, H, W) and removed (B, H, W), got {tuple(images01.shape)} and "
                         f"{tuple(removed.shape)}")
    count, channels, height, width = images01.shape
    result = images01.detach().cpu().clone().reshape(count, channels, height * width)  # (B, C, HW)
    removed = removed.detach().cpu().bool().reshape(count, height * width)  # (B, HW)
    for b in range(count):
        unknown = torch.nonzero(removed[b]).flatten().numpy()  # (m,) flat indices
        if len(unknown) == 0:
            continue
        if len(unknown) == height * width:
            raise ValueError("cannot impute an image whose every pixel is removed")
        values = result[b].double().numpy()  # (C, HW)
        matrix, rhs = _imputation_system(removed[b].numpy(), unknown, values, height, width)
        solved = scipy.sparse.linalg.spsolve(matrix, rhs).reshape(len(unknown), channels).T  # (C, m)
        filled = torch.from_numpy(np.ascontiguousarray(solved)).to(result.dtype)
        if noise_std:
            noise = torch.randn(filled.shape, generator=generator, dtype=torch.float32)  # (C, m)
            filled = filled + noise_std * noise.to(result.dtype)
        result[b][:, torch.from_numpy(unknown)] = filled
    return result.reshape(images01.shape).to(images01.device)


def road(forward: Forward, images01: torch.Tensor, normalize: Callable[[torch.Tensor], torch.Tensor],
         maps: torch.Tensor, targets: torch.Tensor, levels: Sequence[int] = ROAD_LEVELS, seed: int = 0,
         batch_size: int = 64, noise_std: float = 0.01) -> Dict[str, np.ndarray]:
    """{"morf": (B, L), "lerf": (B, L)}: softmax probability of `targets` after removing levels[i] % of the pixels,
    most relevant first (MoRF) or least relevant first (LeRF), removed pixels imputed by noisy_linear_impute;
    ranking ties broken by 1e-4 uniform jitter from `seed`; inputs normalised by `normalize` before the forward;
    forwards batched across images and levels.

    One CPU generator seeded with `seed` draws the jitter (B, H, W) first, then the imputation noise item by item
    in the order (image, MoRF then LeRF, level), so the result does not depend on `batch_size`. `noise_std` is the
    imputation noise on [0, 1] pixels (0: the plain linear imputation, to compare with other implementations)."""
    count, _, height, width = _check(images01, maps, targets)
    pixels = height * width
    removed_counts = []
    for level in levels:
        if int(level) != level or not 0 <= level < 100:
            raise ValueError(f"ROAD levels are whole percentages in [0, 100), got {level}")
        removed_counts.append(pixels * int(level) // 100)
    generator = torch.Generator().manual_seed(int(seed))
    scores = maps.detach().cpu().double().reshape(count, pixels)  # (B, HW)
    low, high = scores.min(dim=1, keepdim=True).values, scores.max(dim=1, keepdim=True).values
    span = torch.where(high > low, high - low, torch.ones_like(high))  # (B, 1); a constant map ranks by jitter
    jitter = _JITTER * torch.rand((count, pixels), generator=generator, dtype=torch.float64)
    rank = _descending_rank((scores - low) / span + jitter)  # (B, HW) 0 = most relevant
    removed_counts = torch.tensor(removed_counts)  # (L,)
    levels_n = len(removed_counts)
    images = images01.detach().cpu()
    device = images01.device

    def build(items: torch.Tensor) -> torch.Tensor:  # items (m,) over (image, order, level) -> (m, C, H, W)
        items = items.cpu()
        image, lerf, level = items // (2 * levels_n), items // levels_n % 2, items % levels_n
        k = removed_counts[level][:, None]  # (m, 1)
        gone = torch.where(lerf[:, None].bool(), rank[image] >= pixels - k, rank[image] < k)  # (m, HW) bool
        imputed = noisy_linear_impute(images[image], gone.reshape(-1, height, width), noise_std, generator)
        return normalize(imputed.to(device))

    total = count * 2 * levels_n
    image_of = torch.arange(total) // (2 * levels_n)
    probs = _probabilities(forward, build, targets.to(device).long()[image_of.to(device)], total, batch_size, device)
    probs = probs.reshape(count, 2, levels_n)
    return {"morf": probs[:, 0], "lerf": probs[:, 1]}


def road_combined(morf: np.ndarray, lerf: np.ndarray) -> np.ndarray:
    """(..., L) MoRF and LeRF curves (per image, or the mean curves) -> (...) mean over levels of (lerf - morf) / 2,
    pytorch-grad-cam's `ROADCombined` (higher is better)."""
    morf, lerf = np.asarray(morf, dtype=np.float64), np.asarray(lerf, dtype=np.float64)
    if morf.shape != lerf.shape:
        raise ValueError(f"MoRF {morf.shape} and LeRF {lerf.shape} curves must have one shape")
    return ((lerf - morf) / 2).mean(axis=-1)


def forwards_needed(height: int, width: int, step: Optional[int],
                    levels: Sequence[int] = ROAD_LEVELS) -> Dict[str, int]:
    """Extra forwards per image per map: {"deletion": n + 1, "insertion": n + 1, "road": 2 * L}, n = ceil(HW / step)
    (step None: `steps_for`'s default)."""
    n = math.ceil(height * width / steps_for(height, width, step))
    return {"deletion": n + 1, "insertion": n + 1, "road": 2 * len(levels)}


def _check(inputs: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor) -> torch.Size:
    """The (B, C, H, W) shape of `inputs`, after checking `maps` (B, H, W) and `targets` (B,) against it."""
    if inputs.dim() != 4:
        raise ValueError(f"inputs must be (B, C, H, W), got shape {tuple(inputs.shape)}")
    count, _, height, width = inputs.shape
    if tuple(maps.shape) != (count, height, width):
        raise ValueError(f"maps must be (B, H, W) = {(count, height, width)}, got {tuple(maps.shape)}")
    if tuple(targets.shape) != (count,):
        raise ValueError(f"targets must be ({count},), got {tuple(targets.shape)}")
    if not bool(torch.isfinite(maps).all()):
        raise ValueError("maps must be finite to rank pixels")
    return inputs.shape


def _descending_rank(scores: torch.Tensor) -> torch.Tensor:
    """(B, P) scores -> (B, P) int64 position of each pixel in its row sorted by decreasing score (ties: raster
    order)."""
    order = torch.argsort(scores, dim=1, descending=True, stable=True)  # (B, P) pixel at each position
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def _probabilities(forward: Forward, build: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor,
                   total: int, batch_size: int, device: torch.device) -> np.ndarray:
    """(total,) float64 softmax probability of targets[t] for the input build(t), for t in chunks of `batch_size`."""
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    out = np.empty(total, dtype=np.float64)
    with torch.no_grad():
        for items in _chunks(total, int(batch_size), device):
            logits = forward(build(items))  # (m, K)
            probs = torch.softmax(logits.float(), dim=1)
            out[items.cpu().numpy()] = probs.gather(1, targets[items][:, None])[:, 0].double().cpu().numpy()
    return out


def _chunks(total: int, size: int, device: torch.device) -> Iterator[torch.Tensor]:
    for start in range(0, total, size):
        yield torch.arange(start, min(start + size, total), device=device)


def _imputation_system(removed: np.ndarray, unknown: np.ndarray, values: np.ndarray, height: int,
                       width: int) -> Tuple[scipy.sparse.csc_matrix, np.ndarray]:
    """The linear system of one image: (m, m) CSC matrix with, per removed pixel i, sum of its in-image weights on
    the diagonal and -w for each removed neighbour, and (m, C) right-hand side sum of w * value of its kept
    neighbours (removed (HW,) bool, unknown (m,) flat indices of the removed pixels, values (C, HW))."""
    m = len(unknown)
    variable = np.full(height * width, -1, dtype=np.int64)  # (HW,) flat pixel -> unknown's index
    variable[unknown] = np.arange(m)
    rows, cols = unknown // width, unknown % width  # (m,) each
    diagonal = np.zeros(m)
    rhs = np.zeros((m, values.shape[0]))
    entries_i, entries_j, entries_w = [], [], []
    for dy, dx, weight in _NEIGHBOURS:
        y, x = rows + dy, cols + dx
        inside = (y >= 0) & (y < height) & (x >= 0) & (x < width)  # (m,) bool
        diagonal[inside] += weight
        neighbour = np.where(inside, y * width + x, 0)  # (m,) flat index (0 where outside, masked below)
        free = inside & removed[neighbour]
        kept = inside & ~removed[neighbour]
        entries_i.append(np.nonzero(free)[0])
        entries_j.append(variable[neighbour[free]])
        entries_w.append(np.full(int(free.sum()), -weight))
        rhs[kept] += weight * values[:, neighbour[kept]].T
    entries_i.append(np.arange(m))
    entries_j.append(np.arange(m))
    entries_w.append(diagonal)
    matrix = scipy.sparse.coo_matrix((np.concatenate(entries_w), (np.concatenate(entries_i),
                                                                   np.concatenate(entries_j))), shape=(m, m))
    return matrix.tocsc(), rhs
