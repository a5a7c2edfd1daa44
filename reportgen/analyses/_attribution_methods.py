"""Every attribution method the `attribution` analysis compares, batched over images, behind one entry point
(`attribute`), plus the control "explanations" every method is scored against (`control_maps`) and the display
scaling of pixel attributions (`display_maps`).

Why one module: the analysis scores each method for faithfulness and sanity on the same images, so every method must
give the same kind of map, (B, H, W) >= 0 at the input resolution, and say what it cost (forwards and backwards per
image). Pixel methods come from Captum (BSD-3), so they are the reference implementations; the CAMs go through the
project's own capture engine and `gradcam.cam_from`, so `gradcam` here is exactly the gradcam section's map, on the
same layer (a call key) laid out the same way (channels first, channels last or patch tokens).

Methods, per image (B images, C channels at the CAM layer, `options` = MethodOptions):
- saliency:  |d score / d input| (Captum Saliency, abs=True)                          1 F + 1 B
- input_x_gradient: input * gradient (Captum InputXGradient)                          1 F + 1 B
- integrated_gradients: Captum IntegratedGradients, Gauss-Legendre, `n_steps`, baseline `zeros` (0 in the
  normalised tensor: the mean colour) or `blur` (RISE's blur of the input), with the convergence delta
                                                                                      n_steps + 2 F, n_steps B
- smoothgrad / vargrad: Captum NoiseTunnel over Saliency(abs=False), the mean / variance of the signed gradients
  (Smilkov et al. 2017; Adebayo et al. 2018), noise std = `noise_std` * each image's (max - min)
                                                                                      noise_samples F + B
- occlusion: Captum Occlusion, a square window over all channels replaced by the baseline  windows + 1 F
- gradcam, gradcam++, layercam, hirescam: `gradcam.cam_from` on the capture engine's gradient leaf   1 F + 1 B
- eigencam: the activations' projection on their first principal component (pytorch-grad-cam's
  get_2d_projection, numpy's SVD on the CPU, so every device gives the same sign), ReLU       1 F
- scorecam: each channel upsampled (bilinear, align_corners=True as pytorch-grad-cam), min-max normalised,
  multiplied into the input; weights = softmax over channels of the target's logit on those inputs (as
  pytorch-grad-cam's ScoreCAM; the paper's softmax is over classes), ReLU(sum_c w_c A_c)     1 + C F
- ablationcam: weights = (y - y_c) / |y|, y the target's logit, y_c with channel c of the layer zeroed (as
  pytorch-grad-cam's AblationCAM, which divides by y: equal when y > 0, and it ablates with min - 1e7
  instead of 0 when the layer's output has no zero), ReLU(sum_c w_c A_c)                   1 + C F
Score-CAM and Ablation-CAM run `internal_batch_size` (image, channel) pairs per forward.

The model's parameters' `requires_grad` and every module's train/eval mode are put back as they were, on every path;
inside, the model is in eval mode with frozen parameters (only input or layer gradients are taken). The noise
tunnel draws from the global RNG seeded with `options.seed` inside `torch.random.fork_rng`, so the caller's RNG
state is unchanged.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reportgen.analyses._cam_layer import default_cam_layer
from reportgen.analyses.gradcam import cam_from, grid_layout
from reportgen.engine.capture import CaptureEngine, replace_output
from reportgen.engine.tensors import to_grid

PIXEL_METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "vargrad", "occlusion")
CAM_METHODS = ("gradcam", "gradcam++", "layercam", "hirescam", "eigencam", "scorecam", "ablationcam")
METHODS = PIXEL_METHODS + CAM_METHODS
CONTROLS = ("random", "sobel", "gaussian")
BASELINES = ("zeros", "blur")

_GRADIENT_CAMS = ("gradcam", "gradcam++", "layercam", "hirescam")
_GREY = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma weights


@dataclass
class MethodOptions:
    n_steps: int = 32  # integrated gradients
    baseline: str = "zeros"  # integrated gradients / occlusion: zeros (the normalised mean colour) | blur (RISE's)
    internal_batch_size: int = 64  # rows per forward: IG's steps, the noise tunnel's samples, occlusion's windows,
    # Score-CAM's and Ablation-CAM's (image, channel) pairs
    noise_samples: int = 8  # smoothgrad / vargrad
    noise_std: float = 0.15  # smoothgrad / vargrad, a fraction of each image's (max - min) (Smilkov et al.)
    occlusion_window: int = 32  # pixels (square), all channels
    occlusion_stride: int = 16
    seed: int = 0


@dataclass
class Attributions:
    maps: np.ndarray  # (B, H, W) float32 >= 0: pixel methods |attr| summed over channels; CAMs upsampled
    raw: torch.Tensor  # the method's own output on the CPU: pixel methods (B, C, H, W), CAMs (B, h, w)
    forwards: int  # forwards per image
    backwards: int  # backwards per image
    delta: Optional[np.ndarray] = None  # integrated gradients: Captum's convergence delta per image (B,)


def attribute(model: nn.Module, method: str, inputs: torch.Tensor, targets: torch.Tensor, options: MethodOptions,
              cam_layer: Optional[str] = None, cam_layout: Optional[tuple] = None) -> Attributions:
    """`inputs` (B, 3, H, W) normalised, on the model's device; `targets` (B,) class indices; `model` returns (B, K)
    class scores. CAMs read `cam_layer` (a call key; None: the default Grad-CAM layer) laid out as `cam_layout`
    (`gradcam.grid_layout`'s ("nchw" | "nhwc" | "tokens", TokenLayout | None); None: probed). See the module
    docstring for each method."""
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; valid choices: {', '.join(METHODS)}")
    if options.baseline not in BASELINES:
        raise ValueError(f"unknown baseline {options.baseline!r}; valid choices: {', '.join(BASELINES)}")
    inputs = inputs.detach()
    targets = targets.to(inputs.device).long()
    with _frozen_eval(model):
        if method in PIXEL_METHODS:
            return _pixel(model, method, inputs, targets, options)
        return _cam(model, method, inputs, targets, options, cam_layer, cam_layout)


# --- pixel methods (Captum) ----------------------------------------------------------------------------------------


class _Counted:
    """The model as Captum's forward function, counting the rows it forwards, and those forwarded with autograd on
    (Captum differentiates exactly those: its other forwards run under no_grad)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.rows = 0
        self.grad_rows = 0

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        self.rows += len(inputs)
        self.grad_rows += len(inputs) if torch.is_grad_enabled() else 0
        return self.model(inputs)


def _pixel(model: nn.Module, method: str, inputs: torch.Tensor, targets: torch.Tensor,
           options: MethodOptions) -> Attributions:
    from captum.attr import InputXGradient, IntegratedGradients, NoiseTunnel, Occlusion, Saliency

    batch, channels, height, width = inputs.shape
    per_eval = max(1, int(options.internal_batch_size) // batch)  # samples / windows per forward
    counted = _Counted(model)
    delta = None
    with _seeded(options.seed):
        if method in ("saliency", "input_x_gradient"):
            leaf = inputs.clone().requires_grad_()  # Captum warns about inputs that do not require grad
            raw = (Saliency(counted).attribute(leaf, target=targets, abs=True) if method == "saliency"
                   else InputXGradient(counted).attribute(leaf, target=targets))
        elif method == "integrated_gradients":
            raw, delta = IntegratedGradients(counted).attribute(
                inputs, baselines=_baseline(inputs, options), target=targets, n_steps=int(options.n_steps),
                internal_batch_size=max(int(options.internal_batch_size), batch), return_convergence_delta=True)
            delta = delta.detach().float().cpu().numpy()
        elif method in ("smoothgrad", "vargrad"):
            # Captum's stdevs is one float per input tensor; the noise is drawn with std noise_std on a zero
            # tensor z and scaled per image: the model sees inputs + range_b * z, and d/dz is d/d input exactly
            scale = (inputs.amax(dim=(1, 2, 3)) - inputs.amin(dim=(1, 2, 3))).view(batch, 1, 1, 1)  # (B, 1, 1, 1)

            def noisy(z: torch.Tensor, images: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
                return counted(images + ranges * z.detach() + (z - z.detach()))

            raw = NoiseTunnel(Saliency(noisy)).attribute(
                torch.zeros_like(inputs), nt_type=method, nt_samples=int(options.noise_samples),
                nt_samples_batch_size=per_eval, stdevs=float(options.noise_std), target=targets,
                additional_forward_args=(inputs, scale), abs=False)
        else:  # occlusion
            window = min(int(options.occlusion_window), height, width)
            stride = min(int(options.occlusion_stride), window)
            raw = Occlusion(counted).attribute(
                inputs, sliding_window_shapes=(channels, window, window), strides=(channels, stride, stride),
                baselines=_baseline(inputs, options), target=targets, perturbations_per_eval=per_eval)
    raw = raw.detach().cpu()  # (B, C, H, W)
    maps = raw.float().abs().sum(dim=1).numpy().astype(np.float32)  # (B, H, W)
    return Attributions(maps, raw, counted.rows // batch, counted.grad_rows // batch, delta)


def _baseline(inputs: torch.Tensor, options: MethodOptions) -> Any:
    """Integrated gradients' and occlusion's baseline: None (Captum's zeros: the normalised mean colour) or RISE's
    blur of the input (B, C, H, W)."""
    if options.baseline == "zeros":
        return None
    from reportgen.analyses._faithfulness import rise_blur
    return rise_blur(inputs).detach()


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """The global RNG seeded with `seed` inside the block, the caller's state (CPU and every CUDA device) put back."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


# --- CAMs ----------------------------------------------------------------------------------------------------------


def _cam(model: nn.Module, method: str, inputs: torch.Tensor, targets: torch.Tensor, options: MethodOptions,
         layer: Optional[str], layout: Optional[tuple]) -> Attributions:
    if layer is None:
        layer = default_cam_layer(model, inputs[:1])
        if layer is None:
            raise ValueError(f"{method}: no layer of {type(model).__name__} outputs a grid of the image")
    if layout is None:
        layout = grid_layout(model, layer, inputs[:1])
        if layout is None:
            raise ValueError(f"{method}: the output of {layer} does not lie on a grid of the image")
    if method in _GRADIENT_CAMS:
        raw, forwards, backwards = _gradient_cam(model, method, inputs, targets, layer, layout), 1, 1
    else:
        logits, activation = _forward_capture(model, layer, inputs)
        grid = _grid(activation.float(), layout)  # (B, C, h, w)
        forwards, backwards = (1 if method == "eigencam" else 1 + grid.shape[1]), 0
        if method == "eigencam":
            raw = _first_component(grid).clamp_min(0)
        elif method == "scorecam":
            scores = _score_cam_scores(model, inputs, targets, grid, options)  # (B, C)
            raw = _weighted(scores.softmax(dim=1), grid)
        else:
            scores = _ablation_scores(model, inputs, targets, grid, layer, layout, options)  # (B, C)
            score = logits.gather(1, targets[:, None]).float()  # (B, 1)
            raw = _weighted((score - scores) / torch.where(score != 0, score.abs(), torch.ones_like(score)), grid)
    raw = raw.detach().float().cpu()  # (B, h, w)
    maps = F.interpolate(raw[:, None], size=tuple(inputs.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    return Attributions(maps.clamp_min(0).numpy().astype(np.float32), raw, forwards, backwards)


def _weighted(weights: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """(B, C) channel weights, (B, C, h, w) activations -> (B, h, w) ReLU(sum_c w_c A_c)."""
    return (weights.to(grid.device)[:, :, None, None] * grid).sum(dim=1).clamp_min(0)


def _grid(tensor: torch.Tensor, layout: Tuple[str, Any]) -> torch.Tensor:
    """The layer's output (or its gradient) as (B, C, h, w), as the gradcam analysis reads it."""
    kind, tokens = layout
    if kind == "nhwc":
        return tensor.permute(0, 3, 1, 2)  # (B, C, h, w)
    return to_grid(tensor, tokens)  # (B, C, h, w) or (B, C, rows, columns) without the prefix tokens


def _gradient_cam(model: nn.Module, method: str, inputs: torch.Tensor, targets: torch.Tensor, layer: str,
                  layout: Tuple[str, Any]) -> torch.Tensor:
    """Grad-CAM's family exactly as the gradcam analysis computes it: a gradient leaf at `layer`, autograd.grad of
    the summed target scores, `cam_from`; (B, h, w)."""
    with CaptureEngine(model, gradients=[layer]) as engine:
        captures = engine.start_batch()
        with engine.forward_mode():
            logits = model(inputs)  # (B, K), on the graph from the leaf
            score = logits.gather(1, targets[:, None]).sum()
            (grads,) = torch.autograd.grad(score, captures[layer])
        activation = captures[layer].detach()
    return cam_from(method, _grid(activation.float(), layout), _grid(grads.float(), layout))


def _forward_capture(model: nn.Module, layer: str, inputs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One forward without gradients: the (B, K) scores and the output of `layer` (a call key)."""
    with CaptureEngine(model, activations=[layer.partition("#")[0]]) as engine, torch.no_grad():
        captures = engine.start_batch()
        logits = model(inputs)
    return logits, captures[layer]


def _first_component(grid: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h, w): each image's activations (positions x channels, centred per channel) projected on
    their first right singular vector, as pytorch-grad-cam's get_2d_projection (numpy, float32, NaN as 0)."""
    values = np.nan_to_num(grid.detach().float().cpu().numpy())  # (B, C, h, w)
    projections = []
    for activations in values:
        rows = activations.reshape(activations.shape[0], -1).T  # (h*w, C)
        rows = rows - rows.mean(axis=0)
        _, _, vt = np.linalg.svd(rows, full_matrices=False)
        projections.append((rows @ vt[0]).reshape(activations.shape[1:]))  # (h, w)
    return torch.from_numpy(np.float32(projections))


def _pairs(batch: int, channels: int, chunk: int, device: torch.device) -> Iterator[Tuple[slice, torch.Tensor,
                                                                                            torch.Tensor]]:
    """(slice of the flat (image, channel) index, image indices, channel indices), `chunk` pairs at a time."""
    images = torch.arange(batch, device=device).repeat_interleave(channels)  # (B*C,)
    indices = torch.arange(channels, device=device).repeat(batch)  # (B*C,)
    for start in range(0, batch * channels, chunk):
        rows = slice(start, min(start + chunk, batch * channels))
        yield rows, images[rows], indices[rows]


def _score_cam_scores(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, grid: torch.Tensor,
                      options: MethodOptions) -> torch.Tensor:
    """(B, C) target logits of the input masked by each channel's upsampled, min-max normalised map."""
    batch, channels = grid.shape[:2]
    grid = grid.to(inputs.device)
    scores = torch.empty(batch * channels, device=inputs.device)
    with torch.no_grad():
        for rows, images, indices in _pairs(batch, channels, max(1, int(options.internal_batch_size)),
                                            inputs.device):
            masks = F.interpolate(grid[images, indices][:, None], size=tuple(inputs.shape[-2:]), mode="bilinear",
                                  align_corners=True)  # (n, 1, H, W), as torch.nn.UpsamplingBilinear2d
            low, high = masks.amin(dim=(2, 3), keepdim=True), masks.amax(dim=(2, 3), keepdim=True)
            masks = (masks - low) / (high - low + 1e-8)
            logits = model(inputs[images] * masks.to(inputs.dtype))  # (n, K)
            scores[rows] = logits.gather(1, targets[images][:, None])[:, 0].float()
    return scores.view(batch, channels)


def _ablation_scores(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, grid: torch.Tensor, layer: str,
                     layout: Tuple[str, Any], options: MethodOptions) -> torch.Tensor:
    """(B, C) target logits with channel c of `layer`'s output zeroed (every position, prefix tokens included)."""
    batch, channels = grid.shape[:2]
    kind = layout[0]
    shape = {"nchw": (-1, channels, 1, 1), "nhwc": (-1, 1, 1, channels), "tokens": (-1, 1, channels)}[kind]
    ablated: list = []  # the current chunk's channel indices (n,)

    def ablate(output: torch.Tensor) -> torch.Tensor:
        zeroed = F.one_hot(ablated[0], channels).bool().view(shape)  # one channel per row
        return output.masked_fill(zeroed, 0)

    scores = torch.empty(batch * channels, device=inputs.device)
    with torch.no_grad(), replace_output(model, layer, ablate):
        for rows, images, indices in _pairs(batch, channels, max(1, int(options.internal_batch_size)),
                                            inputs.device):
            ablated[:] = [indices]
            logits = model(inputs[images])  # (n, K)
            scores[rows] = logits.gather(1, targets[images][:, None])[:, 0].float()
    return scores.view(batch, channels)


@contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters inside the block; every module's mode and each parameter's requires_grad put
    back on exit, on every path."""
    modes = [(module, module.training) for module in model.modules()]
    flags = [(param, param.requires_grad) for param in model.parameters()]
    try:
        model.eval()
        for param, _ in flags:
            param.requires_grad_(False)
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        for module, training in modes:
            module.training = training


# --- controls and display ------------------------------------------------------------------------------------------


def control_maps(kind: str, images01: torch.Tensor, seed: int = 0) -> np.ndarray:
    """(B, 3, H, W) images in [0, 1] -> (B, H, W) float32 control 'explanations': random (uniform in [0, 1),
    seeded), sobel (gradient magnitude of the BT.601 grey image, scipy.ndimage.sobel, reflected borders), gaussian
    (a centred isotropic Gaussian, peak 1, sigma = min(H, W) / 4, the same for every image)."""
    images = images01.detach().float().cpu().numpy()  # (B, C, H, W)
    batch, channels, height, width = images.shape
    if kind == "random":
        return np.random.default_rng(int(seed)).random((batch, height, width), dtype=np.float32)
    if kind == "sobel":
        from scipy import ndimage
        grey = (np.tensordot(np.float64(_GREY), images, axes=([0], [1])) if channels == 3
                else images.mean(axis=1, dtype=np.float64))  # (B, H, W)
        edges = [np.hypot(ndimage.sobel(image, axis=0), ndimage.sobel(image, axis=1)) for image in grey]
        return np.float32(edges).reshape(batch, height, width)
    if kind == "gaussian":
        sigma = min(height, width) / 4
        rows = (np.arange(height) - (height - 1) / 2)[:, None]  # (H, 1)
        columns = (np.arange(width) - (width - 1) / 2)[None, :]  # (1, W)
        bump = np.exp(-(rows ** 2 + columns ** 2) / (2 * sigma ** 2)).astype(np.float32)  # (H, W)
        return np.repeat(bump[None], batch, axis=0)
    raise ValueError(f"unknown control {kind!r}; valid choices: {', '.join(CONTROLS)}")


def display_maps(maps: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """(B, H, W) -> [0, 1] float32: each map divided by its own `percentile`-th percentile (its maximum when that
    is 0, a sparse map) and clipped, the field's way to show pixel attributions; zero maps stay zero, NaN / Inf 0."""
    maps = np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0)
    flat = maps.reshape(len(maps), -1)  # (B, H*W)
    scale = np.percentile(flat, percentile, axis=1) if flat.shape[1] else np.zeros(len(maps))  # (B,)
    peak = flat.max(axis=1) if flat.shape[1] else np.zeros(len(maps))
    scale = np.where(scale > 0, scale, peak)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)[:, None, None]
    return np.where(scale[:, None, None] > 0, np.clip(maps / safe, 0.0, 1.0), 0.0).astype(np.float32)
