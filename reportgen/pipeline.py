"""`run(cfg) -> Path`: validate, load, one hooked pass over the folder feeding every analysis, render.

The loop is the only place that touches batches: decode in workers -> device (non-blocking from pinned memory)
-> normalise -> forward (inference_mode, or grad-enabled with frozen parameters when an analysis needs gradients)
-> every analysis's `update`. Analyses keep bounded state; figures are made only in `finalize`.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from reportgen.analyses import Analysis, Batch, RunContext, get_analysis
from reportgen.capture import CaptureEngine, primary_tensor
from reportgen.config import ConfigError, Precision, to_container
from reportgen.data import ImageFolderDataset, RawBatch, ScanResult, make_loader, scan_folder
from reportgen.models import LoadedModel, load_model
from reportgen.render import render_report
from reportgen.report import Alert, KeyValues, Page, Section
from reportgen.results import library_versions, write_failed, write_json
from reportgen.validate import resolve_dataset_root, select_device, validate

log = logging.getLogger("reportgen")
_DTYPES = {Precision.fp32: torch.float32, Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}


class RunError(RuntimeError):
    """The pass could not complete (e.g. the model's forward raised); names the files of the failing batch."""


def run(cfg: DictConfig, out_dir: Optional[Path] = None) -> Path:
    """Produce `<out_dir>/report/index.html` and `<out_dir>/results/`; returns the index.html path."""
    started = time.perf_counter()
    timings: Dict[str, float] = {}
    analysis_cfgs = validate(cfg)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir()
    if _finished_run(out_dir):
        raise RunError(f"{out_dir} already holds a finished run; choose another output folder "
                       f"(hydra.run.dir=...) rather than overwrite it")
    results_dir = out_dir / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(int(cfg.runtime.seed))
    device = select_device(cfg.runtime.device)

    with _timed(timings, "scan"):
        root = resolve_dataset_root(cfg.dataset)
        scan = scan_folder(root, list(cfg.dataset.extensions), cfg.dataset.labels, cfg.dataset.limit)
        if not scan.paths:
            raise RunError(f"no image files under {root} (extensions {list(cfg.dataset.extensions)}, "
                           f"case-insensitive; hidden files skipped); check dataset.root and dataset.extensions")
    log.info("scan: %d images, %d classes in %s", len(scan.paths), len(scan.class_names), root)

    with _timed(timings, "model"):
        loaded = load_model(cfg.model)
        model = loaded.module.to(device)
        if cfg.runtime.channels_last:
            model = model.to(memory_format=torch.channels_last)
    log.info("model: %s (%s)", loaded.name, loaded.weights)

    ctx = RunContext(model=model, loaded=loaded, dataset_classes=scan.class_names, num_images=len(scan.paths),
                     device=device, results_dir=results_dir, report=cfg.report)
    analyses: List[Analysis] = [get_analysis(name)(acfg, ctx) for name, acfg in analysis_cfgs.items()]
    failed: List[Tuple[str, str]] = list(scan.skipped)
    if failed and cfg.runtime.strict:
        raise RunError(f"runtime.strict=true and {failed[0][0]} was skipped: {failed[0][1]}")

    with _timed(timings, "pass"):
        processed, capture_notes, probe_seconds = _one_pass(cfg, scan, loaded, model, device, analyses, failed)
    timings["probes"] = probe_seconds  # one-time: FLOP count, layer probes, graphs (not per image)
    timings["pass"] -= probe_seconds
    throughput = processed / max(timings["pass"], 1e-9)
    log.info("pass: %d images in %.1f s (%.1f images/s), %d failed", processed, timings["pass"], throughput,
             len(failed))

    with _timed(timings, "finalize"):
        sections = [s for s in (a.finalize() for a in analyses) if s is not None]
    write_failed(results_dir / "failed.csv", failed)
    page = _page(cfg, loaded, scan, root, device, processed, failed, timings, throughput, sections, capture_notes)
    with _timed(timings, "render"):
        index = render_report(page, out_dir / "report", str(cfg.report.image_format), bool(cfg.report.single_file))
    timings["total"] = time.perf_counter() - started
    write_json(results_dir / "manifest.json", {
        "status": "ok", "reportgen": reportgen_version(), "command": command_line(),
        "config": to_container(cfg), "versions": library_versions(),
        "counts": {"found": len(scan.paths), "processed": processed, "failed": len(failed),
                   "classes": len(scan.class_names)},
        "model": {"name": loaded.name, "source": loaded.source, "weights": loaded.weights,
                  "random_init": loaded.random_init, "num_class_names": len(loaded.class_names)},
        "device": str(device), "precision": _enum_name(cfg.runtime.precision),
        "images_per_second": throughput, "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "report": index.relative_to(out_dir).as_posix(),
    })
    log.info("report: %s (total %.1f s)", index, timings["total"])
    return index


def record_failure(cfg: DictConfig, exc: BaseException, out_dir: Optional[Path] = None) -> None:
    """Write `results/manifest.json` with status "failed" and the error, so a sweep index can show the job."""
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir()
    (out_dir / "results").mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "results" / "manifest.json", {
        "status": "failed", "error": f"{type(exc).__name__}: {exc}", "reportgen": reportgen_version(),
        "command": command_line(), "config": to_container(cfg), "versions": library_versions(),
    })


