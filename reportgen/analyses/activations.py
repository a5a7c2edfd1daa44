"""`activations`: what the chosen layers compute, over the whole folder, inside the one pass.

Layers: `layers` patterns (reportgen.engine.layers), default each stage's output of a CNN or about four blocks of a
transformer. Every call of a reused module is its own entry (`shared`, `shared#2`). Outputs are read as channels x
positions (reportgen.engine.tensors.channel_view): conv maps (B, C, h, w); ViT tokens (B, prefix + rows*columns, C)
on the model's own patch grid without the prefix (class, distillation, register) tokens; Swin's channels-last maps
permuted; other tokens (B, N, C) as N positions; (B, C) as one.

Each analysed layer is streamed: reduced inside the forward, as its call returns (`consume`), so the pass keeps
no copy of it and a later in-place op cannot change what was measured. Everything is reduced on the device and only
small per-batch results cross to the CPU (reportgen.state.channel_reducers), so memory does not grow with the folder
and every piece of state merges exactly:

- Statistics per layer call and channel: count, mean, std (population, float64, Chan merge), min, max, fraction
  of values exactly 0, fraction saturated, NaN/Inf count (non-finite values are left out of everything else).
  Saturated means at the bound of a bounded activation: the layer itself or, for a container, its last submodule
  being ReLU6/Hardtanh (>= max_val, and <= min_val when that is negative), Sigmoid/Hardsigmoid (>= 1) or Tanh
  (|x| >= 1); unbounded layers have none. With `saturation` set, |x| >= saturation in every layer instead.
  A channel is dead when at least `dead_zero_fraction` of its values are exactly 0.
- Histograms per layer call over fixed symmetric log-spaced edges (±hist_min .. ±hist_max, out-of-range values
  in the end bins), so shard histograms add up; the distribution figure's percentiles are read from them. They
  count at most `hist_sample` values of each image per layer: every k-th of its flat channel x position values,
  k the smallest prime that is enough and does not divide the positions per channel (the same positions in every
  image, so they merge exactly whatever the batches or shards; smaller layers and `hist_sample=0`: every value).
  Binning every value costs about as much as the forward on a CPU; the sample keeps each percentile the report
  draws within one percentile rank of the histogram of every value (tested on resnet18 stage outputs).
- Top activating images: per channel, the `top_k` images with the highest spatial maximum (ties: the earlier
  file), for every channel in results/topk.json. Crops around the maximum (side `crop_factor` x the layer's
  stride, input size / map size, an approximate receptive field) are drawn for `channels_per_layer` channels of
  the drawn layers: `channels` if set, else the highest-mean channels over the example images every run sees first
  (the folder's first images), so shards, resumed runs and merges all keep crops for the same channels.
- Feature maps of `n_images` images per drawn layer (spread over the folder, or the first ones): each image's
  strongest channels by mean, on one colour scale per layer, and the mean over channels laid over the image.
- Embedding: the penultimate features, i.e. the input of the last nn.Linear called in the forward. The engine
  captures outputs only, so a one-image probe in `begin` finds the module call whose output becomes that input:
  as is / flattened (avgpool, dropout, flatten), its first token (ViT encoder: the class token), or its mean over
  positions. PCA to 2-D from the streamed float64 mean and covariance; per-image features stream to disk and are
  projected at the end.

Results: `activation_stats.csv` (layer, channel, count, mean, std, max, frac_zero, min, frac_saturated,
nonfinite), `topk.json` (layer -> channel -> [{path, value, y, x}], y/x the maximum's cell in the layer's grid),
`embeddings.npz` (paths, features (N, D), labels, predicted, features_2d (N, 2), explained_variance,
explained_variance_ratio, components (2, D), mean (D,), layer).
"""
from __future__ import annotations

import bisect
import csv
import json
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional, Set, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reportgen.analyses.base import Analysis, Batch, Requirements, RunContext, register
from reportgen.engine.capture import CaptureEngine, primary_tensor, probe_forward
from reportgen.engine.layers import named_modules, select_layers, stage_outputs
from reportgen.engine.grids import spatial_layout
from reportgen.engine.tensors import TokenLayout, channel_view, token_layout_of
from reportgen.errors import ConfigError
from reportgen.inputs.labels import display_names
from reportgen.report import plots
from reportgen.report.elements import Alert, KeyValues, Section, Table, Text
from reportgen.report.overlays import heat_on_thumbnail
from reportgen.report.thumbnails import thumbnail
from reportgen.state.channel_reducers import (HIST_SAMPLE, ChannelStats, ChannelTopK, CovarianceMoments, Scratch,
                                              batch_reductions, best_of_batch, histogram_stride, peak_positions,
                                              symlog_edges)
from reportgen.state.reducers import BoundedTop, FixedHistogram
from reportgen.state.streams import COPY_ROWS, RowStore, absorb_rows

MAP_SIDE = 48  # feature maps kept for the gallery are average-pooled down to at most this many cells per side
CROP_PIXELS = 96  # crops of top-activating images are shrunk to at most this side
CSV_COLUMNS = ["layer", "channel", "count", "mean", "std", "max", "frac_zero", "min", "frac_saturated", "nonfinite"]
QUANTILES = (0.01, 0.25, 0.5, 0.75, 0.99)
MODEL_OUTPUT = "<model output>"  # the embedding layer of a backbone (task embedding): its own pooled output


@dataclass
class _BatchInProgress:
    """What `consume` builds up for one batch until `update` finishes it (and what every layer call of the batch
    shares, made once)."""

    batch: Batch
    gallery_rows: List[int]  # rows entering a gallery slot
    indices: List[int] = field(init=False)  # (B,) image indices
    paths: np.ndarray = field(init=False)  # (B,) object array: the top-k's path column
    layer_maps: Dict[int, Dict[str, tuple]] = field(init=False)  # row -> call key -> maps
    seen: Set[str] = field(default_factory=set)  # call keys consumed

    def __post_init__(self) -> None:
        self.indices = self.batch.indices.tolist()
        self.paths = np.array(self.batch.paths, dtype=object)
        self.layer_maps = {row: {} for row in self.gallery_rows}


