"""`embedding_maps`: what a backbone's patch tokens and its last class-token attention look like on the first images.

Two figures from the self-supervised ViT papers, for the first `n_images` images of the folder (by file index, so a
shard-merged run shows the same ones):
- Patch features as colour (DINOv2, Oquab et al. 2023, fig. 1): a PCA over the patch tokens of the shown images
  together (class and register tokens left out), the first three components min-max scaled over those images and
  shown as RGB, one block per patch. Read from the module the model source names as its final tokens
  (`LoadedModel.token_layer`, e.g. timm's `norm`); a model without one (a CNN) gets a line saying so.
- Class-token attention (DINO, Caron et al. 2021, fig. 3): the last block's self-attention of the class token to
  each patch, one map per head (`attn[:, :, 0, prefix:]`, registers left out), and the mask of the smallest set of
  patches holding `mass` (60 %) of each head's attention (patch weights renormalised to sum 1, sorted ascending,
  kept where the cumulative sum exceeds 1 - mass). The last attention module the model calls is found on a
  one-image probe and captured by the engine (`Requirements.attention`); without a class token there is none.

The state holds, for the shown images only, their thumbnails, patch tokens (n × P × D floats) and per-head maps, so
merging is exact; the PCA runs at finalize. `results/embedding_maps.npz`: `paths`, `indices` (n,); `pca_mean` (D,),
`pca_components` (k, D), `pca_explained_variance`, `pca_explained_variance_ratio` (k,), `pca_range` (k, 2) the
min/max each component was scaled by, `rgb` (n, gh, gw, 3) in [0, 1]; `attention` (n, heads, gh, gw) raw
class-token weights and `masks` (n, heads, gh, gw) bool, `mass`.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from reportgen.analyses._attention_math import patch_grid
from reportgen.analyses.attention import is_windowed
from reportgen.analyses.base import Analysis, Batch, Requirements, RunContext, register
from reportgen.engine.capture import attention_kind, probe_forward
from reportgen.engine.layers import named_modules
from reportgen.engine.tensors import TokenLayout, token_layout_of
from reportgen.errors import ConfigError
from reportgen.report.elements import Alert, GalleryItem, ImageStrip, KeyValues, Section, Text
from reportgen.report.overlays import HEATMAP_ALPHA, HEATMAP_CMAP, normalise_maps, overlay
from reportgen.report.thumbnails import thumbnail
from reportgen.state.files import write_atomic
from reportgen.state.reducers import BoundedTop

RESULTS_FILE = "embedding_maps.npz"
DEFAULT_MAX_HEADS = 16  # heads drawn per image when `heads` is null, so 24-head models stay readable
MASK_DIM = 0.25  # brightness left to the pixels outside a mask


@dataclass
class EmbeddingMapsConfig:
    n_images: int = 8  # first images of the folder (by file index) shown with their maps; 0: none
    mass: float = 0.6  # share of each head's class-token attention the mask keeps (DINO: 0.6)
    heads: Optional[List[int]] = None  # head indices drawn (null: the first 16; []: none); the npz has every head
    components: int = 3  # principal components of the patch tokens computed (the first three are the RGB)


def mass_masks(maps: torch.Tensor, mass: float) -> torch.Tensor:
    """(..., gh, gw) non-negative maps -> bool masks of the smallest set of cells holding `mass` of each map's sum
    (DINO: normalise to sum 1, sort ascending, cumulative sum, keep the cells where it exceeds 1 - mass)."""
    flat = maps.flatten(-2).double()  # (..., P)
    share = flat / flat.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    values, order = share.sort(dim=-1)  # ascending
    keep = values.cumsum(dim=-1) > 1.0 - mass  # (..., P) in sorted order
    return torch.zeros_like(keep).scatter(-1, order, keep).reshape(maps.shape)  # back to patch order


def patch_pca(tokens: torch.Tensor, components: int) -> Dict[str, torch.Tensor]:
    """PCA of (M, D) patch tokens (float64 SVD of the centred tokens): `mean` (D,), `components` (k, D) with each
    component's largest-magnitude loading positive (SVD signs are arbitrary), `variance` and `ratio` (k,),
    `projections` (M, k); k = min(components, M, D)."""
    x = tokens.double()
    mean = x.mean(dim=0)  # (D,)
    centred = x - mean  # (M, D)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)  # (r,), (r, D)
    k = min(components, vh.shape[0])
    basis = vh[:k]  # (k, D)
    rows = torch.arange(k)
    signs = torch.sign(basis[rows, basis.abs().argmax(dim=1)])  # (k,)
    basis = basis * torch.where(signs == 0, torch.ones_like(signs), signs)[:, None]
    power = singular ** 2
    return {"mean": mean, "components": basis, "variance": power[:k] / max(x.shape[0] - 1, 1),
            "ratio": power[:k] / power.sum().clamp_min(1e-300), "projections": centred @ basis.T}  # (M, k)


def pca_colours(projections: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(M, k) projections -> ((M, 3) RGB in [0, 1], (k, 2) min/max): each of the first three components min-max
    scaled over all M rows (a constant one becomes 0); channels past k stay 0."""
    low = projections.min(dim=0).values  # (k,)
    high = projections.max(dim=0).values  # (k,)
    scaled = (projections - low) / (high - low).clamp_min(1e-12)  # (M, k)
    rgb = torch.zeros(projections.shape[0], 3, dtype=projections.dtype)  # (M, 3)
    rgb[:, : min(3, projections.shape[1])] = scaled[:, :3]
    return rgb, torch.stack([low, high], dim=1)


