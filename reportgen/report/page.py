"""The report page of a run, assembled from its analyses' sections and what the pass saw: title, banners, the
alerts block (the run's and every section's, errors first), the overview and the reproducing command.

Data only: render.py turns the Page into HTML.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
from omegaconf import DictConfig

from reportgen.inputs.data import ScanResult
from reportgen.inputs.labels import folder_display_names
from reportgen.inputs.models import LoadedModel
from reportgen.report.elements import Alert, KeyValues, Page, Section
from reportgen.report.manifest import command_line, library_versions, reportgen_version


@dataclass
class PassOutcome:
    """What the pass (or every shard's pass together) produced, beside the analyses' own sections."""

    processed: int  # images that went through the model
    failed: List[Tuple[str, str]]  # (path, reason) of files found but not processed
    timings: Dict[str, float]  # stage -> seconds
    throughput: float  # images per second over the pass
    capture_notes: Dict[str, str] = field(default_factory=dict)  # call key -> what was captured of an odd output
    warnings: List[str] = field(default_factory=list)
    shards: int = 1  # slices merged into this page


def build_page(cfg: DictConfig, loaded: LoadedModel, scan: ScanResult, root: Path, device: torch.device,
               outcome: PassOutcome, sections: List[Section]) -> Page:
    """The page of a finished run: title, random-weights banner, every alert (the run's and each section's,
    errors first), the overview table, library versions and the reproducing command, then the sections."""
    processed, failed, timings, throughput = outcome.processed, outcome.failed, outcome.timings, outcome.throughput
    capture_notes, warnings, shards = outcome.capture_notes, outcome.warnings, outcome.shards
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
    for warning in warnings:
        alerts.append(Alert("warning", warning))
    for note in loaded.notes:
        alerts.append(Alert("info", note))
    if capture_notes:
        alerts.append(Alert("info", "Some layer outputs were not plain tensors; what was captured:",
                            details=[f"{k}: {v}" for k, v in sorted(capture_notes.items())]))
    for section in sections:
        for alert in section.alerts:
            alerts.append(Alert(alert.level, f"{section.title}: {alert.message}", alert.details))
    alerts.sort(key=lambda a: {"error": 0, "warning": 1, "info": 2}.get(a.level, 3))
    precision = enum_name(cfg.runtime.precision)
    overview = KeyValues([
        ("model", f"{loaded.name} ({loaded.source})"), ("weights", loaded.weights),
        ("task", f"{loaded.task} ({loaded.task_reason})" if loaded.task else "classification"),
        *([("embedding", loaded.pooling)] if loaded.pooling else []),
        *([("zero-shot prompts", "; ".join(loaded.zero_shot.get("prompts", [])))] if loaded.zero_shot else []),
        ("model classes", len(loaded.class_names) or ("none (a backbone)" if loaded.task == "embedding"
                                                       else "unnamed")),
        ("dataset", str(dataset_label)),
        ("images", f"{processed} processed, {len(failed)} failed, {len(scan.paths)} found"),
        ("folder classes", ", ".join(folder_display_names(scan.class_names, loaded.class_names, loaded.synsets))
         if scan.class_names else "none (unlabelled)"),
        ("input", loaded.preprocess.summary()),
        ("device", f"{device} ({precision}, batch {cfg.runtime.batch_size}, {cfg.runtime.num_workers} workers)"),
        ("throughput", f"{throughput:.1f} images/s over the pass"
                       + (f" ({shards} shards side by side, timed by the slowest)" if shards > 1 else "")),
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


def enum_name(value: Any) -> str:
    return value.name if hasattr(value, "name") else str(value)