def _one_pass(cfg: DictConfig, scan: ScanResult, loaded: LoadedModel, model: torch.nn.Module,
              device: torch.device, analyses: List[Analysis], failed: List[Tuple[str, str]]):
    """Iterate the loader once; returns (images processed, capture notes, seconds spent in analyses' `begin`)."""
    runtime = cfg.runtime
    dataset = ImageFolderDataset(scan, loaded.preprocess, max_pixels=int(cfg.dataset.max_pixels))
    loader = make_loader(dataset, int(runtime.batch_size), int(runtime.num_workers), pin_memory=device.type == "cuda")
    precision = Precision(_enum_name(runtime.precision))
    labels_lookup = torch.tensor(scan.labels + [-1], dtype=torch.int64)
    processed = 0
    notes: Dict[str, str] = {}
    progress = tqdm(total=len(dataset), unit="img", disable=not runtime.progress, file=sys.stderr,
                    desc="reportgen", dynamic_ncols=True)
    batches = iter(loader)
    try:
        strict = bool(runtime.strict)
        first = _next_good_batch(batches, scan, failed, progress, strict)
        if first is None:
            return 0, notes, 0.0
        first_batch = _to_batch(first, scan, loaded, device, labels_lookup, runtime.channels_last)
        probe_started = time.perf_counter()
        for analysis in analyses:
            try:
                analysis.begin(first_batch)
            except (ConfigError, RunError):
                raise
            except Exception as exc:  # probes run the model: its errors must name the files, as in the pass
                raise RunError(f"analysis '{analysis.name}' failed while probing the model with the first batch "
                               f"(files {first_batch.paths}): {type(exc).__name__}: {exc}") from exc
        probe_seconds = time.perf_counter() - probe_started
        requirements = [a.requires() for a in analyses]  # after begin: defaults may depend on a probe forward
        activations = [n for r in requirements for n in r.activations]
        gradients = [n for r in requirements for n in r.gradients]
        attention = [n for r in requirements for n in r.attention]
        with CaptureEngine(model, activations, gradients, attention) as engine:
            raw: Optional[RawBatch] = first
            batch: Optional[Batch] = first_batch
            while raw is not None:
                if batch is None:
                    batch = _to_batch(raw, scan, loaded, device, labels_lookup, runtime.channels_last)
                captures = engine.start_batch()
                grad_mode = torch.enable_grad() if engine.needs_grad else torch.inference_mode()
                with grad_mode:
                    try:
                        with torch.autocast(device.type, dtype=_DTYPES[precision],
                                            enabled=precision is not Precision.fp32):
                            logits = primary_tensor(model(batch.inputs))
                    except Exception as exc:
                        raise RunError(f"the model's forward raised on the batch of files {batch.paths}: "
                                       f"{type(exc).__name__}: {exc}") from exc
                    if logits is None or logits.dim() != 2:
                        raise RunError(f"expected the model to return logits of shape (batch, classes), got "
                                       f"{None if logits is None else tuple(logits.shape)}")
                    for analysis in analyses:
                        analysis.update(batch, logits, captures)
                notes.update(captures.notes)
                processed += len(batch.paths)
                progress.update(len(batch.paths))
                raw = _next_good_batch(batches, scan, failed, progress, strict)
                batch = None
    finally:
        progress.close()
    return processed, notes, probe_seconds


def _next_good_batch(batches, scan: ScanResult, failed: List[Tuple[str, str]], progress,
                     strict: bool = False) -> Optional[RawBatch]:
    """Next batch with at least one decoded image; failures of every batch go to the ledger (or, with
    runtime.strict, stop the run)."""
    for raw in batches:
        if strict and raw.failed:
            index, reason = raw.failed[0]
            raise RunError(f"runtime.strict=true and {scan.paths[index]} could not be read: {reason}")
        for index, reason in raw.failed:
            failed.append((scan.paths[index], reason))
            log.warning("skipped %s: %s", scan.paths[index], reason)
        progress.update(len(raw.failed))
        if len(raw.indices):
            return raw
    return None


