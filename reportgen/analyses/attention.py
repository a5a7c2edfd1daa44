"""`attention`: where a transformer's attention goes, for every image of the folder, inside the one pass.

Which modules have attention is found by behaviour on a one-image probe (`reportgen.engine.capture.find_attention`):
a module whose own forward calls softmax over an axis of >= 4 entries of a >= 3-D tensor, or
scaled_dot_product_attention (not the 2-way softmax of SK / ResNeSt branches, not a classifier's (B, K)), plus the
modules the engine knows by type. The section says "no attention layers" only when there is none; every attention
module is either shown or named in one "Not supported: <type> (<reason>)" line per module type.

How the weights are read:
- captured by the engine as (B, heads, N, M): `nn.MultiheadAttention` (per-head weights forced on), timm attention
  with `fused_attn` (non-fused path), transformers attention (eager), and any other module found on the probe: the
  output of its one softmax over (B, heads, N, M) (LeViT, EfficientFormer, CaiT's talking heads...), the weights
  recomputed exactly from the arguments of its scaled_dot_product_attention call (the fused call still computes the
  output), or its `attn_drop` input where several softmaxes are combined (ConViT's gated GPSA). Tokens are laid out
  on the grid of the module's own call (a (B, C, h, w) or (B, h, w, C) input, or the (h, w) it is given), else by
  the model's own patch embedding and prefix-token count (`reportgen.engine.tensors.token_layout_of`), else on a
  grid of the image's aspect ratio without prefix tokens (a class token is never guessed). Keys fewer than the
  queries (spatial reduction: PVT, Twins GSA, NextViT) lie on their own coarser grid, queries fewer than the keys
  (LeViT's subsampling) on theirs. With a class token a layer's map is the class token's attention to each patch;
  a layer with one query (class attention: CaiT, XCiT, VOLO, CrossViT) maps that row (it has no query position, so
  no attention distance); otherwise the attention each key patch receives, summed over the patch queries (1 is its
  fair share under uniform attention). Attention rollout (Abnar & Zuidema 2020) runs over every captured
  self-attention layer of the model with the first layer's token count, in call order (all captured, even those
  not shown), batched with bmm, over all tokens (prefix tokens included: they carry attention between layers); the
  map is the class token's row over the patches, or the mean patch row.
- Swin window attention of timm (v1, v2, v2-cr) and transformers, captured the same way as (B * windows, heads, T,
  T) and put back on the token grid with the block's window, shift and padding (`WindowLayout`; timm shifts before
  padding, transformers after). Maps as for torchvision Swin below.
- torchvision Swin's `ShiftedWindowAttention` (v1, v2): its probabilities never leave `shifted_window_attention`, so
  the block's `norm1` output (the attention's input, found and checked on a one-image probe) is captured and the
  probabilities are recomputed exactly (`reportgen.analyses._attention_math.swin_window_attention`). Its map is the
  attention each patch receives from the queries of its own (shifted) window, summed over them (1 = its fair share,
  whatever the size of the region the shift mask leaves it) and averaged over heads.
  There is no class token and no rollout (windows and patch merging change the token grid between stages).
- not supported, with the reason: weights whose first axis is not the images (windows outside a Swin block, blocks,
  MobileViT's patches folded into the batch axis), attention over channels ((B, heads, d, d) with heads * d the
  input's channels: XCiT's XCA, EdgeNeXt, DaViT), 3-D or 5-D scores (heads folded into the batch axis, NesT's
  blocks, VOLO's outlook attention), softmax over another axis than the keys (CoaT's factorized, lambda and linear
  attention), and tokens that form no patch grid of the input.

Dataset statistics stream and merge exactly: per layer and head, the mean entropy of the query rows (nats, ln S for
a uniform row over S keys) and the mean attention distance (input pixels between the centres of query and key
patches, each on its own grid, weighted by attention renormalised over patch keys), both averaged over queries and
images.

`results/attention.npz` (raw values, not normalised): `paths` (N,); `rollout` (N, gh, gw) when rollout ran; per
shown layer `cls_<layer>` (N, gh, gw) head-averaged class-token maps, or `received_<layer>` for layers without a
class token (Swin), `<layer>` being the call key with every non-alphanumeric run replaced by `_`; `layers` (L,)
call keys, `heads` (L,), `keys` (L,) keys per query row, `entropy` and `distance` (L, max heads; NaN past a layer's
heads). Per-image maps stream to disk during the pass, so memory does not grow with the folder.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reportgen.analyses._attention_math import (WindowLayout, centre_window, grid_distances, is_swin_attention,
                                                mean_distance, patch_grid, rollout, row_entropy,
                                                swin_window_attention, window_layout, windows_to_grid)
from reportgen.analyses.base import Analysis, Batch, Requirements, RunContext, register
from reportgen.engine.capture import ProbedAttention, attention_kind, find_attention, probe_forward
from reportgen.engine.layers import named_modules, select_layers
from reportgen.engine.tensors import TokenLayout, token_layout_of
from reportgen.errors import ConfigError
from reportgen.inputs.labels import display_names
from reportgen.report import plots
from reportgen.report.elements import Alert, Gallery, GalleryItem, KeyValues, Section, Table, Text
from reportgen.report.overlays import HEATMAP_ALPHA, HEATMAP_CMAP, heat_on_thumbnail
from reportgen.report.thumbnails import thumbnail
from reportgen.state.reducers import BoundedTop
from reportgen.state.run_state import allow_in_state
from reportgen.state.streams import RowStore, absorb_rows

DEFAULT_MAX_HEADS = 16  # heads drawn per layer when `heads` is null, so 24-head layers stay readable


@dataclass
class AttentionConfig:
    layers: Optional[List[str]] = None  # attention modules shown (name, glob, re:, type:, depth: patterns, checked
    # against the attention found on the probe); null: every attention module of the model
    n_images: int = 8  # first images of the folder drawn with their maps (the npz has every image)
    heads: Optional[List[int]] = None  # head indices drawn in the per-head figures (null: the first 16; []: none)
    rollout: bool = True  # attention rollout over every self-attention layer (all captured, even those not shown)
    discard_ratio: float = 0.0  # fraction of each layer's lowest head-averaged weights zeroed before rollout
    # (vit-explain's option, sharper maps); 0 is Abnar & Zuidema as published
    matrix: bool = True  # token x token heatmap of the first image per shown layer (Swin: the central window)


@dataclass
class LayerInfo:
    """What one shown layer call turned out to be on the first batch."""

    key: str  # call key (`encoder.layers.encoder_layer_0.self_attention`, `blocks.0.attn#2`)
    kind: str  # mha | swin
    heads: int
    keys: int  # keys per query row (N for ViT, tokens per window for Swin)
    grid: Optional[Tuple[int, int]]  # (gh, gw) of the map, None when the tokens form no patch grid
    class_token: bool  # map is the class token's row (else attention received, summed over queries)
    prefix: int = 0  # class, distillation and register tokens before the patches (left out of every map)
    queries: Optional[Tuple[int, int]] = None  # the queries' patch grid where it differs from the keys' (`grid`):
    # spatial-reduction attention (PVT, Twins GSA) puts its keys on a coarser grid

    @property
    def field(self) -> str:
        """Its array name in attention.npz: `cls_<key>` or `received_<key>`, non-alphanumeric runs as `_`."""
        return ("cls_" if self.class_token else "received_") + re.sub(r"[^0-9A-Za-z]+", "_", self.key).strip("_")


allow_in_state(LayerInfo)  # part of the saved state (checkpoints, shards)


def unsupported_reason(record: ProbedAttention) -> str:
    """Why the engine cannot capture a module's attention, from what its forward did on the probe."""
    if record.sdpa:
        return (f"scaled_dot_product_attention on {len(record.sdpa[0])}-D queries {record.sdpa[0]}, not "
                f"(images, heads, tokens, channels)")
    shapes = sorted({shape for shape, _ in record.softmax})
    if len(record.softmax) > record.calls:
        return f"{len(record.softmax) // max(record.calls, 1)} softmaxes per call ({shapes}): no single weight matrix"
    shape, axis = record.softmax[0]
    if axis != len(shape) - 1:
        return (f"softmax over axis {axis} of {shape}, not over the keys of each query (keys normalised over "
                f"tokens: factorized or linear attention)")
    return f"softmax over {len(shape)}-D scores {shape}, not (images, heads, queries, keys)"


