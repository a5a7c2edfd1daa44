"""`weights`: statistics of every weight tensor, and pictures of the weights of a few chosen layers.

Weights do not change with the data, so all the work happens once, in `begin` (which also gets the first batch to
find the model's stages; if no image could be read, `finalize` reads the weights without it); `update` does nothing,
and `state_dict`/`merge` carry the finished numbers (every shard computes the same, so merging keeps one copy).

- The table (and `results/weights.csv`) lists every weight tensor of the model: parameters named `weight` or
  `*_weight` (e.g. `in_proj_weight` of nn.MultiheadAttention) owned directly by a module, normalisation scales
  included; biases and free parameters such as a ViT's `class_token` are not weights and are left out. A tensor
  tied to several modules is listed once, under its first name, with the other names in `shared_with`.
  Statistics are over the finite entries; `nonfinite` counts NaN/Inf entries (any raises an alert). `std` is the
  population std (ddof=0). "Near zero" is relative, |w| <= zero_tolerance * max|w| of the same tensor, because an
  absolute threshold means nothing across layers whose scales differ by orders of magnitude.
- Histograms are drawn for every listed tensor (or only the drawn layers), as small multiples, many per figure.
- Drawn layers (`layers`, default: the first conv, each stage's last conv, or the attention projection of each
  sampled transformer block, and the classifier head): a conv with 3 input channels and a spatial kernel as colour
  filter tiles; any other spatial conv as grey tiles of the mean over its input channels (one tile per output
  filter, the first `max_filters`); 2-D weights (Linear, in_proj_weight, 1x1 convs as out x in) as diverging
  heatmaps, block-averaged down to `heatmap_size` per side.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from reportgen.analyses.base import Analysis, Batch, RunContext, register
from reportgen.engine.layers import named_modules, select_layers, stage_outputs
from reportgen.errors import ConfigError
from reportgen.report import plots
from reportgen.report.elements import Alert, KeyValues, Section, Table, Text

HISTOGRAMS = ["all", "selected"]
PANELS_PER_FIGURE = 24  # histogram panels in one figure (4 columns x 6 rows)
COLLAPSE_ABOVE = 30  # a longer table starts folded, so the figures are not below a wall of rows
CSV_COLUMNS = ["layer", "type", "param", "shape", "count", "mean", "std", "min", "max", "l2", "frac_near_zero",
               "nonfinite", "shared_with"]


@dataclass
class WeightsConfig:
    layers: Optional[List[str]] = None  # layers drawn (name, glob, re:, type:, depth:; a container stands for the
    #   weight layers inside it); null: first conv, each stage's last conv / attention projection, the head
    zero_tolerance: float = 0.01  # "near zero" means |w| <= zero_tolerance * max|w| of the tensor (relative: an
    #   absolute threshold is meaningless across layers whose weight scales differ by orders of magnitude)
    max_filters: int = 64  # conv filters drawn per layer (the first ones by output channel); bounds the figure
    max_plots: int = 32  # layers drawn at most; a broad pattern (type:Conv2d on a DenseNet) would be minutes
    heatmap_size: int = 512  # matrices larger than this per side are block-averaged down to fit (a note says so)
    histograms: str = "all"  # all: a histogram for every tensor in the table; selected: only for drawn layers
    bins: int = 50  # histogram bins between the tensor's finite min and max
    max_rows: int = 300  # table rows shown in the page; results/weights.csv has every row


@dataclass
class WeightTensor:
    """One weight tensor of the model and where it lives."""

    layer: str  # qualified module name of its first owner
    type: str  # class name of that module
    param: str  # parameter name in the module: weight, in_proj_weight, ...
    tensor: torch.Tensor
    shared_with: List[str] = field(default_factory=list)  # other module names holding the same tensor (tied)


def _module_type(module: nn.Module) -> str:
    return getattr(module, "original_name", None) or type(module).__name__  # TorchScript keeps the real name


def own_weights(module: nn.Module) -> List[Tuple[str, torch.Tensor]]:
    """(name, tensor) of the weights a module owns itself: parameters named `weight` or `*_weight`, and a
    parametrized `weight` (torch.nn.utils.parametrize) as the tensor the module computes."""
    found = [(n, p) for n, p in module.named_parameters(recurse=False)
             if p is not None and (n == "weight" or n.endswith("_weight"))]
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and "weight" in parametrizations and not any(n == "weight" for n, _ in found):
        found.insert(0, ("weight", module.weight))
    return found


def weight_tensors(model: nn.Module) -> List[WeightTensor]:
    """Every weight tensor of the model in definition order, each tensor once (tied copies in `shared_with`)."""
    tensors: List[WeightTensor] = []
    by_id: Dict[int, WeightTensor] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param, tensor in own_weights(module):
            first = by_id.get(id(tensor))
            label = name or "(model)"
            if first is not None:
                if label != first.layer and label not in first.shared_with:
                    first.shared_with.append(label)
                continue
            entry = WeightTensor(label, _module_type(module), param, tensor)
            by_id[id(tensor)] = entry
            tensors.append(entry)
    return tensors


def tensor_stats(tensor: torch.Tensor, zero_tolerance: float, bins: int) -> Dict[str, Any]:
    """Statistics over the finite entries (float64 numpy: exact enough to compare with hand values, and several
    times faster than torch's float64 isfinite on CPU) and a fixed-bin histogram of them: count, mean, std (ddof=0),
    min, max, l2, frac_near_zero, nonfinite, hist."""
    values = tensor.detach().to("cpu", torch.float64).numpy().ravel()  # (N,)
    finite_mask = np.isfinite(values)  # (N,)
    finite = values if finite_mask.all() else values[finite_mask]  # (n_finite,)
    stats: Dict[str, Any] = {"count": int(values.size), "nonfinite": int(values.size - finite.size)}
    if finite.size == 0:
        stats.update({k: math.nan for k in ("mean", "std", "min", "max", "l2", "frac_near_zero")})
        stats["hist"] = (np.zeros(0, dtype=np.int64), np.zeros(1))
        return stats
    low, high = float(finite.min()), float(finite.max())
    mean = float(finite.sum() / finite.size)
    centred = finite - mean  # (n_finite,)
    threshold = zero_tolerance * max(-low, high)
    stats.update({
        "mean": mean, "std": math.sqrt(float(np.dot(centred, centred)) / finite.size), "min": low, "max": high,
        "l2": math.sqrt(float(np.dot(finite, finite))),
        "frac_near_zero": float(np.count_nonzero((finite <= threshold) & (finite >= -threshold)) / finite.size),
    })
    span = (low, high) if high > low else (low - 0.5, high + 0.5)
    counts, edges = np.histogram(finite, bins=bins, range=span)
    stats["hist"] = (counts.astype(np.int64), edges)
    return stats


def block_average(matrix: np.ndarray, limit: int) -> Tuple[np.ndarray, Tuple[int, int]]:
    """Means over (fr, fc) blocks so that neither side exceeds `limit`; returns the matrix and (fr, fc). The last
    block of a side may be smaller; non-finite entries are left out of the means (NaN where a block has none)."""
    rows, cols = matrix.shape
    fr, fc = max(1, math.ceil(rows / limit)), max(1, math.ceil(cols / limit))
    if fr == fc == 1:
        return matrix, (1, 1)
    finite = np.isfinite(matrix)
    starts_r, starts_c = np.arange(0, rows, fr), np.arange(0, cols, fc)
    sums = np.add.reduceat(np.add.reduceat(np.where(finite, matrix, 0.0), starts_r, axis=0), starts_c, axis=1)
    counts = np.add.reduceat(np.add.reduceat(finite.astype(np.float64), starts_r, axis=0), starts_c, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan), (fr, fc)  # (ceil(rows/fr), ceil(cols/fc))


def plot_data(entry: WeightTensor, max_filters: int, heatmap_size: int) -> Optional[Dict[str, Any]]:
    """What to draw for one weight tensor, as small float32 arrays (bounded by max_filters / heatmap_size), or None
    for a 1-D weight (a normalisation scale: table and histogram only)."""
    weight = entry.tensor.detach().to("cpu", torch.float32)
    shape = tuple(weight.shape)
    out = {"layer": entry.layer, "param": entry.param, "shape": shape, "notes": [], "row_groups": []}
    if weight.dim() < 2:
        return None
    if weight.dim() == 4 and shape[2] * shape[3] > 1:
        shown = min(shape[0], max_filters)
        if shape[1] == 3:
            out.update(kind="rgb", data=weight[:shown].numpy())  # (n, 3, kh, kw)
        else:
            out.update(kind="grey", data=weight[:shown].mean(dim=1).numpy())  # (n, kh, kw) mean over inputs
        out["shown"] = shown
        return out
    matrix = weight.reshape(shape[0], -1).double().numpy()  # (out, in * rest)
    if weight.dim() == 4:
        out["notes"].append("1×1 kernel, drawn as the out × in matrix")
    elif weight.dim() != 2:
        out["notes"].append("drawn flattened to out × (all other dimensions)")
    data, (fr, fc) = block_average(matrix, heatmap_size)
    if (fr, fc) != (1, 1):
        out["notes"].append(f"block-averaged {fr}×{fc} to {data.shape[0]}×{data.shape[1]} to fit "
                            f"{heatmap_size}×{heatmap_size}")
    if entry.param == "in_proj_weight" and shape[0] % 3 == 0:
        third = shape[0] // 3
        out["row_groups"] = [(0, "q"), (third, "k"), (2 * third, "v")]
        out["notes"].append(f"q, k, v projections stacked, {third} rows each")
    out.update(kind="heatmap", data=data.astype(np.float32), matrix_shape=matrix.shape)
    return out


def _is_attention(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or "Attention" in type(module).__name__


def _ndim(entry_of: Dict[str, WeightTensor], name: str) -> int:
    return entry_of[name].tensor.dim() if name in entry_of else 0


def default_layers(model: nn.Module, example: Optional[torch.Tensor]) -> Tuple[List[str], str]:
    """Layers drawn when `layers` is null, and a sentence saying how they were chosen: the first conv, for each
    stage (reportgen.engine.layers.stage_outputs, one probe forward of `example`) the last conv defined between the previous
    stage's end and this stage's end (so the stem's conv belongs to the stem stage), or for a transformer block its
    attention projection, and the classifier head (the last Linear). Without an example, or when the probe fails,
    only the first conv and the head."""
    modules = named_modules(model)
    index = {name: i for i, name in enumerate(modules)}
    entry_of: Dict[str, WeightTensor] = {}
    for entry in weight_tensors(model):
        entry_of.setdefault(entry.layer, entry)
    owners = [n for n in modules if n in entry_of]  # definition order
    stages: List[str] = []
    note = ""
    if example is not None:
        try:
            stages = stage_outputs(model, example)
        except Exception as exc:  # a model hooks cannot probe (TorchScript) still gets its first conv and head
            note = f" (stages not found: {type(exc).__name__}: {exc})"
    chosen: List[str] = []
    first_conv = next((n for n in owners if _ndim(entry_of, n) >= 3), None)
    if first_conv:
        chosen.append(first_conv)
    previous = -1
    for stage in stages:
        inside = [n for n in modules if n.startswith(stage + ".")]
        end = index[inside[-1]] if inside else index[stage]  # the stage's last descendant
        attention = [n for n in inside if _is_attention(modules[n])]
        if attention:
            projections = [n for n in owners if (n == attention[0] or n.startswith(attention[0] + "."))
                           and _ndim(entry_of, n) >= 2]
            chosen.extend(projections[:1])
        else:
            segment = [n for n in owners if previous < index[n] <= end]
            convs = [n for n in segment if _ndim(entry_of, n) >= 3] or [n for n in segment if _ndim(entry_of, n) >= 2]
            chosen.extend(convs[-1:])
        previous = max(previous, end)
    linears = [n for n in owners if isinstance(modules[n], nn.Linear) or _module_type(modules[n]) == "Linear"]
    if linears:
        chosen.append(linears[-1])
    how = ("the first conv, each stage's last conv (for transformer blocks their attention projection) and the "
           "classifier head (last Linear)" if stages else "the first conv and the classifier head (last Linear)")
    return sorted(set(chosen), key=index.__getitem__), how + note


def resolve_layers(model: nn.Module, patterns: List[str], key: str = "analysis.weights.layers") -> List[str]:
    """Layers named by `patterns` (reportgen.engine.layers syntax) that own a weight; a matched container stands for the
    weight-owning modules inside it, so `layer4` means every weight of layer4. ConfigError with close names for a
    pattern that matches nothing, or nothing with a weight."""
    owning = {name for entry in weight_tensors(model) for name in (entry.layer, *entry.shared_with)}
    owners = [n for n in named_modules(model) if n in owning]  # definition order, tied aliases included
    chosen: List[str] = []
    for pattern in patterns:
        matches = select_layers(model, [str(pattern)], key)
        expanded = [n for n in owners if any(n == m or n.startswith(m + ".") for m in matches)]
        if not expanded:
            raise ConfigError(key, pattern, "a pattern selecting modules that own a weight, or containers of them",
                              owners)
        chosen.extend(n for n in expanded if n not in chosen)
    return sorted(chosen, key=owners.index)


@register("weights")
class Weights(Analysis):
    Config = WeightsConfig
    title = "Weights"
    layer_option = "analysis.weights.layers"

    def __init__(self, cfg: Any, ctx: RunContext):
        super().__init__(cfg, ctx)
        if str(cfg.histograms) not in HISTOGRAMS:
            raise ConfigError("analysis.weights.histograms", cfg.histograms, "one of", HISTOGRAMS)
        if not 0.0 <= float(cfg.zero_tolerance) < 1.0:
            raise ConfigError("analysis.weights.zero_tolerance", cfg.zero_tolerance, "a fraction in [0, 1)")
        for key, least in (("max_filters", 1), ("max_plots", 0), ("heatmap_size", 8), ("bins", 1), ("max_rows", 1)):
            if int(getattr(cfg, key)) < least:
                raise ConfigError(f"analysis.weights.{key}", getattr(cfg, key), f"an integer >= {least}")
        self.rows: List[Dict[str, Any]] = []  # one per weight tensor, with its histogram
        self.plots: List[Dict[str, Any]] = []  # one per drawn layer weight
        self.selection: Dict[str, Any] = {}  # how layers were chosen, and what was left out

    def begin(self, example: Batch) -> None:
        self._compute(example.inputs[:1])  # (1, 3, H, W): one image is enough to find the stages

    def _compute(self, example: Optional[torch.Tensor]) -> None:
        model = self.ctx.model
        if self.cfg.layers is None:
            selected, how = default_layers(model, example)
        else:
            selected, how = resolve_layers(model, list(self.cfg.layers)), "the layers matching analysis.weights.layers"
        drawn = set(selected[: int(self.cfg.max_plots)])
        entries = weight_tensors(model)
        tolerance, bins = float(self.cfg.zero_tolerance), int(self.cfg.bins)
        self.rows, self.plots = [], []
        for entry in entries:
            stats = tensor_stats(entry.tensor, tolerance, bins)
            is_drawn = bool(drawn & {entry.layer, *entry.shared_with})  # a tied tensor: drawn under any name
            self.rows.append({"layer": entry.layer, "type": entry.type, "param": entry.param,
                              "shape": "×".join(str(d) for d in entry.tensor.shape),
                              "shared_with": " ".join(entry.shared_with), "drawn": is_drawn, **stats})
            if is_drawn:
                data = plot_data(entry, int(self.cfg.max_filters), int(self.cfg.heatmap_size))
                if data is not None:
                    data["out_channels"] = int(entry.tensor.shape[0])
                    self.plots.append(data)
        one_d = [r["layer"] for r in self.rows if r["drawn"] and r["layer"] not in {p["layer"] for p in self.plots}]
        self.selection = {"how": how, "selected": selected, "not_drawn": selected[len(drawn):], "one_d": one_d}

    def update(self, batch: Batch, outputs: Any, captures: Any) -> None:
        """Nothing: the weights are the same for every batch."""

    def state_dict(self) -> Dict[str, Any]:
        return {"rows": self.rows, "plots": self.plots, "selection": self.selection}

    def merge(self, state: Dict[str, Any]) -> None:
        if not self.rows:  # every shard reads the same weights; keep one copy
            self.rows, self.plots, self.selection = state["rows"], state["plots"], state["selection"]

    def finalize(self) -> Optional[Section]:
        if not self.rows and not self.selection:  # no batch arrived: weights need no data, so read them now
            self._compute(None)
        self._write_csv()
        section = Section(id="weights", title="Weights")
        if not self.rows:
            section.elements.append(Text("The model has no weight tensors (parameters named weight or *_weight)."))
            return section
        dpi = int(self.ctx.report.figure_dpi)
        total = sum(r["count"] for r in self.rows)
        section.summary = f"{len(self.rows)} weight tensors, {total:,} weights; {len(self.plots)} drawn"
        shared = [r for r in self.rows if r["shared_with"]]
        section.elements.append(KeyValues([
            ("weight tensors", f"{len(self.rows)} ({len(shared)} shared by several modules)" if shared
             else len(self.rows)),
            ("weights", f"{total:,}"),
            ("drawn layers", ", ".join(self.selection["selected"][: int(self.cfg.max_plots)]) or "none"),
            ("chosen as", self.selection["how"]),
        ]))
        self._alerts(section)
        section.elements.append(self._table())
        for index, plot in enumerate(self.plots):
            section.elements.append(self._figure(index, plot, dpi))
        if self.selection["one_d"]:
            section.elements.append(Text("1-D weights (normalisation scales) are in the table and the histograms "
                                         "only: " + ", ".join(self.selection["one_d"])))
        if self.selection["not_drawn"]:
            left = self.selection["not_drawn"]
            section.elements.append(Text(f"{len(left)} more selected layers are not drawn (analysis.weights."
                                         f"max_plots={self.cfg.max_plots}): {', '.join(left[:20])}"
                                         + (" ..." if len(left) > 20 else "")))
        section.elements.extend(self._histograms(dpi))
        return section

    def _write_csv(self) -> None:
        with open(self.ctx.results_dir / "weights.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS)
            for row in self.rows:
                writer.writerow([repr(row[c]) if isinstance(row[c], float) else row[c] for c in CSV_COLUMNS])

    def _alerts(self, section: Section) -> None:
        bad = [r for r in self.rows if r["nonfinite"]]
        if bad:
            section.alerts.append(Alert("error", f"{len(bad)} weight tensors hold NaN or Inf values; statistics "
                                                 f"and plots use the finite entries only",
                                        details=[f"{r['layer']}.{r['param']}: {r['nonfinite']:,} of "
                                                 f"{r['count']:,} entries" for r in bad]))

    def _table(self) -> Table:
        tolerance = float(self.cfg.zero_tolerance)
        rows = [[r["layer"] + ("" if r["param"] == "weight" else f".{r['param']}")
                 + (f" (= {r['shared_with']})" if r["shared_with"] else ""), r["type"], r["shape"], r["count"],
                 r["mean"], r["std"], r["min"], r["max"], r["l2"], r["frac_near_zero"], r["nonfinite"]]
                for r in self.rows]
        return Table(["layer", "type", "shape", "count", "mean", "std", "min", "max", "L2 norm", "near 0",
                      "NaN/Inf"], rows,
                     caption=f"Statistics of all {len(rows)} weight tensors (over finite entries; std with "
                             f"ddof=0; near 0: fraction with |w| ≤ {tolerance:g}·max|w| of the same tensor; a "
                             f"parameter other than 'weight' is named after its layer; a tied tensor is listed "
                             f"once, '= name' gives its other owners)",
                     max_rows=int(self.cfg.max_rows), csv="weights.csv",
                     collapsed=len(rows) > COLLAPSE_ABOVE)

    def _figure(self, index: int, plot: Dict[str, Any], dpi: int):
        shape = "×".join(str(d) for d in plot["shape"])
        full = f"{plot['layer']}.{plot['param']} ({shape})"
        title = full if len(full) <= 60 else "…" + full[-59:]  # the end of a long name says the most
        notes = list(plot["notes"])
        if plot["kind"] == "rgb":
            caption = (f"{full}: the first {plot['shown']} of {plot['out_channels']} filters as colour tiles, each "
                       f"min–max normalised on its own")
            return plots.filter_grid(plot["data"], f"filters-{index}", caption, dpi, title=title)
        if plot["kind"] == "grey":
            inputs = plot["shape"][1]
            source = f"each the mean over its {inputs} input channels" if inputs > 1 else "one input channel each"
            caption = (f"{full}: the first {plot['shown']} of {plot['out_channels']} filters, {source}, on one grey "
                       f"scale (mid-grey 0)")
            return plots.filter_grid(plot["data"], f"filters-{index}", caption, dpi, title=title)
        caption = (f"{full}: rows outputs, columns inputs; red positive, blue negative, colours saturate beyond "
                   f"the 99th percentile of |w|")
        if notes:
            caption += "; " + "; ".join(notes)
        return plots.weight_heatmap(plot["data"], f"heatmap-{index}", caption, dpi, title=title,
                                    row_groups=plot["row_groups"], original_shape=plot["matrix_shape"])

    def _histograms(self, dpi: int) -> List[Any]:
        rows = self.rows if self.cfg.histograms == "all" else [r for r in self.rows if r["drawn"]]
        figures = []
        for start in range(0, len(rows), PANELS_PER_FIGURE):
            page = rows[start: start + PANELS_PER_FIGURE]
            panels = [(f"{r['layer']}.{r['param']} {r['shape']}", *r["hist"]) for r in page]
            end = start + len(page)
            figures.append(plots.histogram_grid(
                panels, f"histograms-{start // PANELS_PER_FIGURE + 1}",
                f"Weight histograms {start + 1}–{end} of {len(rows)} (table order; finite values, red line at 0)",
                dpi))
        return figures