@dataclass
class ActivationsConfig:
    layers: Optional[List[str]] = None  # layers analysed (name, glob, re:, type:, depth: patterns; every call of a
    #   reused module counts); null: each stage's output (CNN) or about four encoder blocks (transformers)
    n_images: int = 6  # images drawn with their feature maps, one figure row each
    spread: bool = True  # those images spread over the sorted folder: the readable image nearest the middle of each
    #   of n_images equal parts (one per class when class folders are about equal); false: the first n_images
    channels_shown: int = 16  # feature maps drawn per image and layer: the image's strongest channels by mean
    channels_per_layer: int = 8  # channels per drawn layer shown with their top-activating image crops
    channels: Optional[List[int]] = None  # those channels, the same indices in every layer (null: the highest-mean
    #   channels over the folder's first images)
    top_k: int = 6  # images kept per channel, by the channel's spatial maximum (topk.json lists every channel)
    max_drawn: int = 8  # layer calls drawn (feature maps, crops), spread over depth; statistics cover all of them
    dead_zero_fraction: float = 0.99  # a channel is dead when at least this fraction of its values is exactly 0
    dead_alert: float = 0.1  # alert when more than this fraction of a layer's channels is dead
    saturation: Optional[float] = None  # |x| >= this counts as saturated in every layer; null: the bounds of a
    #   bounded activation ending the layer (ReLU6, Hardtanh, Sigmoid, Hardsigmoid, Tanh), none for other layers
    hist_min: float = 1e-4  # histogram edges are log-spaced over ±[hist_min, hist_max]; |x| < hist_min shares one
    #   bin with 0 (fixed edges, not data-chosen ones, so histograms of shards add up)
    hist_max: float = 1e4  # values beyond ±hist_max are counted in the end bins
    bins_per_decade: int = 8  # histogram resolution: a factor of 10^(1/8) = 1.33 per bin
    hist_sample: int = HIST_SAMPLE  # the histograms count at most this many values of each image per layer (a
    #   fixed systematic sample, the same positions in every image); 0: every value (about 10x slower on a CPU)
    crop_factor: float = 4.0  # crop side = crop_factor x the layer's stride (input size / map size), clipped to
    #   [image side / 4, image side]: an approximate receptive field around the maximum
    embedding: bool = True  # PCA view of the penultimate features (the input of the last nn.Linear)
    embedding_layer: Optional[str] = None  # take the features from this layer's (first call's) output instead (4-D
    #   maps and 3-D tokens averaged over positions); null: found by a probe


@dataclass
class LayerCall:
    """One analysed call of a selected layer, as the probe in `begin` saw it."""

    key: str  # call key: `layer` or `layer#2`
    layer: str  # module name
    shape: Tuple[int, ...]  # output shape for one image
    channels: int
    grid: Optional[Tuple[int, int]]  # (h, w) when the output lays out as a spatial grid
    channels_last: bool  # 4-D output is (B, h, w, C)
    low: Optional[float]  # saturation bounds (None: not applied)
    high: Optional[float]
    hist_stride: int = 1  # the histogram counts every hist_stride-th value of each image (histogram_stride)
    drawn: bool = False  # gets feature-map and crop figures
    tokens: Optional[TokenLayout] = None  # ViT tokens: the model's prefix tokens and patch grid (None: guessed)


@dataclass
class ProbeCall:
    """One module call seen by the probe forward."""

    name: str
    key: str
    output: torch.Tensor  # (1, ...) primary tensor output, cloned when it was produced


def probe_calls(model: nn.Module, example: torch.Tensor, wanted: Set[str], recent: int = 8
                ) -> Tuple[List[ProbeCall], Optional[Tuple[str, str]]]:
    """One forward of `example` (one image): the outputs of every call of the `wanted` modules in completion order,
    and (call key, recipe) of the module call whose output feeds the last nn.Linear call (`find_head_input`, among
    the `recent` calls completed before it). Only those few outputs are kept (cloned when produced, so a later
    in-place op cannot change them): the probe stays small on large models. Eval mode and no_grad; hooks and mode
    restored on every path."""
    selected: List[ProbeCall] = []
    window: Deque[ProbeCall] = deque(maxlen=recent)
    heads: List[Optional[Tuple[str, str]]] = []

    def linear_input(key: str, name: str, module: nn.Module, inputs: Any) -> None:
        if isinstance(module, nn.Linear) and inputs and isinstance(inputs[0], torch.Tensor):
            heads.append(find_head_input(list(window), inputs[0].detach()))

    def record(key: str, name: str, module: nn.Module, inputs: Any, output: Any) -> None:
        tensor = primary_tensor(output)
        if tensor is not None:
            call = ProbeCall(name, key, tensor.detach().clone())
            window.append(call)
            if name in wanted:
                selected.append(call)

    probe_forward(model, example, on_start=linear_input, on_end=record)
    return selected, (heads[-1] if heads else None)


def features_from(output: torch.Tensor, recipe: str) -> torch.Tensor:
    """A captured output -> (B, D) features by a recipe found by `find_head_input` (or `pool` for a chosen layer)."""
    if recipe == "first":
        return output[:, 0]  # (B, D): the class token
    if recipe == "pool" and output.dim() == 4:
        return output.float().mean(dim=(2, 3))  # (B, C)
    if recipe == "pool" and output.dim() == 3:
        return output.float().mean(dim=1)  # (B, C)
    if recipe in ("mean_hw", "mean_tokens"):
        return output.float().mean(dim=(2, 3) if recipe == "mean_hw" else 1)
    return output.flatten(1)  # (B, D)


def find_head_input(calls: List[ProbeCall], wanted: torch.Tensor) -> Optional[Tuple[str, str]]:
    """(call key, recipe) of the latest call whose output gives `wanted` (a Linear's (1, D) input) exactly (as is,
    flattened, or its first token) or up to rounding (its mean over positions); None when no call does."""
    if wanted.dim() != 2:
        return None
    for call in reversed(calls):
        out = call.output
        if out.shape[0] != wanted.shape[0]:
            continue
        if out.numel() == wanted.numel() and torch.equal(out.reshape(wanted.shape), wanted):
            return call.key, "flat"
        if out.dim() == 3 and out.shape[2] == wanted.shape[1] and torch.equal(out[:, 0], wanted):
            return call.key, "first"
        for recipe, rank, dims in (("mean_hw", 4, (2, 3)), ("mean_tokens", 3, (1,))):
            if out.dim() == rank:
                reduced = out.float().mean(dim=dims)  # (1, D)
                if reduced.shape == wanted.shape and torch.allclose(reduced, wanted.float(), rtol=1e-5, atol=1e-6):
                    return call.key, recipe
    return None