def _to_batch(raw: RawBatch, scan: ScanResult, loaded: LoadedModel, device: torch.device,
              labels_lookup: torch.Tensor, channels_last: bool) -> Batch:
    non_blocking = device.type == "cuda"
    images = raw.images.to(device, non_blocking=non_blocking)  # (B, 3, H, W) uint8
    inputs = loaded.preprocess.normalize(images)  # (B, 3, H, W) float32 on device
    if channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    labels = labels_lookup[raw.indices].to(device, non_blocking=non_blocking)  # (B,)
    return Batch(indices=raw.indices, paths=[scan.paths[i] for i in raw.indices.tolist()], images=raw.images,
                 inputs=inputs, labels=labels)


def _page(cfg, loaded: LoadedModel, scan: ScanResult, root: Path, device: torch.device, processed: int,
          failed: List[Tuple[str, str]], timings: Dict[str, float], throughput: float, sections: List[Section],
          capture_notes: Dict[str, str]) -> Page:
    # the page is shared: it names the folder, not where it lies on this machine (results/manifest.json has that)
    dataset_label = (Path(str(cfg.dataset.root)).resolve().name if cfg.dataset.root
                     else f"demo folder ({cfg.dataset.synthetic}, generated)")
    title = cfg.report.title or f"{loaded.name} on {dataset_label}"
    banners, alerts = [], []
    if loaded.random_init:
        banners.append("Random weights: this model was not trained, so its predictions and attributions mean "
                       "nothing. Set model.weights (or a checkpoint) for a meaningful report.")
        alerts.append(Alert("warning", "The model has random (untrained) weights."))
    if failed:
        alerts.append(Alert("error", f"{len(failed)} of {len(scan.paths)} files could not be read and were "
                                     f"skipped (listed in results/failed.csv)",
                            details=[f"{path} — {reason}" for path, reason in failed]))
    for note in loaded.notes:
        alerts.append(Alert("info", note))
    if capture_notes:
        alerts.append(Alert("info", "Some layer outputs were not plain tensors; what was captured:",
                            details=[f"{k}: {v}" for k, v in sorted(capture_notes.items())]))
    for section in sections:
        for alert in section.alerts:
            alerts.append(Alert(alert.level, f"{section.title}: {alert.message}", alert.details))
    alerts.sort(key=lambda a: {"error": 0, "warning": 1, "info": 2}.get(a.level, 3))
    precision = _enum_name(cfg.runtime.precision)
    overview = KeyValues([
        ("model", f"{loaded.name} ({loaded.source})"), ("weights", loaded.weights),
        ("model classes", len(loaded.class_names) or "unnamed"),
        ("dataset", str(dataset_label)),
        ("images", f"{processed} processed, {len(failed)} failed, {len(scan.paths)} found"),
        ("folder classes", ", ".join(scan.class_names) if scan.class_names else "none (unlabelled)"),
        ("input", f"resize {loaded.preprocess.resize}, crop {loaded.preprocess.crop}, mean "
                  f"{list(loaded.preprocess.mean)}, std {list(loaded.preprocess.std)}"),
        ("device", f"{device} ({precision}, batch {cfg.runtime.batch_size}, {cfg.runtime.num_workers} workers)"),
        ("throughput", f"{throughput:.1f} images/s over the pass"),
        ("time", ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())),
        ("analyses", ", ".join(cfg.analysis.keys())),
    ])
    versions = KeyValues(sorted(library_versions().items()))
    return Page(title=title, subtitle=f"{processed} images · {loaded.name} · {loaded.weights}", overview=overview,
                versions=versions, command=_without_machine_paths(command_line(), root),
                generated=dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S"), version=reportgen_version(),
                banners=banners, alerts=alerts, sections=sections)


def _without_machine_paths(text: str, root: Path) -> str:
    """The command as shown in a shared page: the dataset folder's absolute path shortened to its name."""
    for form in {str(root), str(root.resolve())}:
        text = text.replace(form, f".../{root.resolve().name}")
    return text


def _finished_run(out_dir: Path) -> bool:
    """True when `out_dir` already holds a successful run's manifest (never overwrite a finished report)."""
    try:
        return json.loads((out_dir / "results" / "manifest.json").read_text())["status"] == "ok"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def default_out_dir() -> Path:
    """Hydra's run directory when running under Hydra, else outputs/<date>/<time> (never chdir)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # not under @hydra.main (tests, notebooks)
        now = dt.datetime.now()
        return Path("outputs") / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S-%f")


def command_line() -> str:
    """The command that reproduces this run (Hydra's overrides when under Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
        return " ".join(["python run.py", *overrides])
    except Exception:
        return " ".join(["python", *sys.argv])


def reportgen_version() -> str:
    try:
        from importlib.metadata import version

        return version("reportgen")
    except Exception:
        return "dev"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _enum_name(value: Any) -> str:
    return value.name if hasattr(value, "name") else str(value)


class _timed:
    """Context manager adding the elapsed seconds of a stage to `timings[name]`."""

    def __init__(self, timings: Dict[str, float], name: str):
        self.timings, self.name = timings, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.timings[self.name] = self.timings.get(self.name, 0.0) + time.perf_counter() - self.start