def is_windowed(name: str, modules: Dict[str, nn.Module]) -> bool:
    """A captured attention module inside a Swin block (its parent has a window size and a cyclic shift)."""
    parent = modules.get(name.rsplit(".", 1)[0]) if "." in name else None
    return parent is not None and hasattr(parent, "window_size") and hasattr(parent, "shift_size")


def short_names(names: List[str]) -> List[str]:
    """Names without the dotted components all of them share at the start and end (`encoder.layers.X.self_attention`
    -> `X`), so figure labels stay short; a single name is kept whole."""
    if len(names) < 2:
        return list(names)
    parts = [n.split(".") for n in names]
    lead = 0
    while all(len(p) > lead + 1 for p in parts) and len({p[lead] for p in parts}) == 1:
        lead += 1
    tail = 0
    while all(len(p) > lead + tail + 1 for p in parts) and len({p[-1 - tail] for p in parts}) == 1:
        tail += 1
    return [".".join(p[lead: len(p) - tail]) for p in parts]


def fit_tile(thumb: np.ndarray, columns: int, largest: int, width: int = 1000) -> np.ndarray:
    """The thumbnail resized so a figure row of `columns` tiles fits the page's ~1000 px content width at one
    figure pixel per screen pixel (labels stay legible): at least 48 px, at most `largest` (small inputs such as
    the 64 px demo are enlarged, bilinearly, up to that)."""
    side = min(largest, max(48, (width - 160) // max(columns, 1) - 4))
    longest = max(thumb.shape[:2])
    if longest == side:
        return thumb
    scale = side / longest
    size = (max(1, round(thumb.shape[0] * scale)), max(1, round(thumb.shape[1] * scale)))
    image = torch.from_numpy(thumb).permute(2, 0, 1)[None].float()  # (1, 3, h, w)
    resized = F.interpolate(image, size=size, mode="bilinear", antialias=scale < 1, align_corners=False)
    return resized[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()  # (h, w, 3)


def chain_tokens(keys: List[str], captures: Any) -> str:
    """The distinct key counts of these captured attention calls, e.g. "49/16"."""
    return "/".join(str(n) for n in sorted({int(captures.attention[k].shape[-1]) for k in keys}, reverse=True))


def tile_columns(layers: int, heads: int, rollout: bool) -> int:
    """Columns of the widest overlay figure (by layer: input, layers, rollout; per head: mean, heads), so every
    figure uses one tile size."""
    return max(layers + 1 + int(rollout), heads + 1)


@register("attention")
class Attention(Analysis):
    Config = AttentionConfig
    title = "Attention"
    layer_option = "analysis.attention.layers"

    def __init__(self, cfg: Any, ctx: RunContext):
        super().__init__(cfg, ctx)
        if int(cfg.n_images) < 0:
            raise ConfigError("analysis.attention.n_images", cfg.n_images, "an integer >= 0")
        if not 0.0 <= float(cfg.discard_ratio) < 1.0:
            raise ConfigError("analysis.attention.discard_ratio", cfg.discard_ratio, "a fraction in [0, 1)")
        if cfg.heads is not None and any(int(h) < 0 for h in cfg.heads):
            raise ConfigError("analysis.attention.heads", list(cfg.heads), "head indices >= 0")
        self.modules = named_modules(ctx.model)
        self.probed: Dict[str, ProbedAttention] = {}  # what each attention module did on the probe (`begin`)
        self.shown_mha: List[str] = []  # captured per image: global, spatial-reduction and class attention
        self.shown_windows: List[str] = []  # timm / transformers Swin (captured per window)
        self.shown_swin: List[str] = []  # torchvision Swin (recomputed)
        self.rollout_mha: List[str] = []
        self.unsupported: Dict[str, Dict[str, Any]] = {}  # module type -> {reason, modules} (one line per type)
        self.window_layouts: Dict[str, WindowLayout] = {}  # windowed module -> its layout (from a probe)
        self.swin_inputs: Dict[str, str] = {}  # Swin attention module -> module whose output is its input
        self.layers: Dict[str, LayerInfo] = {}  # call key -> info, in call order (fixed on the first batch)
        self.stats: Dict[str, Dict[str, Any]] = {}  # call key -> {entropy, distance: (heads,) sums, images}
        self.rollout_info: Optional[Dict[str, Any]] = None  # {layers, tokens, grid, class_token} once it ran
        self.notes: List[str] = []
        self._distance_cache: Dict[tuple, torch.Tensor] = {}
        self._pending: Dict[str, torch.Tensor] = {}  # call key -> (2, heads) entropy/distance sums on the device
        self._pending_images: Dict[str, int] = {}
        self.images = 0
        self.store: Optional[RowStore] = None
        self.first = BoundedTop(int(cfg.n_images))  # the first images, by file index, with their maps
        self.matrix = BoundedTop(1 if cfg.matrix else 0)  # the first image's token x token matrices

    @property
    def applicable(self) -> bool:
        return bool(self.shown_mha or self.shown_swin or self.shown_windows)

    def begin(self, example: Batch) -> None:
        self._select(example.inputs[:1])
        if self.shown_windows:
            self.window_layouts = self._find_window_layouts(example.inputs[:1])
        if self.shown_swin:
            self.swin_inputs = self._find_swin_inputs(example.inputs[:1])
            for name in self.shown_swin:
                if name not in self.swin_inputs:
                    self._unsupported(name, "its input is not the output of any module, so its attention could "
                                            "not be recomputed")

    def _select(self, example: torch.Tensor) -> None:
        """Find the attention modules by behaviour on a one-image probe (`find_attention`), plus the ones the
        engine knows by type, then sort the shown ones by how their weights are read; the rest are named with a
        reason (`unsupported`)."""
        self.probed = find_attention(self.ctx.model, example)
        modules = self.modules
        attention = [n for n, m in modules.items()
                     if n in self.probed or attention_kind(m) is not None or is_swin_attention(m)]
        if self.cfg.layers is None:
            shown = attention
        else:
            found = set(attention)
            shown = select_layers(self.ctx.model, list(self.cfg.layers), "analysis.attention.layers",
                                  where=lambda name, module: name in found)
        self.shown_swin = [n for n in shown if is_swin_attention(modules[n])]
        captured = [n for n in shown if attention_kind(modules[n]) is not None and n not in self.shown_swin]
        self.shown_mha = [n for n in captured if not is_windowed(n, modules)]
        self.shown_windows = [n for n in captured if is_windowed(n, modules)]
        for name in shown:
            if name not in captured and name not in self.shown_swin:
                self._unsupported(name, unsupported_reason(self.probed[name]))
        whole = [n for n in attention if attention_kind(modules[n]) is not None and not is_windowed(n, modules)
                 and n not in self.shown_swin]  # global attention the engine captures
        if self.cfg.rollout and whole and len(whole) < len(attention):  # a rollout multiplies every layer
            self.notes.append(f"rollout: not computed: {len(attention) - len(whole)} of the {len(attention)} "
                              f"attention modules are windowed or not supported, and a rollout over the others "
                              f"would not be the model's")
        self.rollout_mha = whole if self.cfg.rollout and len(whole) == len(attention) else []

    def _unsupported(self, name: str, reason: str) -> None:
        """Name a module whose attention is not shown, under its type's first reason (one report line per type)."""
        entry = self.unsupported.setdefault(type(self.modules[name]).__name__, {"reason": reason, "modules": []})
        if name not in entry["modules"]:
            entry["modules"].append(name)

    def _find_swin_inputs(self, example: torch.Tensor) -> Dict[str, str]:
        """For each shown Swin attention module, a module whose output object is the attention's input, found on a
        one-image probe forward (v1: the block's `norm1`; v2 normalises after attention, so the previous block or
        the stage's patch embedding); the analysis captures that output and recomputes the attention from it."""
        inputs: Dict[str, torch.Tensor] = {}
        outputs: List[Tuple[str, Any]] = []  # (module name, output) in the order forwards finished
        shown = set(self.shown_swin)

        def attention_input(key: str, name: str, module: nn.Module, args: Any) -> None:
            if name in shown:
                inputs.setdefault(name, args[0])

        def output(key: str, name: str, module: nn.Module, args: Any, out: Any) -> None:
            outputs.append((name, out))

        probe_forward(self.ctx.model, example, on_start=attention_input, on_end=output)
        found = {}
        for name, tensor in inputs.items():
            block = name.rsplit(".", 1)[0] + "." if "." in name else ""
            match = [other for other, output in outputs if output is tensor and other != name
                     and not other.startswith(name + ".")]
            siblings = [other for other in match if other.startswith(block)]
            if match:
                found[name] = (siblings or match)[-1]
        return found

    def _find_window_layouts(self, example: torch.Tensor) -> Dict[str, WindowLayout]:
        """Each windowed attention module's layout, from its Swin block on a one-image probe: the block's input grid
        (timm: its (1, H, W, C) input; transformers: the `input_dimensions` it is given), then its window and shift
        as the block set them for that input."""
        parents = {name.rsplit(".", 1)[0]: name for name in self.shown_windows}
        grids: Dict[str, Tuple[int, int]] = {}
        height, width = example.shape[-2:]

        def block_input(key: str, name: str, module: nn.Module, args: Any) -> None:
            if name in parents and name not in grids and args and isinstance(args[0], torch.Tensor):
                if args[0].dim() == 4:  # timm: (B, H, W, C)
                    grids[name] = (int(args[0].shape[1]), int(args[0].shape[2]))
                elif len(args) > 1 and isinstance(args[1], (tuple, list)):  # transformers: (B, H*W, C), (H, W)
                    grids[name] = (int(args[1][0]), int(args[1][1]))
                elif args[0].dim() == 3:
                    grids[name] = patch_grid(int(args[0].shape[1]), height, width)

        probe_forward(self.ctx.model, example, on_start=block_input, modules=list(parents))
        layouts = {}
        for parent, name in parents.items():
            block = self.modules[parent]
            if grids.get(parent) is None:
                self._unsupported(name, "the token grid of its block's input could not be read, so its windows "
                                        "cannot be placed on the image")
                continue
            window, shift = block.window_size, block.shift_size
            window = tuple(int(w) for w in (window if isinstance(window, (tuple, list)) else (window, window)))
            shift = tuple(int(s) for s in (shift if isinstance(shift, (tuple, list)) else (shift, shift)))
            layouts[name] = window_layout(*grids[parent], window, shift,
                                          shift_first=type(block).__module__.startswith("timm."))
        return layouts

    def _layout(self, name: str, tokens: int, height: int, width: int) -> Optional[TokenLayout]:
        """Prefix tokens and patch grid of a `tokens`-long sequence in module `name`: the grid of its own call on
        the probe (a (B, C, h, w) or (B, h, w, C) input, or an (h, w) it is given), else the model's own layout
        (`token_layout_of`), else a grid of the image's aspect ratio without prefix tokens (a class token is never
        guessed)."""
        record = self.probed.get(name)
        if record is not None:
            shape = record.input_shape
            sides = [(shape[2], shape[3]), (shape[1], shape[2])] if len(shape) == 4 else []
            for rows, columns in sides + record.sizes:
                if rows * columns == tokens:
                    return TokenLayout(0, (rows, columns), False)
        known = token_layout_of(self.ctx.model, tokens, height, width)
        if known is not None:
            return known
        grid = patch_grid(tokens, height, width)
        return None if grid is None else TokenLayout(0, grid, False)

    def _key_layout(self, name: str, queries: Optional[TokenLayout], keys: int, height: int,
                    width: int) -> Optional[TokenLayout]:
        """The keys' layout: the queries' when they are the same tokens; for one query (class attention: CaiT,
        XCiT, CrossViT; the query is token 0 of the keys) the keys' own, else the query token then a patch grid;
        for spatial reduction (or the reverse, LeViT's subsampled queries) the same prefix tokens, then a grid of
        the queries' aspect ratio."""
        if queries is None:
            layout = self._layout(name, keys, height, width)
            grid = patch_grid(keys - 1, height, width) if layout is None and keys > 1 else None
            return layout if grid is None else TokenLayout(1, grid, True)
        if queries.prefix + queries.patches == keys:
            return queries
        grid = patch_grid(keys - queries.prefix, *queries.grid) if keys > queries.prefix else None
        return None if grid is None else TokenLayout(queries.prefix, grid, False)

    def _channel_attention(self, name: str, weights: torch.Tensor) -> bool:
        """Whether (B, heads, d, d) weights are over the channels of each head (XCiT's XCA, EdgeNeXt, DaViT's
        channel attention): heads * d is the module input's channel count."""
        record = self.probed.get(name)
        queries, keys = weights.shape[-2:]
        channels = record.input_shape[-1:] + record.input_shape[1:2] if record and record.input_shape else ()
        return queries == keys and weights.shape[1] * queries in channels

    def _read_tokens(self, key: str, weights: torch.Tensor, size: int, height: int, width: int) -> Optional[Any]:
        """(query layout or None, key layout) of one call's (B, heads, N, M) weights, or the reason they cannot be
        laid out on the image (a string)."""
        name = key.split("#")[0]
        if weights.dim() != 4:
            return f"{weights.dim()}-D weights {tuple(weights.shape)}, not (images, heads, queries, keys)"
        if weights.shape[0] != size:
            return (f"the first axis of its weights {tuple(weights.shape)} is not the {size} images (windows, "
                    f"blocks or patches folded into the batch axis)")
        if self._channel_attention(name, weights):
            return f"attention over channels, {tuple(weights.shape[1:])}: no token map"
        tokens, keys = weights.shape[-2:]
        queries = self._layout(name, tokens, height, width) if tokens > 1 else None
        if tokens > 1 and queries is None:
            return f"{tokens} query tokens form no patch grid of the {height}x{width} input"
        layout = self._key_layout(name, queries, keys, height, width)
        if layout is None:
            return f"{keys} keys form no patch grid of the {height}x{width} input"
        return queries, layout

    def _layer_maps(self, weights: torch.Tensor, queries: Optional[TokenLayout], keys: TokenLayout, height: int,
                    width: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(entropy, distance) (B, heads) means over the query rows, and (B, heads, kh, kw) maps on the keys' grid:
        the class token's row (global attention with a class token, or class attention with one query), else the
        attention each key patch receives summed over the patch queries, scaled so 1 is its fair share. Distance
        is between query and key patch centres in input pixels (each on its own grid), NaN for a class query."""
        size, heads = weights.shape[:2]
        entropy = row_entropy(weights).mean(dim=-1)  # (B, heads)
        first = keys.prefix
        if queries is None or (queries is keys and keys.class_token):
            rows = weights[:, :, 0, first:]  # (B, heads, P)
        else:
            patches = weights[:, :, queries.prefix:, first:]  # (B, heads, Q, P)
            rows = patches.sum(dim=-2) * (keys.patches / queries.patches)  # (B, heads, P)
        if queries is None:
            distance = torch.full_like(entropy, float("nan"))
        else:
            cells = self._distances(queries.grid, keys.grid, height, width, weights.device)  # (Q, P)
            distance = mean_distance(weights[:, :, queries.prefix:, first:], cells).mean(dim=-1)  # (B, heads)
        return entropy, distance, rows.reshape(size, heads, *keys.grid)

    def requires(self) -> Requirements:
        return Requirements(attention=sorted(set(self.shown_mha + self.rollout_mha + list(self.window_layouts))),
                            activations=sorted(set(self.swin_inputs.values())))

    def update(self, batch: Batch, outputs: Any, captures: Any) -> None:
        if not self.applicable:
            return
        with torch.no_grad():
            self._update(batch, outputs.logits, captures)

    def _update(self, batch: Batch, logits: Optional[torch.Tensor], captures: Any) -> None:
        size = len(batch.paths)
        height, width = batch.inputs.shape[-2:]
        per_head: Dict[str, torch.Tensor] = {}  # call key -> (B, heads, gh, gw) maps
        matrices: Dict[str, torch.Tensor] = {}  # call key -> (B, T, T) head-averaged token x token attention
        first_batch = self.images == 0  # layers, fields and notes are fixed on the first batch
        if first_batch:  # modules that gave no weights (e.g. transformers < 5 returns none unless asked)
            for key, note in captures.notes.items():
                if key.startswith("attention:"):
                    self._unsupported(key.split(":", 1)[1], note)
        for key, weights in captures.attention.items():  # call order
            if key.split("#")[0] not in self.shown_mha or (not first_batch and key not in self.layers):
                continue
            found = self._read_tokens(key, weights, size, height, width)
            if isinstance(found, str):
                if first_batch:
                    self._unsupported(key.split("#")[0], found)
                continue
            queries, layout = found
            weights = weights.float()  # (B, heads, N, M)
            entropy, distance, per_head[key] = self._layer_maps(weights, queries, layout, height, width)
            matrices[key] = weights.mean(dim=1)  # (B, N, M), reused by the rollout
            if first_batch:
                self.layers[key] = LayerInfo(key, "mha", weights.shape[1], weights.shape[-1], layout.grid,
                                             queries is None or (queries is layout and layout.class_token),
                                             layout.prefix, None if queries is layout or queries is None
                                             else queries.grid)
            self._add_stats(key, entropy, distance)
        for key, probs, layout in self._window_attention(captures, size, first_batch):
            cells = self._distances(layout.window, layout.window, layout.window[0] * height / layout.height,
                                    layout.window[1] * width / layout.width, probs.device)  # (T, T)
            entropy = windows_to_grid(row_entropy(probs), layout).mean(dim=(-2, -1))  # (B, heads)
            distance = windows_to_grid(mean_distance(probs, cells), layout).mean(dim=(-2, -1))  # (B, heads)
            per_head[key] = windows_to_grid(probs.sum(dim=-2), layout)  # (B, heads, h, w) received
            matrices[key] = probs[:, centre_window(layout)].mean(dim=1)  # (B, T, T)
            if first_batch:
                self.layers[key] = LayerInfo(key, "swin", probs.shape[2], probs.shape[-1],
                                             (layout.height, layout.width), False)
            self._add_stats(key, entropy, distance)
        rolled = self._rollout(captures, matrices, size, height, width, first_batch) if self.rollout_mha else None
        self._stream(batch, per_head, rolled)
        self._keep_examples(batch, logits, per_head, matrices, rolled)
        self.images += size

    def _window_attention(self, captures: Any, size: int, first_batch: bool
                          ) -> List[Tuple[str, torch.Tensor, WindowLayout]]:
        """(call key, (B, windows, heads, T, T) probabilities, layout) of every shown Swin attention call:
        torchvision's recomputed from the captured attention input, timm's and transformers' as captured."""
        found = []
        for name in self.shown_swin:
            if name not in self.swin_inputs:
                continue
            for call, source in enumerate(captures.calls(self.swin_inputs[name]), start=1):
                key = name if call == 1 else f"{name}#{call}"
                if first_batch or key in self.layers:
                    found.append((key, *swin_window_attention(captures[source].detach().float(),
                                                              self.modules[name])))
        for key, weights in captures.attention.items():
            layout = self.window_layouts.get(key.split("#")[0])
            if layout is None or (not first_batch and key not in self.layers):
                continue
            windows = layout.windows[0] * layout.windows[1]
            tokens = layout.window[0] * layout.window[1]
            if weights.dim() != 4 or weights.shape[0] != size * windows or weights.shape[-1] != tokens:
                if first_batch:
                    self._unsupported(key.split("#")[0], f"window attention of shape {tuple(weights.shape)} does "
                                                         f"not match {size} images x {windows} windows of {tokens} "
                                                         f"tokens")
                continue
            found.append((key, weights.float().reshape(size, windows, *weights.shape[1:]), layout))  # (B, nW, h, T, T)
        return found

    def _distances(self, queries: Tuple[int, int], keys: Tuple[int, int], height: float, width: float,
                   device: torch.device) -> torch.Tensor:
        """(Q, P) distances in input pixels between the cell centres of a query grid and a key grid that both cover
        height x width pixels, computed once per pair of grids and device."""
        key = (queries, keys, height, width, str(device))
        if key not in self._distance_cache:
            self._distance_cache[key] = grid_distances(queries, keys, (height, width), device=device)
        return self._distance_cache[key]

    def _add_stats(self, key: str, entropy: torch.Tensor, distance: torch.Tensor) -> None:
        """Fold a batch's per-image (B, heads) means into running float64 sums kept on the device (no host sync
        per batch); `_flush` moves them into `stats`."""
        sums = torch.stack([entropy, distance]).double().sum(dim=1)  # (2, heads)
        pending = self._pending.get(key)
        self._pending[key] = sums if pending is None else pending + sums
        self._pending_images[key] = self._pending_images.get(key, 0) + int(entropy.shape[0])

    def _flush(self) -> None:
        """Device sums -> `stats` (numpy float64), so state_dict / merge / finalize see everything."""
        for key, sums in self._pending.items():
            values = sums.cpu().numpy()
            stats = self.stats.setdefault(key, {"entropy": 0.0, "distance": 0.0, "images": 0})
            stats["entropy"] = stats["entropy"] + values[0]
            stats["distance"] = stats["distance"] + values[1]
            stats["images"] += self._pending_images[key]
        self._pending.clear()
        self._pending_images.clear()

    def _rollout(self, captures: Any, averaged: Dict[str, torch.Tensor], size: int, height: int, width: int,
                 first_batch: bool) -> Optional[torch.Tensor]:
        """(B, gh, gw) rollout map: the class token's row over the patches, or, without a class token, the mean
        row (what mean-pooled outputs draw from each patch). None when no self-attention chain fits a grid."""
        chain = [(k, w) for k, w in captures.attention.items() if k.split("#")[0] in self.rollout_mha
                 and w.dim() == 4 and w.shape[0] == size and w.shape[-1] == w.shape[-2]
                 and not self._channel_attention(k.split("#")[0], w)]
        if not chain:
            return None
        tokens = chain[0][1].shape[-1]
        left_out = [k for k, w in chain if w.shape[-1] != tokens]
        layout = self._layout(chain[0][0].split("#")[0], tokens, height, width)
        if layout is None:
            if first_batch:
                self.notes.append(f"rollout: {tokens} tokens do not form a patch grid of the input; not computed")
            return None
        if left_out:  # patch merging or pooling between stages: no single token flow to multiply
            if first_batch:
                self.notes.append(f"rollout: not computed: the token count changes between attention layers "
                                  f"({tokens} in {chain[0][0]}, {chain_tokens(left_out, captures)} in "
                                  f"{', '.join(left_out[:3])}), so there is no one token flow to multiply")
            return None
        if first_batch:
            self.rollout_info = {"layers": [k for k, _ in chain], "tokens": tokens, "grid": layout.grid,
                                 "class_token": layout.class_token, "prefix": layout.prefix}
        layers = [averaged.get(k, w) for k, w in chain]  # head averages already taken for shown layers
        result = rollout(layers, float(self.cfg.discard_ratio))  # (B, N, N) over every token, prefix ones too
        first = layout.prefix
        row = result[:, 0, first:] if layout.class_token else result[:, first:, first:].mean(dim=1)  # (B, P)
        return row.reshape(size, *layout.grid)  # (B, gh, gw)

    def _stream(self, batch: Batch, per_head: Dict[str, torch.Tensor], rolled: Optional[torch.Tensor]) -> None:
        """Append this batch's head-averaged maps and rollout to the on-disk store (one device->host copy each)."""
        fields = {info.field: per_head[key].mean(dim=1) for key, info in self.layers.items()
                  if key in per_head}  # (B, gh, gw) each
        if rolled is not None:
            fields["rollout"] = rolled
        if not fields:
            return
        rows = {name: tensor.float().cpu().numpy() for name, tensor in fields.items()}
        if self.store is None:
            self.store = RowStore(self.ctx.results_dir / ".attention", self.ctx.row_capacity,
                                  {name: (array.shape[1:], np.float32) for name, array in rows.items()})
        self.store.append(batch.paths, **rows)

    def _keep_examples(self, batch: Batch, logits: Optional[torch.Tensor], per_head: Dict[str, torch.Tensor],
                       matrices: Dict[str, torch.Tensor], rolled: Optional[torch.Tensor]) -> None:
        """Maps, thumbnail and prediction of the images that enter the bounded example sets."""
        indices = batch.indices.tolist()
        if not any(self.first.accepts(-i, i) or (matrices and self.matrix.accepts(-i, i)) for i in indices):
            return  # the usual case after the first images: nothing leaves the device
        if logits is not None:
            probs = torch.softmax(logits.detach().float(), dim=1)  # (B, K)
            confidence, predicted = (t.cpu() for t in probs.max(dim=1))  # (B,) each
        else:  # not a classifier: no prediction to show beside the maps
            confidence, predicted = torch.full((len(indices),), float("nan")), torch.full((len(indices),), -1)
        for row, index in enumerate(indices):
            if self.first.accepts(-index, index):
                self.first.push(-index, index, {
                    "index": index, "path": batch.paths[row],
                    "thumb": thumbnail(batch.images[row], int(self.ctx.report.thumbnail_size)),
                    "predicted": int(predicted[row]), "confidence": float(confidence[row]),
                    "heads": {key: maps[row].cpu() for key, maps in per_head.items()},  # (heads, gh, gw)
                    "rollout": rolled[row].cpu() if rolled is not None else None})
            if matrices and self.matrix.accepts(-index, index):
                self.matrix.push(-index, index, {"path": batch.paths[row],
                                                 "matrices": {k: m[row].cpu().numpy() for k, m in matrices.items()}})

    def state_dict(self) -> Dict[str, Any]:
        self._flush()
        return {"layers": self.layers, "stats": self.stats, "rollout_info": self.rollout_info, "notes": self.notes,
                "unsupported": self.unsupported,
                "images": self.images, "first": self.first, "matrix": self.matrix,
                "store": self.store.ref() if self.store is not None else None}

    def merge(self, state: Dict[str, Any]) -> None:
        """Add another shard's sums and per-image maps (after this one's); layers must match (same model)."""
        self._flush()
        for key, info in state["layers"].items():
            self.layers.setdefault(key, info)
        for key, theirs in state["stats"].items():
            mine = self.stats.setdefault(key, {"entropy": 0.0, "distance": 0.0, "images": 0})
            for name in ("entropy", "distance", "images"):
                mine[name] = mine[name] + theirs[name]
        self.rollout_info = self.rollout_info or state["rollout_info"]
        self.notes.extend(n for n in state["notes"] if n not in self.notes)
        for type_name, entry in state["unsupported"].items():
            for name in entry["modules"]:
                self.unsupported.setdefault(type_name, {"reason": entry["reason"], "modules": []})
                if name not in self.unsupported[type_name]["modules"]:
                    self.unsupported[type_name]["modules"].append(name)
        self.images += state["images"]
        self.first.merge(state["first"])
        self.matrix.merge(state["matrix"])
        self.store = absorb_rows(self.store, state["store"], self.ctx.results_dir / ".attention",
                                 self.ctx.row_capacity)

    def layer_statistics(self) -> Tuple[List[str], np.ndarray, np.ndarray]:
        """(call keys, entropy, distance): (L, max heads) means over images, NaN past a layer's heads."""
        self._flush()
        keys = [k for k in self.layers if k in self.stats]
        width = max((self.layers[k].heads for k in keys), default=0)
        entropy = np.full((len(keys), width), np.nan)
        distance = np.full((len(keys), width), np.nan)
        for i, key in enumerate(keys):
            stats = self.stats[key]
            heads = self.layers[key].heads
            entropy[i, :heads] = stats["entropy"] / max(stats["images"], 1)
            distance[i, :heads] = stats["distance"] / max(stats["images"], 1)
        return keys, entropy, distance

    def finalize(self) -> Optional[Section]:
        section = Section(id="attention", title="Attention")
        keys, entropy, distance = self.layer_statistics()
        summary = {"layers": np.array(keys, dtype=str),
                   "heads": np.array([self.layers[k].heads for k in keys], dtype=np.int64),
                   "keys": np.array([self.layers[k].keys for k in keys], dtype=np.int64),
                   "entropy": entropy.astype(np.float32), "distance": distance.astype(np.float32)}
        if self.store is not None:
            self.store.pack(self.ctx.results_dir / "attention.npz", **summary)
            self.store = None
        elif keys:  # statistics only (no layer formed a patch grid)
            np.savez_compressed(self.ctx.results_dir / "attention.npz", **summary)
        unsupported = self._unsupported_lines()
        if not keys and not self.rollout_info:
            if unsupported:  # attention the engine cannot read is "not supported", never "no attention layers"
                section.summary = "not supported: " + ", ".join(self.unsupported)
                section.elements.extend(Text(line) for line in unsupported)
                return section
            if not self.applicable:
                section.summary = "not applicable: no attention layers"
                section.elements.append(Text(
                    f"Not applicable: no attention layers ({type(self.ctx.model).__name__}'s forward calls no "
                    f"softmax over a token axis and no scaled_dot_product_attention on the probe image, and it has "
                    f"no nn.MultiheadAttention, timm or transformers attention module or Swin window attention)."))
                return section
        section.elements.extend(Text(line) for line in unsupported)
        if not self.images:
            section.elements.append(Text("No image was processed, so there are no attention maps."))
            return section
        for note in self.notes:
            section.alerts.append(Alert("info", note))
        labels = dict(zip(keys, short_names(keys)))
        swin = any(info.kind == "swin" for info in self.layers.values())
        section.summary = self._summary(keys, swin)
        section.elements.append(KeyValues(self._facts(keys, swin)))
        examples = self._examples()
        section.elements.extend(self._overview_elements(examples, labels, swin))  # overview first,
        if keys:
            section.elements.extend(self._statistics_elements(keys, labels, entropy, distance))
        section.elements.extend(self._matrix_elements(labels, swin))
        section.elements.extend(self._head_figures(examples, swin))  # then the detail
        return section

    def _unsupported_lines(self) -> List[str]:
        """One "Not supported" line per module type whose attention is not shown, with the reason and its modules."""
        lines = []
        for type_name, entry in self.unsupported.items():
            names = entry["modules"]
            listed = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            lines.append(f"Not supported: {type_name} ({entry['reason']}); {len(names)} module"
                         f"{'s' if len(names) > 1 else ''} not shown: {listed}.")
        return lines

    def _summary(self, keys: List[str], swin: bool) -> str:
        heads = sorted({self.layers[k].heads for k in keys})
        text = (f"{len(keys)} attention layers ({'/'.join(map(str, heads))} heads) over {self.images} images"
                if keys else f"{self.images} images")
        if self.rollout_info:
            text += f"; rollout over {len(self.rollout_info['layers'])} layers"
        elif swin:
            text += "; Swin windowed attention (no class token, no rollout)"
        if self.unsupported:
            text += "; not supported: " + ", ".join(self.unsupported)
        return text

    def _facts(self, keys: List[str], swin: bool) -> List[Tuple[str, Any]]:
        facts: List[Tuple[str, Any]] = [("images", self.images), ("layers shown", len(keys))]
        grids = sorted({info.grid for info in self.layers.values() if info.grid}, reverse=True)
        if grids:
            facts.append(("token grids", ", ".join(f"{gh}×{gw}" for gh, gw in grids)))
        prefix = max((info.prefix for info in self.layers.values()), default=0)
        if prefix:
            facts.append(("prefix tokens", f"{prefix} (class / distillation / register tokens before the patches, "
                                           f"from the model's own layout): left out of every map and of the "
                                           f"attention distance, kept in the rollout"))
        if any(info.class_token for info in self.layers.values()):
            facts.append(("maps", "attention of the class token (token 0) to each patch, per head and averaged "
                                  "over heads"))
        elif swin:
            window = int(round(self.layers[next(k for k in keys if self.layers[k].kind == 'swin')].keys ** 0.5))
            source = ("recomputed from each block's attention input, equal to torchvision's own computation"
                      if self.shown_swin else "the softmax of each window attention module, as the library "
                                              "computes it (timm: non-fused path; transformers: eager attention)")
            facts.append(("maps", f"attention each patch receives from the queries of its {window}×{window} "
                                  f"(shifted) window, summed over them (1 = its fair share) and averaged over heads; "
                                  f"{source}"))
        elif keys:
            facts.append(("maps", "attention each patch receives, summed over all queries (no class token; 1 = its "
                                  "fair share)"))
        if self.rollout_info:
            what = "class-token row" if self.rollout_info["class_token"] else "mean row"
            ratio = float(self.cfg.discard_ratio)
            facts.append(("rollout", f"Abnar & Zuidema 2020 over {len(self.rollout_info['layers'])} layers: heads "
                                     f"averaged, identity added, rows renormalised, multiplied in call order; "
                                     f"{what} over the patches"
                                     + (f"; lowest {ratio:.0%} of weights discarded per layer" if ratio else "")))
        elif swin:
            facts.append(("rollout", "not computed: windows and patch merging change the token grid between "
                                     "stages, so per-layer matrices do not chain"))
        facts.append(("colour scale", f"each map min-max normalised per image to [0, 1], upsampled bilinearly, "
                                      f"colormap {HEATMAP_CMAP} at {HEATMAP_ALPHA:.0%} opacity (bright = more)"))
        facts.append(("results", "results/attention.npz: raw per-image maps of every image, entropy, distance"))
        return facts

    def _examples(self) -> List[Dict[str, Any]]:
        """The kept first images in file order, each with a `tile`: its thumbnail sized for the widest figure."""
        examples = sorted((item for _, _, item in self.first.items()), key=lambda item: item["index"])
        mapped = [k for k in self.layers if self.layers[k].grid is not None]
        if mapped:
            widest = tile_columns(len(mapped), len(self._heads_shown(max(self.layers[k].heads for k in mapped))),
                                  bool(self.rollout_info))
            for e in examples:
                e["tile"] = fit_tile(e["thumb"], widest, int(self.ctx.report.thumbnail_size))
        return examples

    def _what(self, swin: bool) -> str:
        return ("class-token attention" if not swin and any(i.class_token for i in self.layers.values())
                else "attention received")

    def _overview_elements(self, examples: List[Dict[str, Any]], labels: Dict[str, str], swin: bool) -> List[Any]:
        """The rollout gallery and one grid of every shown layer's head-averaged map over the first images."""
        if not examples:
            return []
        report = self.ctx.report
        dpi, image_format = int(report.figure_dpi), str(report.image_format)
        names = display_names(self.ctx.loaded.class_names, max(e["predicted"] for e in examples) + 1)
        elements: List[Any] = []
        if self.rollout_info:
            items = [GalleryItem(image=heat_on_thumbnail(e["thumb"], e["rollout"]), title=e["path"],
                                 lines=[f"predicted: {names[e['predicted']]} {e['confidence']:.1%}"]
                                 if e["predicted"] >= 0 else [])
                     for e in examples if e["rollout"] is not None]
            elements.append(Gallery(title="Attention rollout", items=items,
                                    note=f"the first {len(items)} images: how much each patch flows into the "
                                         f"{'class token' if self.rollout_info['class_token'] else 'tokens'} "
                                         f"through all {len(self.rollout_info['layers'])} layers"))
        mapped = [k for k in self.layers if self.layers[k].grid is not None]
        if mapped:
            columns = ["input"] + [labels.get(k, k) for k in mapped] + (["rollout"] if self.rollout_info else [])
            tiles = []
            for e in examples:
                row = [e["tile"]] + [heat_on_thumbnail(e["tile"], e["heads"][k].mean(dim=0)) if k in e["heads"]
                                     else None for k in mapped]
                if self.rollout_info:
                    row.append(heat_on_thumbnail(e["tile"], e["rollout"]) if e["rollout"] is not None else None)
                tiles.append(row)
            elements.append(plots.overlay_grid(
                tiles, [e["path"] for e in examples], columns, name="by_layer", cmap=HEATMAP_CMAP, dpi=dpi,
                image_format=image_format, colorbar_label="per-image normalised",
                caption=f"{self._what(swin).capitalize()} layer by layer, averaged over heads (columns: layers in "
                        f"call order{', then rollout' if self.rollout_info else ''}; rows: the first images)"))
        return elements

    def _matrix_elements(self, labels: Dict[str, str], swin: bool) -> List[Any]:
        """The seed's imshow(attention_weights): token x token attention of the first image, one panel per layer."""
        matrix = self.matrix.items()
        if not matrix or not self.cfg.matrix:
            return []
        item = matrix[0][2]
        shown = [k for k in self.layers if k in item["matrices"]]
        if not shown:
            return []
        prefix = max(self.layers[k].prefix for k in shown)
        token_note = ("the tokens of the window holding the image centre, row by row" if swin else
                      f"tokens 0-{prefix - 1} are the prefix tokens (class first), then the patches row by row"
                      if prefix > 1 else "token 0 is the class token, then the patches row by row" if prefix
                      else "patches row by row")
        return [plots.matrix_grid(
            [item["matrices"][k] for k in shown], [labels.get(k, k) for k in shown], name="token_matrix",
            dpi=int(self.ctx.report.figure_dpi), cmap="viridis", image_format=str(self.ctx.report.image_format),
            caption=f"Token × token attention of {item['path']}, averaged over heads (rows: queries, columns: keys; "
                    f"{token_note}); each layer on its own colour scale")]

    def _head_figures(self, examples: List[Dict[str, Any]], swin: bool) -> List[Any]:
        """One figure per shown layer: rows are the first images, columns the head average then each head."""
        figures = []
        report = self.ctx.report
        dpi, image_format = int(report.figure_dpi), str(report.image_format)
        mapped = [k for k in self.layers if self.layers[k].grid is not None]
        for number, key in enumerate(mapped):
            heads = self.layers[key].heads
            chosen = self._heads_shown(heads)
            if not chosen or not examples:
                continue
            tiles = []
            for e in examples:
                maps = e["heads"].get(key)
                if maps is None:
                    tiles.append([None] * (len(chosen) + 1))
                    continue
                tiles.append([heat_on_thumbnail(e["tile"], maps.mean(dim=0))]
                             + [heat_on_thumbnail(e["tile"], maps[h]) for h in chosen])
            more = f" (heads {len(chosen)} of {heads})" if len(chosen) < heads else ""
            figures.append(plots.overlay_grid(
                tiles, [e["path"] for e in examples], ["mean"] + [f"head {h}" for h in chosen],
                name=f"heads_{number}", cmap=HEATMAP_CMAP, dpi=dpi, image_format=image_format,
                colorbar_label="per-image normalised",
                caption=f"Per-head {self._what(swin)}, layer {key}{more}"))
        return figures

    def _heads_shown(self, heads: int) -> List[int]:
        """Head indices drawn for a layer with `heads` heads (config `heads`, else the first 16)."""
        if self.cfg.heads is None:
            return list(range(min(heads, DEFAULT_MAX_HEADS)))
        return [int(h) for h in self.cfg.heads if int(h) < heads]

    def _statistics_elements(self, keys: List[str], labels: Dict[str, str], entropy: np.ndarray,
                             distance: np.ndarray) -> List[Any]:
        dpi = int(self.ctx.report.figure_dpi)
        short = [labels[k] for k in keys]
        key_counts = sorted({self.layers[k].keys for k in keys})
        normalised = entropy / np.log(np.array([max(self.layers[k].keys, 2) for k in keys], dtype=np.float64))[:, None]
        elements: List[Any] = [plots.layer_head_heatmap(
            normalised, short, name="entropy", label="entropy / ln(keys)", vmin=0.0, vmax=1.0, dpi=dpi,
            caption=f"Mean attention entropy per layer and head over {self.images} images, as a fraction of a "
                    f"uniform row's (0: every query attends to one key, sharp; 1: uniform over all "
                    f"{'/'.join(map(str, key_counts))} keys, diffuse)")]
        if np.isfinite(distance).any():
            elements.append(plots.layer_head_scatter(
                distance, short, name="distance", ylabel="mean attention distance (px)", dpi=dpi,
                caption="Mean attention distance per head (input pixels between a query patch and the patches it "
                        "attends to, attention-weighted; Dosovitskiy et al. 2021, fig. 7): local heads low, "
                        "global heads high"))
        rows = []
        for i, key in enumerate(keys):
            heads = self.layers[key].heads
            ent = entropy[i, :heads]
            dist = distance[i, :heads]
            rows.append([labels[key], heads, float(ent.mean()), f"{int(ent.argmin())} ({ent.min():.3g})",
                         f"{int(ent.argmax())} ({ent.max():.3g})",
                         float(np.nanmean(dist)) if np.isfinite(dist).any() else None])
        elements.append(Table(["layer", "heads", "mean entropy (nats)", "sharpest head", "most diffuse head",
                               "mean distance (px)"], rows, collapsed=len(rows) > 12,
                              caption=f"Attention statistics per layer over the folder (entropy of a uniform row: "
                                      f"ln {'/'.join(map(str, key_counts))}; layer names and every head's values "
                                      f"in attention.npz)"))
        return elements