def saturation_bounds(module: nn.Module, threshold: Optional[float]) -> Tuple[Optional[float], Optional[float]]:
    """(low, high) saturation bounds of a layer's output (see the module docstring)."""
    if threshold is not None:
        return -float(threshold), float(threshold)
    leaves = [m for m in module.modules() if not list(m.children())]
    last = leaves[-1] if leaves else module
    if isinstance(last, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
        return (float(last.min_val) if last.min_val < 0 else None), float(last.max_val)
    if isinstance(last, (nn.Sigmoid, nn.Hardsigmoid)):
        return None, 1.0
    if isinstance(last, nn.Tanh):
        return -1.0, 1.0
    return None, None


def histogram_quantiles(counts: np.ndarray, edges: np.ndarray, quantiles, low: float, high: float) -> np.ndarray:
    """Quantiles of binned values, linear inside a bin; the end bins reach the observed `low` and `high` (they hold
    the out-of-range values). NaN when the histogram is empty."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return np.full(len(quantiles), np.nan)
    left, right = edges[:-1].copy(), edges[1:].copy()
    left[0], right[-1] = min(left[0], low), max(right[-1], high)
    cumulative = np.cumsum(counts)
    out = []
    for q in quantiles:
        target = q * total
        i = int(min(np.searchsorted(cumulative, target, side="left"), len(counts) - 1))
        before = cumulative[i] - counts[i]
        fraction = (target - before) / counts[i] if counts[i] > 0 else 0.0
        out.append(left[i] + fraction * (right[i] - left[i]))
    return np.clip(np.array(out), low, high)


def crop_at(image: torch.Tensor, grid: Optional[Tuple[int, int]], position: int, factor: float
            ) -> Tuple[np.ndarray, Optional[Tuple[float, float]]]:
    """(3, H, W) uint8 image -> (region (3, h, w) uint8 copy, centre (y, x) of the grid cell in region pixels)
    around a grid cell: side factor x stride, clipped to [min(H, W) / 4, min(H, W)], shifted to stay inside the
    image. Without a grid: the whole image, no centre. A region is kept as cut (a copy, no resize) up to
    2 x CROP_PIXELS a side, larger ones are shrunk to CROP_PIXELS now: most crops that enter a top-k heap are pushed
    out again, so `shrink_crop` resizes only the ones drawn."""
    if grid is None:
        return _bounded(image, None)
    _, height, width = image.shape
    y, x = divmod(int(position), grid[1])
    centre_y, centre_x = (y + 0.5) * height / grid[0], (x + 0.5) * width / grid[1]
    side_limit = min(height, width)
    side = int(round(min(side_limit, max(factor * max(height / grid[0], width / grid[1]), side_limit / 4))))
    top = int(min(max(round(centre_y - side / 2), 0), height - side))
    left = int(min(max(round(centre_x - side / 2), 0), width - side))
    return _bounded(image[:, top:top + side, left:left + side], (centre_y - top, centre_x - left))


def _bounded(region: torch.Tensor, centre: Optional[Tuple[float, float]]
             ) -> Tuple[np.ndarray, Optional[Tuple[float, float]]]:
    """A (3, h, w) uint8 copy of region, shrunk to CROP_PIXELS a side when it is over twice that (centre scaled)."""
    if max(region.shape[1:]) <= 2 * CROP_PIXELS:
        return region.detach().cpu().numpy().copy(), centre
    small = thumbnail(region, CROP_PIXELS)  # (h, w, 3)
    scale = small.shape[0] / region.shape[1]
    return small.transpose(2, 0, 1).copy(), None if centre is None else (centre[0] * scale, centre[1] * scale)


def shrink_crop(region: np.ndarray, centre: Optional[Tuple[float, float]]
                ) -> Tuple[np.ndarray, Optional[Tuple[float, float]]]:
    """A kept crop as drawn: (crop (h, w, 3) uint8, at most CROP_PIXELS a side; marker (y, x) in crop pixels, the
    grid cell's centre, or None without a grid)."""
    crop = thumbnail(torch.from_numpy(region), CROP_PIXELS)  # (h, w, 3)
    if centre is None:
        return crop, None
    scale = crop.shape[0] / region.shape[1]
    return crop, (centre[0] * scale - 0.5, centre[1] * scale - 0.5)


@register("activations")
class Activations(Analysis):
    Config = ActivationsConfig
    title = "Activations"
    layer_option = "analysis.activations.layers"

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        key = "analysis.activations."
        for name in ("n_images", "channels_per_layer", "max_drawn"):
            if int(getattr(cfg, name)) < 0:
                raise ConfigError(key + name, getattr(cfg, name), "an integer >= 0")
        for name in ("channels_shown", "top_k", "bins_per_decade"):
            if int(getattr(cfg, name)) < 1:
                raise ConfigError(key + name, getattr(cfg, name), "an integer >= 1")
        for name in ("dead_zero_fraction", "dead_alert"):
            if not 0.0 <= float(getattr(cfg, name)) <= 1.0:
                raise ConfigError(key + name, getattr(cfg, name), "a fraction in [0, 1]")
        if int(cfg.hist_sample) < 0:
            raise ConfigError(key + "hist_sample", cfg.hist_sample, "an integer >= 0 (0: every value)")
        if not 0.0 < float(cfg.hist_min) < float(cfg.hist_max):
            raise ConfigError(key + "hist_min", cfg.hist_min, f"a positive value below hist_max ({cfg.hist_max})")
        if cfg.saturation is not None and not float(cfg.saturation) > 0:
            raise ConfigError(key + "saturation", cfg.saturation, "a positive threshold or null")
        if not float(cfg.crop_factor) > 0:
            raise ConfigError(key + "crop_factor", cfg.crop_factor, "a positive factor")
        if cfg.channels is not None and any(int(c) < 0 for c in cfg.channels):
            raise ConfigError(key + "channels", list(cfg.channels), "channel indices >= 0")

    def __init__(self, cfg: Any, ctx: RunContext):
        super().__init__(cfg, ctx)
        self.check_config(cfg)
        self.edges = symlog_edges(float(cfg.hist_min), float(cfg.hist_max), int(cfg.bins_per_decade))
        self._edges_device: Optional[torch.Tensor] = None
        self._scratch = Scratch()  # batch_reductions' work buffer, reused by every layer and batch
        self.layers: List[str] = []
        self.calls: List[LayerCall] = []
        self.notes: List[str] = []  # what could not be analysed, and why
        self.stats: Dict[str, ChannelStats] = {}
        self.hists: Dict[str, FixedHistogram] = {}
        self.topk: Dict[str, ChannelTopK] = {}
        self.shown: Dict[str, List[int]] = {}  # drawn key -> channels with crop heaps (chosen in begin)
        self.crops: Dict[str, Dict[int, BoundedTop]] = {}
        count, total = int(cfg.n_images), max(1, int(ctx.num_images))
        self.slots = ([(j * total) // count for j in range(count)] if cfg.spread else list(range(count)))
        self.centres = ([(2 * j + 1) * total / (2 * count) for j in range(count)] if cfg.spread else self.slots)
        self.gallery = [BoundedTop(1) for _ in self.slots]  # per slot: the image nearest its centre, with maps
        self.images = 0
        self.missing: Dict[str, int] = {}  # key -> batches in which the call did not happen
        self.embed_key: Optional[str] = None
        self.embed_recipe = "flat"
        self.moments = CovarianceMoments()
        self.store: Optional[RowStore] = None
        self._current: Optional[_BatchInProgress] = None  # the batch whose layer calls are being consumed
        self._calls_by_key: Dict[str, LayerCall] = {}

    # --- setup -------------------------------------------------------------------------------------------------

    def begin(self, example: Batch) -> None:
        model, cfg = self.ctx.model, self.cfg
        one = example.inputs[:1]
        if cfg.layers:
            self.layers = select_layers(model, [str(p) for p in cfg.layers], "analysis.activations.layers")
        else:
            self.layers = stage_outputs(model, one)
        calls, head = probe_calls(model, one, set(self.layers))
        modules = named_modules(model)
        seen = set()
        for call in calls:
            seen.add(call.name)
            module = modules[call.name]
            last = spatial_layout(tuple(call.output.shape), module, *one.shape[-2:]) == "nhwc"  # from the image
            tokens = (token_layout_of(model, call.output.shape[1], *one.shape[-2:]) if call.output.dim() == 3
                      else None)
            try:
                view, grid = channel_view(call.output, last, tokens)  # (1, C, P)
            except ValueError as exc:
                self.notes.append(f"{call.key}: {exc}")
                continue
            low, high = saturation_bounds(module, cfg.saturation)
            stride = histogram_stride(int(view.shape[1]), int(view.shape[2]), int(cfg.hist_sample))
            self.calls.append(LayerCall(call.key, call.name, tuple(call.output.shape[1:]), int(view.shape[1]), grid,
                                        last, low, high, stride, tokens=tokens))
        for name in self.layers:
            if name not in seen:
                self.notes.append(f"{name}: not called in the forward, or its output holds no tensor")
        self._calls_by_key = {c.key: c for c in self.calls}
        count = min(int(cfg.max_drawn), len(self.calls))
        for i in {int(round(v)) for v in np.linspace(0, len(self.calls) - 1, count)} if count else ():
            self.calls[i].drawn = True  # spread over depth, first and last included
        means = self._example_channel_means(example) if cfg.channels is None else {}
        for call in self.calls:
            if call.drawn:
                self._choose_crop_channels(call, means.get(call.key))
            self.stats[call.key] = ChannelStats(call.channels)
            self.hists[call.key] = FixedHistogram(self.edges)
            self.topk[call.key] = ChannelTopK(call.channels, int(cfg.top_k))
        if cfg.embedding:
            self._find_embedding(head)

    def _example_channel_means(self, example: Batch) -> Dict[str, np.ndarray]:
        """Per drawn call, each channel's mean over the example images (the folder's first ones, so every shard,
        resumed run and merge gets the same), one image per forward so the probe never needs more memory than
        one image."""
        drawn = {c.key: c for c in self.calls if c.drawn}
        sums: Dict[str, np.ndarray] = {}
        with CaptureEngine(self.ctx.model, sorted({c.layer for c in drawn.values()}), [], []) as engine:
            for row in range(len(example.paths)):
                captures = engine.start_batch()
                with torch.inference_mode():
                    self.ctx.model(example.inputs[row:row + 1])
                for key, call in drawn.items():
                    if key in captures:
                        values, _ = channel_view(captures[key].float(), call.channels_last, call.tokens)  # (1, C, P)
                        mean = torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0).mean(dim=(0, 2))  # (C,)
                        sums[key] = sums.get(key, 0) + mean.double().cpu().numpy()
        return sums

    def _choose_crop_channels(self, call: LayerCall, means: Optional[np.ndarray]) -> None:
        """The channels whose top-activating crops are kept: `channels` when set, else the highest-mean channels
        over the example images."""
        if self.cfg.channels is not None or means is None:
            chosen = [int(c) for c in (self.cfg.channels or []) if int(c) < call.channels]
        else:
            order = np.lexsort((np.arange(call.channels), -means))
            chosen = sorted(order[: int(self.cfg.channels_per_layer)].tolist())
        self.shown[call.key] = chosen
        self.crops[call.key] = {c: BoundedTop(int(self.cfg.top_k)) for c in chosen}

    def _find_embedding(self, head: Optional[Tuple[str, str]]) -> None:
        if getattr(self.ctx.loaded, "task", None) == "embedding" and not self.cfg.embedding_layer:
            self.embed_key, self.embed_recipe = MODEL_OUTPUT, "output"  # a backbone: its output is the embedding
            return
        if self.cfg.embedding_layer:
            name = select_layers(self.ctx.model, [str(self.cfg.embedding_layer)],
                                 "analysis.activations.embedding_layer")[-1]
            self.embed_key, self.embed_recipe = name, "pool"
            return
        if head is None:
            if getattr(self.ctx.loaded, "task", None) in ("segmentation", "detection"):
                return  # per-pixel or per-box outputs: no per-image embedding to map unless embedding_layer names one
            self.notes.append("embedding: no module output feeds the last nn.Linear (set embedding_layer)")
            return
        self.embed_key, self.embed_recipe = head

    def requires(self) -> Requirements:
        """The analysed layers are streamed (reduced inside the forward, no copy kept); the embedding's layer, small
        and needed with the logits, is captured."""
        stored = [self.embed_key.partition("#")[0]] if self.embed_key and self.embed_key != MODEL_OUTPUT else []
        return Requirements(activations=stored, streamed=list(self.layers))

    # --- the pass ----------------------------------------------------------------------------------------------

    def consume(self, batch: Batch, key: str, output: torch.Tensor) -> None:
        """One analysed layer call of this batch, inside the forward: statistics, histogram, top-k, crops and
        gallery maps, all from this tensor now (nothing of it is kept)."""
        call = self._calls_by_key.get(key)
        if call is None or output.shape[0] != len(batch.paths):  # a call the probe did not see (e.g. a third call
            return  # of a reused module), or rows that are not the batch's images (a detector's proposals)
        if self._current is None or self._current.batch is not batch:
            self._current = _BatchInProgress(batch, self._gallery_rows(batch))
        values, grid = channel_view(output, call.channels_last, call.tokens)  # (B, C, P)
        if values.shape[1] != call.channels:
            return  # counted as missing in update
        if self._edges_device is None or self._edges_device.device != values.device:
            self._edges_device = torch.as_tensor(self.edges, dtype=torch.float64, device=values.device)
        host = batch_reductions(values, self._edges_device, call.low, call.high, call.hist_stride, self._scratch)
        self.stats[call.key].add(*(host[n] for n in ChannelStats.FIELDS))
        self.hists[call.key].counts += host["hist"]
        self.hists[call.key].nan += int(host["nonfinite"].sum())
        indices, peaks = self._current.indices, host["peak"]  # peaks (B, C)
        wanted = self.topk[call.key].accepts(peaks, indices)  # (B, C): where the maximum's position is needed
        candidates = self._crop_candidates(call, indices, peaks) if call.drawn else None
        if candidates is not None:
            wanted |= candidates
        positions = peak_positions(values, wanted, finite=not host["nonfinite"].any(), peaks=peaks)  # -1: not wanted
        self.topk[call.key].add(peaks, indices, position=positions, path=self._current.paths)
        if call.drawn:
            self._keep_crops(call, batch, indices, peaks, positions, candidates)
            if self._current.gallery_rows and grid is not None:
                self._keep_maps(call, values, grid, self._current.gallery_rows, self._current.layer_maps,
                                host.get("image_mean"))
        self._current.seen.add(call.key)

    def update(self, batch: Batch, outputs: Any, captures: Any) -> None:
        """After the forward: which layer calls did not happen, the gallery's images, the embedding."""
        current = self._current
        if current is None or current.batch is not batch:  # no analysed layer was called in this batch
            current = _BatchInProgress(batch, self._gallery_rows(batch))
        self._current = None  # the batch is not held past its update
        indices = current.indices
        for call in self.calls:
            if call.key not in current.seen:
                self.missing[call.key] = self.missing.get(call.key, 0) + 1
        for row in current.gallery_rows:
            index = indices[row]
            thumb = thumbnail(batch.images[row], int(self.ctx.report.thumbnail_size))
            self.gallery[self._slot(index)].push(self._nearness(index), index, {
                "path": batch.paths[row], "thumb": thumb, "maps": current.layer_maps[row]})
        if self.embed_key:
            self._embed(batch, outputs, captures)
        self.images += len(indices)

    def _gallery_rows(self, batch: Batch) -> List[int]:
        """Rows of the batch that enter a gallery slot (at most one per slot: the nearest its centre)."""
        indices = batch.indices.tolist()
        rows, taken = [], set()
        for row in sorted(range(len(indices)), key=lambda r: (-self._nearness(indices[r]), indices[r])):
            index = indices[row]
            slot = self._slot(index)
            if slot is not None and slot not in taken and self.gallery[slot].accepts(self._nearness(index), index):
                rows.append(row)
                taken.add(slot)
        return rows

    def _slot(self, index: int) -> Optional[int]:
        """The gallery slot an image index belongs to (slot j holds indices from slots[j] to slots[j + 1])."""
        return bisect.bisect_right(self.slots, index) - 1 if self.slots else None

    def _nearness(self, index: int) -> float:
        """Gallery score: minus the distance to the centre of the image's slot (ties: the smaller index)."""
        return -abs(index - self.centres[self._slot(index)])

    def _crop_candidates(self, call: LayerCall, indices: List[int], peaks: np.ndarray) -> np.ndarray:
        """(B, C) bool: the images that could enter a shown channel's crop heap: finite peaks that beat the heap's
        last item (judged before this batch's pushes), and of those only the batch's own best top_k (the others
        are pushed out again by the end of the batch). A superset of those `_keep_crops` keeps."""
        orders = np.asarray(indices, dtype=np.int64)
        shown = list(self.crops[call.key])
        candidates = np.zeros(peaks.shape, dtype=bool)
        if not shown:  # channels_per_layer=0
            return candidates
        scores = peaks[:, shown]  # (B, S)
        entering = np.isfinite(scores) & np.stack(
            [heap.accepts_many(scores[:, j], orders) for j, heap in enumerate(self.crops[call.key].values())], axis=1)
        candidates[:, shown] = entering & best_of_batch(np.where(entering, scores, -np.inf), orders,
                                                        int(self.cfg.top_k))
        return candidates

    def _keep_crops(self, call: LayerCall, batch: Batch, indices: List[int], peaks: np.ndarray,
                    positions: np.ndarray, candidates: np.ndarray) -> None:
        """Crops for the shown channels' heaps (chosen in `begin`), cut only for the `candidates` (B, C) that still
        enter a heap when their turn comes."""
        for channel, heap in self.crops[call.key].items():
            for row in np.flatnonzero(candidates[:, channel]):
                score, index = float(peaks[row, channel]), indices[row]
                if heap.accepts(score, index):
                    position = int(positions[row, channel])  # found: heaps only get harder to enter
                    region, centre = crop_at(batch.images[row], call.grid, position, float(self.cfg.crop_factor))
                    heap.push(score, index, {"path": batch.paths[row], "region": region, "centre": centre})

    def _keep_maps(self, call: LayerCall, values: torch.Tensor, grid: Tuple[int, int], rows: List[int],
                   layer_maps: Dict[int, Dict[str, tuple]], means: Optional[np.ndarray]) -> None:
        """For the gallery rows: the image's strongest channels by mean (maps pooled to <= MAP_SIDE a side) and the
        mean map over all channels. `means` (B, C): the images' channel means from `batch_reductions`, so only the
        chosen maps are read again (ties to the lower channel); None when the batch holds NaN/Inf, which are then
        drawn as 0."""
        count = min(int(self.cfg.channels_shown), call.channels)
        for row in rows:
            maps = values[row].float()  # (C, P)
            if means is None:
                maps = torch.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0)
                strongest = np.argsort(-maps.mean(dim=1).double().cpu().numpy(), kind="stable")[:count]  # (N,)
            else:
                strongest = np.argsort(-means[row], kind="stable")[:count]
            chosen = maps[torch.as_tensor(strongest, device=maps.device)].view(count, grid[0], grid[1])  # (N, h, w)
            if max(grid) > MAP_SIDE:
                size = (max(1, round(grid[0] * MAP_SIDE / max(grid))), max(1, round(grid[1] * MAP_SIDE / max(grid))))
                chosen = F.adaptive_avg_pool2d(chosen[None], size)[0]
            mean_map = maps.mean(dim=0).view(grid[0], grid[1])  # (h, w)
            layer_maps[row][call.key] = (strongest, chosen.cpu().numpy(), mean_map.cpu())

    def _embed(self, batch: Batch, outputs: Any, captures: Any) -> None:
        if self.embed_key == MODEL_OUTPUT:
            features = outputs.embedding.detach().float()  # (B, D): the backbone's own pooled output
        elif self.embed_key not in captures:
            self.missing[self.embed_key] = self.missing.get(self.embed_key, 0) + 1
            return
        else:
            features = features_from(captures[self.embed_key].detach(), self.embed_recipe).float()  # (B, D)
        self.moments.add(features)
        if self.store is None:
            dim = int(features.shape[1])
            dtype = np.float32 if dim * self.ctx.num_images <= 1 << 28 else np.float16  # > 1 GiB: half precision
            self.store = RowStore(self.ctx.results_dir / ".activations", self.ctx.row_capacity,
                                  {"features": ((dim,), dtype), "labels": ((), np.int64),
                                   "predicted": ((), np.int64)})
        self.store.append(batch.paths, features=features.cpu().numpy(), labels=batch.labels.cpu().numpy(),
                          predicted=(outputs.logits.detach().argmax(dim=1).cpu().numpy() if outputs.logits is not None
                                     else np.full(len(batch.paths), -1, dtype=np.int64)))

    # --- state -------------------------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        return {"calls": [c.key for c in self.calls], "slots": self.slots, "images": self.images, "stats": self.stats,
                "hists": self.hists, "topk": self.topk, "shown": self.shown, "crops": self.crops,
                "gallery": self.gallery, "missing": self.missing, "embed_key": self.embed_key,
                "moments": self.moments.to_cpu(), "store": self.store.ref() if self.store is not None else None}

    def merge(self, state: Dict[str, Any]) -> None:
        if state["calls"] != [c.key for c in self.calls]:
            raise ValueError(f"activations of different layer calls cannot be merged: {state['calls']} vs "
                             f"{[c.key for c in self.calls]}")
        if state["slots"] != self.slots:
            raise ValueError(f"gallery slots differ ({state['slots']} vs {self.slots}): the shards were set up for "
                             f"different folder sizes or n_images")
        for key, shown in state["shown"].items():
            if key in self.shown and self.shown[key] != shown:
                raise ValueError(f"{key}: the shards chose different channels for crops ({self.shown[key]} vs "
                                 f"{shown}); set analysis.activations.channels so every shard keeps the same ones")
        self.images += state["images"]
        for key in state["calls"]:
            self.stats[key].merge(state["stats"][key])
            self.hists[key].merge(state["hists"][key])
            self.topk[key].merge(state["topk"][key])
        for key, heaps in state["crops"].items():
            if key not in self.crops:
                self.shown[key] = list(state["shown"][key])
                self.crops[key] = {c: BoundedTop(int(self.cfg.top_k)) for c in self.shown[key]}
            for channel, heap in heaps.items():
                self.crops[key][channel].merge(heap)
        for mine, theirs in zip(self.gallery, state["gallery"]):
            mine.merge(theirs)
        for key, count in state["missing"].items():
            self.missing[key] = self.missing.get(key, 0) + count
        self.moments.merge(state["moments"])
        self.store = absorb_rows(self.store, state["store"], self.ctx.results_dir / ".activations",
                                 self.ctx.row_capacity)

    # --- the report --------------------------------------------------------------------------------------------

    def finalize(self) -> Optional[Section]:
        section = Section(id="activations", title="Activations")
        embedding = self._finish_embedding()
        if not self.images or not self.calls:
            section.elements.append(Text("No image was processed or no layer output could be read, so there are no "
                                         "activation statistics." + (" " + "; ".join(self.notes) if self.notes
                                                                     else "")))
            return section
        self._write_stats_csv()
        self._write_topk_json()
        cfg, dpi = self.cfg, int(self.ctx.report.figure_dpi)
        image_format = str(self.ctx.report.image_format)
        dead = {c.key: int((self.stats[c.key].frac_zero >= float(cfg.dead_zero_fraction)).sum()) for c in self.calls}
        nonfinite = {c.key: int(self.stats[c.key].nonfinite.sum()) for c in self.calls}
        section.summary = (f"{len(self.calls)} layer outputs over {self.images} images; "
                           f"{sum(dead.values())} dead channels of {sum(c.channels for c in self.calls)}")
        self._alerts(section, dead, nonfinite)
        section.elements.append(KeyValues(self._facts()))
        section.elements.append(self._layer_table(dead, nonfinite))
        labels = [c.key for c in self.calls]
        quantiles, means = [], []
        for call in self.calls:
            stats = self.stats[call.key]
            finite = stats.count > 0
            low = float(stats.min[finite].min()) if finite.any() else float("nan")
            high = float(stats.max[finite].max()) if finite.any() else float("nan")
            quantiles.append(histogram_quantiles(self.hists[call.key].counts, self.edges, QUANTILES, low, high))
            means.append(stats.pooled()[0])
        section.elements.append(plots.percentile_bars(
            labels, np.array(quantiles), np.array(means), name="distribution", xlabel="activation (symmetric log)",
            linthresh=float(cfg.hist_min) * 100, dpi=dpi,
            caption="Values of each layer over the folder: whisker 1st-99th percentile, box 25th-75th, black tick "
                    "median, red dot mean (percentiles read from the fixed-bin histograms)"))
        series = [("dead channels", [dead[k] / max(c.channels, 1) for k, c in zip(labels, self.calls)]),
                  ("values exactly 0", [float(self.stats[k].zeros.sum() / max(self.stats[k].values.sum(), 1))
                                        for k in labels])]
        if any(c.low is not None or c.high is not None for c in self.calls):
            series.append(("values saturated", [float(self.stats[k].saturated.sum()
                                                      / max(self.stats[k].values.sum(), 1)) for k in labels]))
        if any(max(values) > 0 for _, values in series):
            section.elements.append(plots.fraction_lines(
                labels, series, name="dead_by_depth", ylabel="% of the layer", dpi=dpi,
                caption=f"By depth (call order): channels dead (>= {cfg.dead_zero_fraction:.0%} of values exactly "
                        f"0) and values exactly 0" + (" or saturated" if len(series) > 2 else "")))
        else:
            section.elements.append(Text("No layer has a value exactly 0" + (" or saturated" if len(series) > 2
                                                                               else "") + ", so no dead channels."))
        for call in self.calls:
            if call.drawn:
                figure = self._maps_figure(call, dpi, image_format)
                if figure is not None:
                    section.elements.append(figure)
        for call in self.calls:
            if call.drawn and self.crops.get(call.key):
                section.elements.append(self._crops_figure(call, dpi, image_format))
        if embedding is not None:
            section.elements.append(embedding)
        return section

    def _facts(self) -> List[Tuple[str, Any]]:
        cfg = self.cfg
        shapes = ", ".join(f"{c.key} {'×'.join(str(d) for d in c.shape)}" for c in self.calls)
        facts: List[Tuple[str, Any]] = [
            ("images", self.images), ("layer outputs (one image)", shapes),
            ("layers chosen by", "analysis.activations.layers" if cfg.layers else "default: each stage's output "
                                                                                  "(transformers: encoder blocks)"),
            ("dead channel", f">= {cfg.dead_zero_fraction:.0%} of its values exactly 0"),
            ("saturated", f"|x| >= {cfg.saturation:g}" if cfg.saturation is not None else
             "at the bound of a bounded activation ending the layer (ReLU6, Hardtanh, Sigmoid, Tanh); "
             + (", ".join(f"{c.key}: {_bounds_text(c)}" for c in self.calls if c.low is not None or c.high is not None)
                or "none of these layers has one")),
            ("histogram", f"{len(self.edges) - 1} fixed bins, log-spaced over ±[{cfg.hist_min:g}, {cfg.hist_max:g}]"
                          + (f"; at most {cfg.hist_sample} values of each image per layer (every k-th value at "
                             f"fixed positions: " + ", ".join(f"{c.key} k={c.hist_stride}" for c in self.calls) + ")"
                             if any(c.hist_stride > 1 for c in self.calls) else "; every value")),
            ("crops shown for", "channels " + str(list(cfg.channels)) if cfg.channels is not None else
             f"the {cfg.channels_per_layer} highest-mean channels over the folder's first images (per channel top "
             f"{cfg.top_k} of every channel in results/topk.json)"),
        ]
        if self.embed_key:
            how = {"flat": "its output", "first": "its first (class) token", "mean_hw": "its spatial mean",
                   "mean_tokens": "its mean over tokens", "pool": "its output averaged over positions",
                   "output": f"the backbone's embedding ({self.ctx.loaded.pooling or 'its pooled output'})"}
            facts.append(("embedding features", f"{self.embed_key}: {how[self.embed_recipe]}"
                                                + (" (the input of the last nn.Linear)"
                                                   if self.embed_recipe not in ("pool", "output") else "")))
        for note in self.notes:
            facts.append(("not analysed", note))
        return facts

    def _alerts(self, section: Section, dead: Dict[str, int], nonfinite: Dict[str, int]) -> None:
        broken = [f"{k}: {n} NaN/Inf values in {int((self.stats[k].nonfinite > 0).sum())} channels"
                  for k, n in nonfinite.items() if n]
        if broken:
            section.alerts.append(Alert("error", f"{len(broken)} layer outputs contain NaN or Inf (left out of the "
                                                 f"statistics)", details=broken))
        many = [f"{c.key}: {dead[c.key]} of {c.channels} channels dead ({dead[c.key] / c.channels:.0%})"
                for c in self.calls if c.channels and dead[c.key] / c.channels > float(self.cfg.dead_alert)]
        if many:
            section.alerts.append(Alert("warning", f"{len(many)} layers have more than {self.cfg.dead_alert:.0%} "
                                                   f"dead channels (>= {self.cfg.dead_zero_fraction:.0%} of values "
                                                   f"exactly 0)", details=many))
        if self.missing:
            section.alerts.append(Alert("info", "Some layer calls were missing in some batches (data-dependent "
                                                "control flow?); their statistics cover fewer images",
                                        details=[f"{k}: missing in {n} batches" for k, n in self.missing.items()]))
        if self.notes:
            section.alerts.append(Alert("info", "Some selected layers could not be analysed", details=self.notes))

    def _layer_table(self, dead: Dict[str, int], nonfinite: Dict[str, int]) -> Table:
        rows = []
        for call in self.calls:
            stats = self.stats[call.key]
            mean, std = stats.pooled()
            finite = stats.count > 0
            values = max(int(stats.values.sum()), 1)
            rows.append([call.key, "×".join(str(d) for d in call.shape), call.channels, _round(mean), _round(std),
                         _round(float(stats.min[finite].min())) if finite.any() else "",
                         _round(float(stats.max[finite].max())) if finite.any() else "",
                         round(float(stats.zeros.sum()) / values, 4), dead[call.key],
                         round(float(stats.saturated.sum()) / values, 4) if call.low is not None
                         or call.high is not None else "", nonfinite[call.key]])
        return Table(["layer", "output", "channels", "mean", "std", "min", "max", "frac zero", "dead channels",
                      "frac saturated", "NaN/Inf"], rows,
                     caption="Per layer over the folder (per channel: results/activation_stats.csv)")

    def _maps_figure(self, call: LayerCall, dpi: int, image_format: str):
        rows = []
        for _, index, item in sorted((e for heap in self.gallery for e in heap.items()), key=lambda e: e[1]):
            if call.key not in item["maps"]:
                continue
            channels, maps, mean_map = item["maps"][call.key]
            rows.append((item["path"], item["thumb"], heat_on_thumbnail(item["thumb"], mean_map), maps, channels))
        if not rows:
            return None
        h, w = call.grid
        which = "images spread over the folder" if self.cfg.spread else "the first images of the folder"
        return plots.activation_rows(
            rows, name=f"maps_{call.key}", dpi=dpi, image_format=image_format,
            title=f"{call.key} · {call.channels} channels · {h}×{w} map",
            caption=f"Feature maps of {call.key} for {which}: the mean over all channels laid over each image "
                    f"(min-max per image), and the image's strongest channels, all on one colour scale")

    def _crops_figure(self, call: LayerCall, dpi: int, image_format: str):
        stats = self.stats[call.key]
        tiles, labels = [], []
        for channel in self.shown[call.key]:
            row = []
            for score, _, item in self.crops[call.key][channel].items():
                crop, marker = shrink_crop(item["region"], item["centre"])
                row.append((crop, f"{score:.4g}\n{_tail(item['path'])}", marker))
            tiles.append(row)
            labels.append(f"ch {channel} · mean {stats.mean[channel]:.3g}")
        where = "crop around the maximum (ring)" if call.grid else "whole image (no spatial map)"
        return plots.crop_grid(tiles, labels, name=f"top_{call.key}", dpi=dpi, image_format=image_format,
                               title=f"{call.key} · top-activating images",
                               caption=f"{call.key}: for each channel, the {self.cfg.top_k} images with the highest "
                                       f"spatial maximum over the folder, best first, {where}; value and file under "
                                       f"each")

    def _finish_embedding(self):
        if self.store is None:
            return None
        store = self.store
        extra: Dict[str, Any] = {"layer": np.array(self.embed_key or "")}
        figure = None
        if self.moments.count >= 2:
            mean, components, variance, ratio = self.moments.pca(2)
            points = np.empty((store.count, components.shape[0]), dtype=np.float32)
            for first in range(0, store.count, COPY_ROWS):
                chunk = store.read("features", first, first + COPY_ROWS).astype(np.float64)  # (n, D)
                points[first:first + len(chunk)] = (chunk - mean) @ components.T
            extra.update(features_2d=points, explained_variance=variance, explained_variance_ratio=ratio,
                         components=components, mean=mean)
            labels = store.read("labels", 0, store.count)
            predicted = store.read("predicted", 0, store.count)
            by_label = bool((labels >= 0).any())
            names = (list(self.ctx.dataset_classes) if by_label
                     else display_names(self.ctx.loaded.class_names, int(predicted.max()) + 1 if len(predicted) else 0))
            if points.shape[1] == 2:
                figure = plots.embedding_scatter(
                    points, labels if by_label else predicted, names, name="embedding",
                    xlabel=f"PC1 ({ratio[0]:.1%} of variance)", ylabel=f"PC2 ({ratio[1]:.1%} of variance)",
                    legend_title="folder class" if by_label else "predicted", dpi=int(self.ctx.report.figure_dpi),
                    caption=(f"The model's embedding ({self.ctx.loaded.pooling or 'its pooled output'}, "
                             if self.embed_key == MODEL_OUTPUT else f"Penultimate features ({self.embed_key}, ")
                            + f"{components.shape[1]}-d) of every image, "
                            f"PCA to 2-D, coloured by {'folder class' if by_label else 'predicted class'}")
        store.pack(self.ctx.results_dir / "embeddings.npz", **extra)
        self.store = None
        return figure

    def _write_stats_csv(self) -> None:
        with open(self.ctx.results_dir / "activation_stats.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS)
            for call in self.calls:
                s = self.stats[call.key]
                std, frac_zero, frac_sat = s.std, s.frac_zero, s.frac_saturated
                bounded = call.low is not None or call.high is not None
                for c in range(call.channels):
                    finite = s.count[c] > 0
                    writer.writerow([call.key, c, int(s.count[c]), repr(float(s.mean[c])) if finite else "",
                                     repr(float(std[c])) if finite else "", repr(float(s.max[c])) if finite else "",
                                     repr(float(frac_zero[c])), repr(float(s.min[c])) if finite else "",
                                     repr(float(frac_sat[c])) if bounded else "", int(s.nonfinite[c])])

    def _write_topk_json(self) -> None:
        out: Dict[str, Dict[str, list]] = {}
        for call in self.calls:
            top = self.topk[call.key]
            layer: Dict[str, list] = {}
            for channel in range(call.channels):
                entries = []
                for score, _, extra in top.items(channel):
                    entry: Dict[str, Any] = {"path": str(extra["path"]), "value": score}
                    if call.grid is not None:
                        entry["y"], entry["x"] = divmod(int(extra["position"]), call.grid[1])
                    entries.append(entry)
                layer[str(channel)] = entries
            out[call.key] = layer
        with open(self.ctx.results_dir / "topk.json", "w", encoding="utf-8") as handle:
            json.dump(out, handle)


def _bounds_text(call: LayerCall) -> str:
    parts = ([f"<= {call.low:g}"] if call.low is not None else []) + ([f">= {call.high:g}"]
                                                                      if call.high is not None else [])
    return " or ".join(parts)


def _round(value: float) -> Any:
    return float(f"{value:.4g}") if math.isfinite(value) else ""


def _tail(path: str, limit: int = 18) -> str:
    name = str(path).rsplit("/", 1)[-1]
    return name if len(name) <= limit else "…" + name[-(limit - 1):]