def nearest_tile(grid_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """(gh, gw) or (gh, gw, C) map -> (height, width[, C]) by nearest neighbour: one block per patch."""
    tensor = torch.from_numpy(np.ascontiguousarray(grid_map, dtype=np.float32))
    channels = tensor.permute(2, 0, 1)[None] if tensor.dim() == 3 else tensor[None, None]  # (1, C, gh, gw)
    resized = F.interpolate(channels, size=(height, width), mode="nearest")[0]  # (C, H, W)
    return resized.permute(1, 2, 0).numpy() if tensor.dim() == 3 else resized[0].numpy()


def has_class_token(model: torch.nn.Module, prefix: int) -> bool:
    """A class token leads the prefix tokens: any prefix, unless timm says the model has none (registers only)."""
    declared = [m.has_class_token for m in model.modules() if isinstance(getattr(m, "has_class_token", None), bool)]
    return prefix > 0 and (not declared or declared[0])


@register("embedding_maps")
class EmbeddingMaps(Analysis):
    Config = EmbeddingMapsConfig
    title = "Patch features and class-token attention"
    tasks = frozenset({"embedding"})
    why_not = ("these maps are drawn for backbones (model.task=embedding), whose output is the features "
               "themselves; a classifier's or a dense model's own analyses show where it looks")
    oom_safe = True  # update moves the kept rows to the CPU before it changes any state

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        if int(cfg.n_images) < 0:
            raise ConfigError("analysis.embedding_maps.n_images", cfg.n_images, "an integer >= 0")
        if not 0.0 < float(cfg.mass) <= 1.0:
            raise ConfigError("analysis.embedding_maps.mass", cfg.mass, "a fraction in (0, 1]")
        if cfg.heads is not None and any(int(h) < 0 for h in cfg.heads):
            raise ConfigError("analysis.embedding_maps.heads", list(cfg.heads), "head indices >= 0")
        if int(cfg.components) < 1:
            raise ConfigError("analysis.embedding_maps.components", cfg.components, "an integer >= 1")

    def __init__(self, cfg: Any, ctx: RunContext):
        super().__init__(cfg, ctx)
        self.check_config(cfg)
        self.modules = named_modules(ctx.model)
        loaded = ctx.loaded
        self.token_layer: Optional[str] = getattr(loaded, "token_layer", None)
        self.source_prefix = int(getattr(loaded, "prefix_tokens", 0) or 0)
        self.class_token = has_class_token(ctx.model, self.source_prefix)
        self.feature_reason = ""  # why there are no patch features ("" when there are)
        candidates = [n for n, m in self.modules.items()
                      if attention_kind(m) is not None and not is_windowed(n, self.modules)]
        if self.token_layer is None:
            self.feature_reason = (f"{type(ctx.model).__name__} has no token output"
                                   + (" the model source knows of" if candidates else
                                      " (a CNN: feature maps, not patch tokens)"))
        elif self.token_layer not in self.modules:
            self.feature_reason = (f"the model source names '{self.token_layer}' as the token output, but the "
                                   f"model has no such module")
            self.token_layer = None
        self.attention_module: Optional[str] = None  # the last block's attention, found on the first batch
        self.attention_reason = ""  # why there is no class-token attention ("" when there is)
        if not self.class_token:
            self.attention_reason = ("the model has no class token (the model source reports "
                                     f"{self.source_prefix} prefix tokens"
                                     + (", registers only" if self.source_prefix else "") + ")")
        elif not candidates:
            self.attention_reason = (f"{type(ctx.model).__name__} has no global self-attention module whose weights "
                                     f"can be captured (nn.MultiheadAttention, timm attention, transformers "
                                     f"attention)")
        self._candidates = candidates if not self.attention_reason else []
        self.layout: Optional[Dict[str, Any]] = None  # {prefix, grid, tokens, dim, heads} fixed on the first batch
        self.notes: List[str] = []
        self.images = 0
        self.first = BoundedTop(int(cfg.n_images))  # the first images, by file index, with tokens and maps

    def begin(self, example: Batch) -> None:
        """Find the last global attention module the model calls (a one-image probe, so a text tower or a module
        registered late but never called is not taken)."""
        if not self._candidates or int(self.cfg.n_images) == 0:
            return
        called: List[str] = []

        def ended(key: str, name: str, module: Any, args: Any, output: Any) -> None:
            called.append(name)

        probe_forward(self.ctx.model, example.inputs[:1], on_end=ended, modules=self._candidates)
        if called:
            self.attention_module = called[-1]
        else:
            self.attention_reason = "no attention module was called in a probe forward"

    def requires(self) -> Requirements:
        if int(self.cfg.n_images) == 0:  # nothing is shown: the pass need not capture anything for it
            return Requirements()
        return Requirements(activations=[self.token_layer] if self.token_layer else [],
                            attention=[self.attention_module] if self.attention_module else [])

    def _layout(self, tokens: int, height: int, width: int) -> Optional[TokenLayout]:
        """The model's own token layout (`token_layout_of`); else the source's prefix count and a grid of the
        image's aspect ratio."""
        known = token_layout_of(self.ctx.model, tokens, height, width)
        if known is not None:
            return known
        grid = patch_grid(tokens - self.source_prefix, height, width) if tokens > self.source_prefix else None
        return None if grid is None else TokenLayout(self.source_prefix, grid, self.class_token)

    def update(self, batch: Batch, outputs: Any, captures: Any) -> None:
        indices = batch.indices.tolist()
        wanted = [row for row, index in enumerate(indices) if self.first.accepts(-index, index)]
        first_batch = self.layout is None
        size = len(indices)
        height, width = (int(s) for s in batch.inputs.shape[-2:])
        tokens = self._tokens(captures, size, first_batch)  # (B, T, D) or None
        weights = self._attention(captures, size, first_batch)  # (B, heads, T, T) or None
        if first_batch:
            self._fix_layout(tokens, weights, height, width)
        layout = self.layout or {}
        prefix, grid = layout.get("prefix", 0), layout.get("grid")
        kept_tokens = kept_maps = None
        if wanted and grid is not None:
            with torch.no_grad():
                if tokens is not None and tokens.shape[1] == layout["tokens"]:
                    picked = tokens[torch.tensor(wanted, device=tokens.device)]  # (b, T, D)
                    kept_tokens = picked[:, prefix:].float().cpu()  # (b, P, D)
                if weights is not None and weights.shape[-1] == layout["tokens"]:
                    picked = weights[torch.tensor(wanted, device=weights.device)]  # (b, heads, T, T)
                    rows = picked[:, :, 0, prefix:].float()  # (b, heads, P): the class token's row, patches only
                    kept_maps = rows.reshape(len(wanted), -1, *grid).cpu()  # (b, heads, gh, gw)
        for slot, row in enumerate(wanted):  # no state changes before this point (oom_safe)
            index = indices[row]
            self.first.push(-index, index, {
                "index": index, "path": batch.paths[row],
                "thumb": thumbnail(batch.images[row], int(self.ctx.report.thumbnail_size)),
                "tokens": kept_tokens[slot].numpy() if kept_tokens is not None else None,  # (P, D)
                "attention": kept_maps[slot].numpy() if kept_maps is not None else None})  # (heads, gh, gw)
        self.images += size

    def _tokens(self, captures: Any, size: int, first_batch: bool) -> Optional[torch.Tensor]:
        """The token layer's first call this batch, (B, T, D), or None (with a note on the first batch)."""
        if self.token_layer is None:
            return None
        if self.token_layer not in captures:
            if first_batch:
                why = captures.notes.get(self.token_layer, "no output")
                self.notes.append(f"{self.token_layer}: not captured ({why})")
            return None
        tensor = captures[self.token_layer].detach()
        if tensor.dim() != 3 or tensor.shape[0] != size:
            if first_batch:
                self.notes.append(f"{self.token_layer}: output of shape {tuple(tensor.shape)} is not (batch {size}, "
                                  f"tokens, dimensions)")
            return None
        return tensor

    def _attention(self, captures: Any, size: int, first_batch: bool) -> Optional[torch.Tensor]:
        """The last block's attention weights this batch, (B, heads, T, T), or None (with a note)."""
        if self.attention_module is None:
            return None
        weights = captures.attention.get(self.attention_module)
        if weights is None:
            if first_batch:
                why = captures.notes.get(f"attention:{self.attention_module}", "no weights were captured")
                self.notes.append(f"{self.attention_module}: {why}")
            return None
        if weights.dim() != 4 or weights.shape[0] != size or weights.shape[-1] != weights.shape[-2]:
            if first_batch:
                self.notes.append(f"{self.attention_module}: attention of shape {tuple(weights.shape)} is not "
                                  f"(batch {size}, heads, tokens, tokens)")
            return None
        return weights.detach()

    def _fix_layout(self, tokens: Optional[torch.Tensor], weights: Optional[torch.Tensor], height: int,
                    width: int) -> None:
        """Prefix tokens and patch grid on the first batch, from the token output (else the attention's tokens);
        the other source is dropped, with a note, when its token count differs."""
        count = int(tokens.shape[1]) if tokens is not None else int(weights.shape[-1]) if weights is not None else 0
        layout = self._layout(count, height, width) if count else None
        if layout is None:
            if count:
                self.notes.append(f"{count} tokens do not form a patch grid of the {height}×{width} input")
            self.layout = {"prefix": 0, "grid": None, "tokens": count, "dim": 0, "heads": 0}
            return
        if layout.prefix != self.source_prefix:
            self.notes.append(f"the model's token layout has {layout.prefix} prefix tokens, the model source says "
                              f"{self.source_prefix}; the layout's count is used")
        if weights is not None and int(weights.shape[-1]) != count:
            self.notes.append(f"{self.attention_module}: {weights.shape[-1]} tokens, not the {count} of "
                              f"{self.token_layer}; its attention is left out")
        self.layout = {"prefix": layout.prefix, "grid": tuple(layout.grid), "tokens": count,
                       "dim": int(tokens.shape[-1]) if tokens is not None else 0,
                       "heads": int(weights.shape[1]) if weights is not None and weights.shape[-1] == count else 0}

    def state_dict(self) -> Dict[str, Any]:
        return {"images": self.images, "layout": self.layout, "notes": list(self.notes), "first": self.first,
                "attention_module": self.attention_module}

    def merge(self, state: Dict[str, Any]) -> None:
        """Another shard's shown images (the smallest indices of both are kept), counts and notes."""
        self.images += state["images"]
        self.layout = self.layout or state["layout"]
        self.attention_module = self.attention_module or state["attention_module"]
        self.notes.extend(n for n in state["notes"] if n not in self.notes)
        self.first.merge(state["first"])

    def examples(self) -> List[Dict[str, Any]]:
        """The kept images in file order."""
        return sorted((item for _, _, item in self.first.items()), key=lambda item: item["index"])

    def compute(self) -> Dict[str, Any]:
        """Everything the npz holds, from the kept images: the PCA over their patch tokens together, RGB maps,
        class-token maps and masks."""
        examples = self.examples()
        grid = (self.layout or {}).get("grid")
        result: Dict[str, Any] = {"paths": np.array([e["path"] for e in examples], dtype=str),
                                  "indices": np.array([e["index"] for e in examples], dtype=np.int64)}
        with_tokens = [e for e in examples if e["tokens"] is not None]
        if with_tokens and grid is not None:
            stacked = torch.from_numpy(np.concatenate([e["tokens"] for e in with_tokens]))  # (n * P, D)
            pca = patch_pca(stacked, int(self.cfg.components))
            rgb, ranges = pca_colours(pca["projections"])  # (n * P, 3), (k, 2)
            result.update(pca_mean=pca["mean"].numpy(), pca_components=pca["components"].numpy(),
                          pca_explained_variance=pca["variance"].numpy(),
                          pca_explained_variance_ratio=pca["ratio"].numpy(), pca_range=ranges.numpy(),
                          rgb=rgb.reshape(len(with_tokens), *grid, 3).float().numpy(),  # (n, gh, gw, 3)
                          rgb_paths=np.array([e["path"] for e in with_tokens], dtype=str))
        with_maps = [e for e in examples if e["attention"] is not None]
        if with_maps:
            maps = torch.from_numpy(np.stack([e["attention"] for e in with_maps]))  # (n, heads, gh, gw)
            result.update(attention=maps.numpy(), masks=mass_masks(maps, float(self.cfg.mass)).numpy(),
                          mass=np.float64(self.cfg.mass),
                          attention_paths=np.array([e["path"] for e in with_maps], dtype=str))
        return result

    def finalize(self) -> Optional[Section]:
        section = Section(id="embedding_maps", title=self.title)
        lines = []
        if self.feature_reason:
            lines.append(f"patch features: not applicable: {self.feature_reason}")
        if self.attention_reason:
            lines.append(f"class-token attention: not applicable: {self.attention_reason}")
        if self.feature_reason and self.attention_reason:
            section.summary = "; ".join(lines)
            section.elements.extend(Text(line) for line in lines)
            return section
        for note in self.notes:
            section.alerts.append(Alert("info", note))
        examples = self.examples()
        if not examples:
            section.summary = "no image shown" + (" (n_images=0)" if int(self.cfg.n_images) == 0 else "")
            section.elements.extend(Text(line) for line in lines)
            return section
        data = self.compute()
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **data)
        write_atomic(self.ctx.results_dir / RESULTS_FILE, buffer.getbuffer(), what=f"results/{RESULTS_FILE}")
        section.summary = self._summary(data, len(examples))
        section.elements.append(KeyValues(self._facts(data, len(examples))))
        section.elements.extend(Text(line) for line in lines)
        section.elements.extend(self._strips(examples, data))
        return section

    def _summary(self, data: Dict[str, Any], shown: int) -> str:
        parts = [f"{shown} images shown"]
        if "rgb" in data:
            ratio = data["pca_explained_variance_ratio"]
            parts.append(f"patch PCA: {ratio[:3].sum():.0%} of the variance in {min(3, len(ratio))} components")
        elif self.feature_reason:
            parts.append("no patch features")
        if "attention" in data:
            parts.append(f"class-token attention of {data['attention'].shape[1]} heads in {self.attention_module}")
        elif self.attention_reason:
            parts.append("no class-token attention")
        return "; ".join(parts)

    def _facts(self, data: Dict[str, Any], shown: int) -> List[Tuple[str, Any]]:
        layout = self.layout or {}
        facts: List[Tuple[str, Any]] = [("images shown", f"{shown} (the first of {self.images} by file order)")]
        if layout.get("grid"):
            gh, gw = layout["grid"]
            prefix = layout["prefix"]
            facts.append(("patch grid", f"{gh}×{gw} patches; {prefix} prefix tokens "
                                        f"({'class' if self.class_token else 'no class'} token"
                                        f"{f' + {prefix - 1} register tokens' if prefix > 1 else ''}) left out "
                                        f"of every map"))
        if "rgb" in data:
            ratio = ", ".join(f"PC{i + 1} {r:.1%}" for i, r in enumerate(data["pca_explained_variance_ratio"]))
            images, gh, gw = data["rgb"].shape[:3]
            facts.append(("patch features", f"output of {self.token_layer} ({layout.get('dim')} dimensions): PCA "
                                            f"over the {images} × {gh * gw} patch tokens of the shown images "
                                            f"together; explained variance {ratio}"))
            facts.append(("colours", "PC1, PC2, PC3 as red, green, blue, each min-max scaled over the shown images "
                                     "(DINOv2's figure); one block per patch"))
        if "attention" in data:
            heads = data["attention"].shape[1]
            facts.append(("attention", f"{self.attention_module} (the last attention the model calls): the class "
                                       f"token's attention to each patch, per head ({heads} heads), each map "
                                       f"min-max scaled, colormap {HEATMAP_CMAP} at {HEATMAP_ALPHA:.0%}"))
            facts.append(("masks", f"the smallest set of patches holding {float(self.cfg.mass):.0%} of each head's "
                                   f"attention to the patches (DINO's figure); the rest dimmed"))
        facts.append(("results", f"results/{RESULTS_FILE}: PCA basis and variance, RGB maps, raw attention maps, "
                                 f"masks"))
        return facts

    def _heads_shown(self, heads: int) -> List[int]:
        if self.cfg.heads is None:
            return list(range(min(heads, DEFAULT_MAX_HEADS)))
        return [int(h) for h in self.cfg.heads if int(h) < heads]

    def _strips(self, examples: List[Dict[str, Any]], data: Dict[str, Any]) -> List[ImageStrip]:
        """One strip per shown image: input, PCA colours, then each drawn head's attention and its mask."""
        rgb = dict(zip(data.get("rgb_paths", []), data.get("rgb", [])))
        maps = dict(zip(data.get("attention_paths", []), data.get("attention", [])))
        masks = dict(zip(data.get("attention_paths", []), data.get("masks", [])))
        strips = []
        for e in examples:
            thumb = e["thumb"]
            height, width = thumb.shape[:2]
            panels = [GalleryItem(image=thumb, title="input")]
            if e["path"] in rgb:
                colours = nearest_tile(rgb[e["path"]], height, width)  # (H, W, 3) in [0, 1]
                panels.append(GalleryItem(image=(colours * 255.0 + 0.5).astype(np.uint8), title="patch PCA",
                                          lines=["PC1-3 as RGB"]))
            if e["path"] in maps:
                chosen = self._heads_shown(maps[e["path"]].shape[0])
                scaled = normalise_maps(torch.from_numpy(maps[e["path"]])).numpy()  # (heads, gh, gw)
                for h in chosen:
                    panels.append(GalleryItem(image=overlay(thumb, nearest_tile(scaled[h], height, width)),
                                              title=f"head {h}"))
                for h in chosen:
                    mask = masks[e["path"]][h]
                    keep = nearest_tile(mask.astype(np.float32), height, width)[..., None]  # (H, W, 1)
                    dimmed = thumb.astype(np.float32) * (MASK_DIM + (1.0 - MASK_DIM) * keep)
                    panels.append(GalleryItem(image=dimmed.round().astype(np.uint8),
                                              title=f"head {h} mask",
                                              lines=[f"{int(mask.sum())} of {mask.size} patches"]))
            strips.append(ImageStrip(title=e["path"], lines=[f"image {e['index']}"], panels=panels))
        return strips
