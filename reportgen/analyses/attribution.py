"""`attribution`: several attribution methods on a deterministic sample of the folder, each scored for
faithfulness and sanity against controls, and a verdict per method: which maps to trust for this model.

In the pass, the analysis only keeps the sample: `images` images chosen by a seeded hash of their path (the same
images whatever the batch size, shard layout or resume), with the class the model predicted (the target every
method explains and every curve scores, as RISE does). Everything else happens at finalize, on the run device, in
batches across images and steps, with a progress bar, after the log has said how many extra forwards and backwards
the settings need:
- the methods (`reportgen.analyses._attribution_methods`: Captum for the pixel methods, the project's own Grad-CAM
  path for the CAMs, so `gradcam` here equals the gradcam section's maps), and three controls: a random map, a Sobel
  edge map of the image, a centred Gaussian;
- faithfulness (`reportgen.analyses._faithfulness`): RISE's deletion and insertion curves and AUCs, the folder's
  score being the AUC of the mean curve; ROAD most- and least-relevant-first with noisy linear imputation, and its
  combined score;
- sanity (`reportgen.analyses._sanity`): cascading randomisation of the model's blocks, top-down and bottom-up, on a
  copy of the model (the user's model is never changed), re-explaining the first `sanity_images` of the sample at
  each step: Spearman rank correlation of |maps| and SSIM against the original maps;
- a verdict per method (`reportgen.analyses._attribution_verdict`), with the metrics side by side.

Files: `results/attributions.npz` (`paths`, `targets`, one (N, H, W) float16 array per method and control),
`results/faithfulness.json` (settings; per method and control: `deletion_auc`, `insertion_auc`, `road_morf`,
`road_lerf`, `road`, the mean curves, per-image AUCs and curves (rows in the order of `attributions.npz`),
`randomization` with per-step Spearman and SSIM, `cost`, `verdict`).
"""
from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from reportgen.analyses._attribution_verdict import SANITY_LIMIT, verdict
from reportgen.analyses._folder_inputs import require
from reportgen.analyses.base import Analysis, Batch, RunContext, register
from reportgen.errors import ConfigError
from reportgen.inputs.labels import display_names
from reportgen.inputs.tasks import adapt_outputs
from reportgen.report import plots
from reportgen.report.elements import Alert, GalleryItem, ImageStrip, KeyValues, Section, Table, Text
from reportgen.report.overlays import overlay, resize_maps
from reportgen.report.thumbnails import thumbnail
from reportgen.state.files import write_json
from reportgen.state.reducers import BoundedTop

log = logging.getLogger("reportgen")

DEFAULT_METHODS = ["saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "gradcam", "eigencam"]
ORDERS = ["top_down", "bottom_up"]
BASELINES = ["zeros", "blur"]


@dataclass
class AttributionConfig:
    methods: List[str] = field(default_factory=lambda: list(DEFAULT_METHODS))  # see METHODS; heavy ones opt-in:
    #   occlusion, scorecam, ablationcam (one forward per window / channel)
    images: Optional[int] = 64  # the sample scored (seeded by path); null: every image
    step: Optional[int] = None  # pixels per deletion / insertion step; null: H*W/32 (32 steps), RISE's paper: 224
    road: bool = True  # ROAD at 10..90 % removed (2 x 7 forwards and 14 sparse solves per map and image)
    road_images: Optional[int] = 8  # the first images of the sample scored by ROAD (its imputation costs 2-4 s
    #   of CPU per image and map at 224 px); null: the whole sample
    sanity: List[str] = field(default_factory=lambda: list(ORDERS))  # randomisation orders; [] skips the check
    sanity_images: int = 8  # the first images of the sample re-explained at each randomisation step
    layer: Optional[str] = None  # the CAMs' layer (null: the gradcam analysis's default layer)
    n_steps: int = 32  # integrated gradients
    baseline: str = "zeros"  # integrated gradients and occlusion: zeros (the mean colour) | blur (RISE's blur)
    noise_samples: int = 8  # smoothgrad / vargrad
    noise_std: float = 0.15  # smoothgrad / vargrad noise, as a fraction of each image's value range
    occlusion_window: int = 32
    occlusion_stride: int = 16
    batch_size: int = 32  # inputs per forward in every extra pass
    seed: int = 0
    shown: int = 4  # images drawn with every method's map (those where the methods disagree most)


@register("attribution")
class Attribution(Analysis):
    Config = AttributionConfig
    title = "Attribution methods: faithfulness and sanity"
    layer_option = "analysis.attribution.layer"
    tasks = frozenset({"classification"})
    why_not = ("the methods explain one class score per image and the curves score the top-1 class probability, "
               "which a segmentation or detection model does not output")

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        from reportgen.analyses._attribution_methods import METHODS
        methods = [str(m) for m in cfg.methods]
        for method in methods:
            if method not in METHODS:
                raise ConfigError("analysis.attribution.methods", method, "an attribution method", list(METHODS))
        if not methods:
            raise ConfigError("analysis.attribution.methods", methods, "at least one method", list(METHODS))
        for order in cfg.sanity:
            if str(order) not in ORDERS:
                raise ConfigError("analysis.attribution.sanity", order, "a randomisation order", ORDERS)
        if str(cfg.baseline) not in BASELINES:
            raise ConfigError("analysis.attribution.baseline", cfg.baseline, "a baseline", BASELINES)
        if cfg.images is not None and int(cfg.images) < 1:
            raise ConfigError("analysis.attribution.images", cfg.images, "a positive number of images or null (all)")
        if cfg.step is not None and int(cfg.step) < 1:
            raise ConfigError("analysis.attribution.step", cfg.step, "a positive number of pixels or null")

    def __init__(self, cfg: Any, ctx: RunContext):
        super().__init__(cfg, ctx)
        self.check_config(cfg)
        require("captum", "attribution", "the attribution methods", extra="explain")
        require("skimage", "attribution", "the sanity check's SSIM", extra="explain")
        capacity = ctx.num_images if cfg.images is None else int(cfg.images)
        self.sample = BoundedTop(max(1, capacity))
        self.layer: Optional[str] = None
        self.layout: Optional[tuple] = None
        self.cam_missing: Optional[str] = None

    @property
    def methods(self) -> List[str]:
        return [str(m) for m in self.cfg.methods]

    def begin(self, example: Batch) -> None:
        from reportgen.analyses._attribution_methods import CAM_METHODS
        from reportgen.analyses.gradcam import default_target_layer, grid_layout
        from reportgen.engine.layers import select_layers
        if not any(m in CAM_METHODS for m in self.methods):
            return
        model, probe = self.ctx.model, example.inputs[:1]
        if self.cfg.layer:
            self.layer = select_layers(model, [str(self.cfg.layer)], "analysis.attribution.layer")[-1]
        else:
            self.layer = default_target_layer(model, probe)
        self.layout = grid_layout(model, self.layer, probe) if self.layer else None
        if self.layout is None:
            self.cam_missing = (f"the CAM methods need a layer whose output is a grid of the image, and "
                                f"{self.layer or 'no layer'} is not one: choose one with analysis.attribution.layer")

    def update(self, batch: Batch, outputs: Any, captures: Any) -> None:
        predicted = outputs.logits.detach().argmax(dim=1).cpu()  # (B,)
        labels = batch.labels.cpu()
        for row, (index, path) in enumerate(zip(batch.indices.tolist(), batch.paths)):
            score = zlib.crc32(f"{int(self.cfg.seed)}:{path}".encode()) / 2 ** 32  # seeded, order-free
            if self.sample.accepts(score, index):
                self.sample.push(score, index, {"path": path, "image": batch.images[row].clone(),
                                                "target": int(predicted[row]), "label": int(labels[row])})

    def state_dict(self) -> Dict[str, Any]:
        return {"sample": self.sample, "layer": self.layer, "layout": self.layout, "cam_missing": self.cam_missing}

    def merge(self, state: Dict[str, Any]) -> None:
        self.sample.merge(state["sample"])
        self.layer = self.layer or state["layer"]
        self.layout = self.layout or state["layout"]
        self.cam_missing = self.cam_missing or state["cam_missing"]

    # --- finalize ------------------------------------------------------------------------------------------------

    def finalize(self) -> Optional[Section]:
        section = Section(id="attribution", title=self.title)
        # in the sample's own seeded order (by the path's hash), so "the first N" (ROAD, randomisation) is a random
        # subset of the sample, not the first class folder
        items = [payload for _, _, payload in self.sample.items()]
        if not items:
            section.elements.append(Text("No image was processed, so no method was scored."))
            return section
        from reportgen.analyses._attribution_methods import CAM_METHODS
        methods = [m for m in self.methods if not (m in CAM_METHODS and self.layout is None)]
        skipped = [m for m in self.methods if m not in methods]
        if skipped:
            section.elements.append(Alert("warning", f"Not scored: {', '.join(skipped)}: {self.cam_missing}."))
        work = _Work(self, items, methods)
        section.elements.append(Text(work.plan_text()))
        log.info("attribution: %s", work.plan_text())
        results = work.run()
        self._write(items, work, results)
        self._draw(section, items, work, results)
        return section

    def _write(self, items: List[dict], work: "_Work", results: Dict[str, Any]) -> None:
        arrays = {name: maps.astype(np.float16) for name, maps in work.maps.items()}  # exact: see _as_saved
        np.savez_compressed(self.ctx.results_dir / "attributions.npz", paths=np.array([i["path"] for i in items]),
                            targets=np.array([i["target"] for i in items]), **arrays)
        write_json(self.ctx.results_dir / "faithfulness.json", results)

    def _draw(self, section: Section, items: List[dict], work: "_Work", results: Dict[str, Any]) -> None:
        scores, controls = results["methods"], results["controls"]
        section.elements.append(KeyValues([
            ("images scored", f"{len(items)} (seeded sample by path)" if self.cfg.images is not None
             else f"{len(items)} (every image)"),
            ("target", "the predicted class (top-1 of the clean image)"),
            ("deletion / insertion step", f"{work.step} pixels ({work.steps} steps)"),
            ("ROAD", f"the first {work.road_count} images" if work.road_count else "not run"),
            ("CAM layer", self.layer or "none"),
            ("randomisation", (f"{', '.join(str(o) for o in self.cfg.sanity)} on the first {work.sanity_count} "
                               f"images, blocks: {', '.join(work.blocks)}") if work.blocks else "not run"),
        ]))
        columns = ["method", "verdict", "deletion AUC ↓", "insertion AUC ↑", "ROAD ↑", "Spearman, all random",
                   "F + B per image", "seconds"]
        rows = []
        for name in list(scores) + list(controls):
            entry = scores.get(name) or controls[name]
            cost = entry.get("cost", {})
            rows.append([name if name in scores else f"{name} (control)",
                         entry.get("verdict", {}).get("line", "control"),
                         _fmt(entry.get("deletion_auc")), _fmt(entry.get("insertion_auc")), _fmt(entry.get("road")),
                         _fmt(entry.get("sanity_last")),
                         f"{cost.get('forwards', 0)} + {cost.get('backwards', 0)}" if cost else "-",
                         _fmt(cost.get("seconds"), 1) if cost else "-"])
        section.elements.append(Table(columns, rows, caption=(
            "Per method: deletion AUC (lower: removing its top pixels drops the top-1 probability faster), insertion "
            "AUC (higher), ROAD (LeRF − MoRF over 10–90 % removed, higher), the rank correlation of |maps| with "
            f"every block randomised (below {SANITY_LIMIT}: the maps depend on the weights). Controls: a random map, "
            "a Sobel edge map, a centred Gaussian. ROAD favours blurrier maps; the metrics are shown side by side "
            "because they can disagree.")))
        dpi = int(self.ctx.report.figure_dpi)
        for kind, axis in (("deletion", "fraction of pixels removed"), ("insertion", "fraction of pixels restored")):
            series = [(name, np.linspace(0, 1, len(curve)), curve) for name, curve in work.mean_curves(kind)]
            section.elements.append(plots.line_series(series, kind, axis, "top-1 probability", dpi=dpi,
                                                      caption=f"Mean {kind} curves over the sample"))
        for order, curves in work.randomization_curves().items():
            section.elements.append(plots.line_series(
                curves, f"randomization_{order}", "blocks randomised (fraction of the cascade)",
                "Spearman of |maps| with the original", dpi=dpi,
                caption=f"Cascading randomisation, {order.replace('_', '-')}: maps that keep their rank correlation "
                        f"ignore the weights (the axis starts at 0; faithfulness.json has negative values)"))
        self._disagreement_strips(section, items, work)

    def _disagreement_strips(self, section: Section, items: List[dict], work: "_Work") -> None:
        """The images whose methods' maps agree least (lowest mean pairwise Spearman), every method's map drawn."""
        from reportgen.analyses._attribution_methods import display_maps
        from reportgen.analyses._sanity import spearman_abs
        names = list(work.methods)
        if len(names) < 2:
            return
        pairs = [spearman_abs(work.maps[a], work.maps[b]) for i, a in enumerate(names) for b in names[i + 1:]]
        agreement = np.mean(pairs, axis=0)  # (N,)
        names_of = display_names(self.ctx.loaded.class_names, max(i["target"] for i in items) + 1)
        size = int(self.ctx.report.thumbnail_size)
        for index in np.argsort(agreement)[: int(self.cfg.shown)]:
            item = items[index]
            thumb = thumbnail(item["image"], size)
            panels = [GalleryItem(thumb, "image", [])]
            for name in names:
                heat = torch.from_numpy(display_maps(work.maps[name][index][None]))  # (1, H, W) in [0, 1]
                heat = resize_maps(heat, *thumb.shape[:2])[0].numpy()
                panels.append(GalleryItem(overlay(thumb, heat), name, []))
            section.elements.append(ImageStrip(item["path"], [f"explained: {names_of[item['target']]}",
                                                              f"mean agreement {agreement[index]:.2f}"], panels))


class _Work:
    """The extra passes of one finalize: maps, curves, randomisation, costs, in that order."""

    def __init__(self, analysis: Attribution, items: List[dict], methods: List[str]):
        from reportgen.analyses._attribution_methods import MethodOptions
        from reportgen.analyses._faithfulness import steps_for
        cfg, ctx = analysis.cfg, analysis.ctx
        self.analysis, self.cfg, self.methods = analysis, cfg, methods
        self.device = ctx.device
        self.model = _Logits(ctx.model).eval()
        self.images01 = torch.stack([i["image"] for i in items]).float().div(255)  # (N, 3, H, W) on the CPU
        self.targets = torch.tensor([i["target"] for i in items])
        mean = torch.tensor(ctx.loaded.preprocess.mean).view(1, -1, 1, 1)
        std = torch.tensor(ctx.loaded.preprocess.std).view(1, -1, 1, 1)
        self.normalize: Callable[[torch.Tensor], torch.Tensor] = lambda x: (x - mean.to(x.device)) / std.to(x.device)
        height, width = self.images01.shape[-2:]
        self.step = steps_for(height, width, cfg.step)
        self.steps = -(-height * width // self.step)
        self.options = MethodOptions(n_steps=int(cfg.n_steps), baseline=str(cfg.baseline),
                                     internal_batch_size=int(cfg.batch_size), noise_samples=int(cfg.noise_samples),
                                     noise_std=float(cfg.noise_std), occlusion_window=int(cfg.occlusion_window),
                                     occlusion_stride=int(cfg.occlusion_stride), seed=int(cfg.seed))
        self.layer = None if analysis.layer is None else "model." + analysis.layer  # inside the _Logits wrapper
        self.sanity_count = min(int(cfg.sanity_images), len(items)) if cfg.sanity else 0
        self.road_count = 0 if not cfg.road else len(items) if cfg.road_images is None else min(
            int(cfg.road_images), len(items))
        self.blocks: List[str] = []
        if self.sanity_count:
            from reportgen.analyses._sanity import randomization_blocks
            self.blocks = randomization_blocks(ctx.model, self.inputs(slice(0, 1)))
        self.maps: Dict[str, np.ndarray] = {}
        self.curves: Dict[str, Dict[str, np.ndarray]] = {}
        self.randomization: Dict[str, Dict[str, List[dict]]] = {}

    def inputs(self, rows: slice) -> torch.Tensor:
        return self.normalize(self.images01[rows].to(self.device))

    def plan_text(self) -> str:
        """The extra forwards and backwards the settings need, said before the work starts."""
        from reportgen.analyses._faithfulness import forwards_needed
        count = len(self.images01)
        per_map = forwards_needed(*self.images01.shape[-2:], self.step)
        scored = len(self.methods) + 3  # the methods and the three controls
        planned = {m: _planned(m, self.options, *self.images01.shape[-2:]) for m in self.methods}
        curves = (per_map["deletion"] + per_map["insertion"]) * count + per_map["road"] * self.road_count
        forwards = sum(planned[m][0] for m in self.methods) * count + curves * scored
        backwards = sum(planned[m][1] for m in self.methods) * count
        steps = len(self.blocks) * len(self.cfg.sanity)
        sanity_f = steps * self.sanity_count * sum(planned[m][0] for m in self.methods)
        sanity_b = steps * self.sanity_count * sum(planned[m][1] for m in self.methods)
        return (f"Extra work for {count} images, {len(self.methods)} methods and 3 controls: about {forwards:,} "
                f"forwards and {backwards:,} backwards (maps, deletion, insertion"
                + (f", ROAD on {self.road_count}" if self.road_count else "")
                + f"), and {sanity_f:,} forwards and {sanity_b:,} backwards "
                f"for {steps} randomisation steps on {self.sanity_count} images (layer-dependent methods such as "
                f"Score-CAM: one forward per channel, counted as measured).")

    def run(self) -> Dict[str, Any]:
        from reportgen.analyses._attribution_methods import CONTROLS, control_maps
        costs = {}
        units = 2 * (len(self.methods) + len(CONTROLS)) + len(self.blocks) * len(self.cfg.sanity)
        with tqdm(total=units, desc="attribution", unit="step", disable=None, leave=False) as bar:
            for method in self.methods:
                self.maps[method], costs[method] = self._attribute(method, self.model, len(self.images01))
                bar.update()
            for kind in CONTROLS:
                self.maps[kind] = _as_saved(control_maps(kind, self.images01, int(self.cfg.seed)))
                bar.update()
            for name in self.maps:
                self.curves[name] = self._faithfulness(name)
                bar.update()
            self._sanity(bar)
        return self._results(costs)

    def _attribute(self, method: str, model: nn.Module, count: int) -> tuple:
        """(maps, cost) of `method` with `model` for the first `count` images of the sample."""
        from reportgen.analyses._attribution_methods import attribute
        chunks, forwards, backwards, deltas = [], 0, 0, []
        started = time.perf_counter()
        for start in range(0, count, int(self.cfg.batch_size)):
            rows = slice(start, min(start + int(self.cfg.batch_size), count))
            result = attribute(model, method, self.inputs(rows), self.targets[rows].to(self.device), self.options,
                               self.layer, self.analysis.layout)
            chunks.append(np.asarray(result.maps, dtype=np.float32))
            forwards, backwards = result.forwards, result.backwards
            if result.delta is not None:
                deltas.append(np.asarray(result.delta))
        cost = {"forwards": int(forwards), "backwards": int(backwards),
                "seconds": round(time.perf_counter() - started, 3)}
        if deltas:
            delta = np.abs(np.concatenate(deltas))
            cost["ig_delta_mean_abs"], cost["ig_delta_max_abs"] = float(delta.mean()), float(delta.max())
        return _as_saved(np.concatenate(chunks)), cost

    def _faithfulness(self, name: str) -> Dict[str, np.ndarray]:
        from reportgen.analyses._faithfulness import deletion_insertion, road
        forward = self._forward
        maps = torch.from_numpy(self.maps[name])
        curves: Dict[str, np.ndarray] = {}
        for start in range(0, len(self.images01), int(self.cfg.batch_size)):
            rows = slice(start, start + int(self.cfg.batch_size))
            part = deletion_insertion(forward, self.inputs(rows), maps[rows].to(self.device),
                                      self.targets[rows].to(self.device), self.step, int(self.cfg.batch_size))
            if start < self.road_count:
                rows = slice(start, min(start + int(self.cfg.batch_size), self.road_count))
                part.update(road(forward, self.images01[rows].to(self.device), self.normalize,
                                 maps[rows].to(self.device), self.targets[rows].to(self.device),
                                 seed=int(self.cfg.seed), batch_size=int(self.cfg.batch_size)))
            for key, value in part.items():
                curves.setdefault(key, []).append(np.asarray(value))
        return {key: np.concatenate(parts) for key, parts in curves.items()}

    @torch.no_grad()
    def _forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs)

    def _sanity(self, bar: tqdm) -> None:
        from reportgen.analyses._sanity import cascade, compare_to_original, randomized_copy
        count = self.sanity_count
        for order in (str(o) for o in self.cfg.sanity):
            rows: Dict[str, List[dict]] = {name: [] for name in self.maps}
            for step in cascade(self.blocks, order):
                copy = _Logits(randomized_copy(self.analysis.ctx.model, step.modules, int(self.cfg.seed))).eval()
                for name in self.maps:
                    if name in self.methods:
                        maps = self._attribute(name, copy, count)[0]
                    else:  # a control does not depend on the model: its maps are the same at every step
                        maps = self.maps[name][:count]
                    rows[name].append({"step": step.label, **compare_to_original(self.maps[name][:count], maps)})
                del copy
                bar.update()
            self.randomization[order] = rows

    def mean_curves(self, kind: str) -> List[tuple]:
        return [(name, curves[kind].mean(axis=0)) for name, curves in self.curves.items() if kind in curves]

    def randomization_curves(self) -> Dict[str, List[tuple]]:
        out = {}
        for order, rows in self.randomization.items():
            out[order] = [(name, np.linspace(0, 1, len(steps) + 1)[1:], [s["spearman"] for s in steps])
                          for name, steps in rows.items()]
        return out

    def _results(self, costs: Dict[str, dict]) -> Dict[str, Any]:
        from reportgen.analyses._faithfulness import auc, road_combined
        entries: Dict[str, Dict[str, Any]] = {}
        for name, curves in self.curves.items():
            entry: Dict[str, Any] = {
                "deletion_auc": float(auc(curves["deletion"].mean(axis=0))),
                "insertion_auc": float(auc(curves["insertion"].mean(axis=0))),
                "deletion_auc_per_image": auc(curves["deletion"]).tolist(),
                "insertion_auc_per_image": auc(curves["insertion"]).tolist(),
                "deletion_curve": curves["deletion"].mean(axis=0).tolist(),
                "insertion_curve": curves["insertion"].mean(axis=0).tolist(),
                "deletion_curves_per_image": np.round(curves["deletion"], 6).tolist(),
                "insertion_curves_per_image": np.round(curves["insertion"], 6).tolist()}
            if "morf" in curves:
                morf, lerf = curves["morf"].mean(axis=0), curves["lerf"].mean(axis=0)
                entry.update(road_morf=morf.tolist(), road_lerf=lerf.tolist(),
                             road=float(road_combined(morf[None], lerf[None])[0]))
            if self.randomization:
                entry["randomization"] = {order: rows[name] for order, rows in self.randomization.items()}
                top_down = self.randomization.get("top_down", {}).get(name)
                entry["sanity_last"] = float(top_down[-1]["spearman"]) if top_down else None
            if name in costs:
                entry["cost"] = costs[name]
            entries[name] = entry
        controls = {name: entries[name] for name in entries if name not in self.methods}
        methods = {name: entries[name] for name in self.methods}
        for entry in methods.values():
            entry["verdict"] = verdict(entry, controls)
        return {"settings": {"images": len(self.images01), "step": self.step, "steps": self.steps,
                             "road_images": self.road_count, "sanity_orders": [str(o) for o in self.cfg.sanity],
                             "sanity_images": self.sanity_count, "blocks": self.blocks, "layer": self.analysis.layer,
                             "n_steps": self.options.n_steps, "baseline": self.options.baseline,
                             "noise_samples": self.options.noise_samples, "noise_std": self.options.noise_std,
                             "seed": self.options.seed},
                "methods": methods, "controls": controls}


class _Logits(nn.Module):
    """The model as the methods need it: inputs -> (B, K) class scores, whatever the model returns."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return adapt_outputs("classification", self.model(inputs), len(inputs)).logits


def _planned(method: str, options: Any, height: int, width: int) -> tuple:
    """(forwards, backwards) per image a method needs with these options (Score-CAM / Ablation-CAM: one forward
    per channel, unknown before the layer is seen: counted as 1 here and as measured in the table)."""
    if method == "integrated_gradients":
        return options.n_steps + 2, options.n_steps  # + the convergence delta's two forwards
    if method in ("smoothgrad", "vargrad"):
        return options.noise_samples, options.noise_samples
    if method == "occlusion":
        window, stride = options.occlusion_window, options.occlusion_stride
        return ((height - window) // stride + 1) * ((width - window) // stride + 1) + 1, 0
    if method in ("eigencam", "scorecam", "ablationcam"):
        return 1, 0
    return 1, 1


def _as_saved(maps: np.ndarray) -> np.ndarray:
    """Maps rounded to float16, as attributions.npz keeps them, so the maps scored are exactly the maps saved."""
    return np.asarray(maps, dtype=np.float32).astype(np.float16).astype(np.float32)


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
