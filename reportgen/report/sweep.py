"""A comparison page for a sweep: one row per job, side-by-side key numbers and links to each report.

    python -m reportgen.index outputs/multirun/2026-11-29/10-31-02      # writes <DIR>/index.html

Also built automatically at the end of `python run.py -m ...` by the Hydra callback in
reportgen/hydra_callback.py. A job that failed (or never finished) is a row with its status and error; it does not
stop the page from being built.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from reportgen.report import plots
from reportgen.report.elements import Figure


@dataclass
class JobRow:
    """What the index shows of one job directory."""

    name: str  # the job folder's name (Hydra's job number)
    overrides: str  # the command-line overrides of this job
    status: str  # ok | failed | incomplete | shard (a slice, merged elsewhere)
    error: str = ""
    report: Optional[str] = None  # relative link to the job's report/index.html
    model: str = ""
    weights: str = ""
    params: Optional[int] = None
    flops: Optional[int] = None
    images: Optional[int] = None
    failed_files: Optional[int] = None
    images_per_second: Optional[float] = None
    top1: Optional[float] = None
    per_class: Dict[str, float] = field(default_factory=dict)


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _overrides(job: Path, manifest: Optional[Dict[str, Any]]) -> str:
    hydra_overrides = job / ".hydra" / "overrides.yaml"
    if hydra_overrides.is_file():
        lines = [line[2:].strip() for line in hydra_overrides.read_text(encoding="utf-8").splitlines()
                 if line.startswith("- ")]
        return " ".join(lines)
    if manifest and manifest.get("command"):
        return str(manifest["command"]).replace("python run.py", "").strip()
    return ""


def collect_jobs(sweep_dir: Path) -> List[JobRow]:
    """A row for every job folder (a folder holding `.hydra/` or `results/`), in natural order of the names."""
    jobs = [p for p in sweep_dir.iterdir() if p.is_dir() and ((p / ".hydra").is_dir() or (p / "results").is_dir())]
    jobs.sort(key=lambda p: (0, int(p.name)) if p.name.isdigit() else (1, p.name))
    rows = []
    for job in jobs:
        manifest = _read_json(job / "results" / "manifest.json")
        row = JobRow(name=job.name, overrides=_overrides(job, manifest), status="incomplete",
                     error="no results/manifest.json: the job did not finish (killed, or still running)")
        if manifest is not None:
            row.status = str(manifest.get("status", "incomplete"))
            row.error = str(manifest.get("error", ""))
            if row.status == "shard":
                index, count = manifest.get("shard", ["?", "?"])
                row.error = f"slice {index}/{count} of the folder: its report is the merge of all {count} slices"
            model = manifest.get("model", {})
            row.model, row.weights = model.get("name", ""), model.get("weights", "")
            counts = manifest.get("counts", {})
            row.images, row.failed_files = counts.get("processed"), counts.get("failed")
            row.images_per_second = manifest.get("images_per_second")
            if not row.model:
                config_model = manifest.get("config", {}).get("model", {})
                row.model = config_model.get("name") or config_model.get("arch") or str(config_model.get("source"))
        summary = _read_json(job / "results" / "summary.json") or {}
        row.params, row.flops = summary.get("params"), summary.get("flops_per_image")
        predictions = _read_json(job / "results" / "predictions.json") or {}
        row.top1 = predictions.get("top1_accuracy")
        row.per_class = predictions.get("per_class_accuracy") or {}
        if (job / "report" / "index.html").is_file():
            row.report = f"{job.name}/report/index.html"
        rows.append(row)
    return rows


def per_class_figure(rows: List[JobRow]) -> Optional[Figure]:
    """Grouped bars: per-class accuracy of every finished job, side by side."""
    with_classes = [r for r in rows if r.per_class]
    if not with_classes:
        return None
    classes = sorted({c for r in with_classes for c in r.per_class})
    values = np.array([[r.per_class.get(c, np.nan) for c in classes] for r in with_classes])  # (jobs, classes)
    labels = [f"#{r.name} {r.model}" for r in with_classes]
    return plots.grouped_bars(values, labels, classes, name="per_class_accuracy", ylabel="top-1 accuracy",
                              caption="Per-class top-1 accuracy by job")


DEAD_ZERO_FRACTION = 0.99  # as the activations analysis's default: a channel that is 0 this often is dead


def dead_fraction_by_layer(stats_csv: Path) -> List[float]:
    """Fraction of dead channels per layer, in the file's (depth) order, from results/activation_stats.csv."""
    import csv

    layers: Dict[str, List[float]] = {}
    with open(stats_csv, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            layers.setdefault(row["layer"], []).append(float(row["frac_zero"]))
    return [float(np.mean(np.asarray(v) >= DEAD_ZERO_FRACTION)) for v in layers.values()]


def dead_channels_figure(sweep_dir: Path, rows: List[JobRow]) -> Optional[Figure]:
    """Lines: dead-channel fraction by analysed layer (in depth order) for every job that ran `activations`."""
    series = []
    for row in rows:
        stats = sweep_dir / row.name / "results" / "activation_stats.csv"
        if row.status == "ok" and stats.is_file():
            series.append((f"#{row.name} {row.model}", dead_fraction_by_layer(stats)))
    if not series:
        return None
    depth = max(len(values) for _, values in series)
    padded = [(label, values + [float("nan")] * (depth - len(values))) for label, values in series]
    return plots.fraction_lines([f"layer {i + 1}" for i in range(depth)], padded, name="dead_channels",
                                ylabel="dead channels",
                                caption=f"Dead channels (zero in ≥ {DEAD_ZERO_FRACTION:.0%} of positions) by analysed "
                                        f"layer, shallow to deep, per job")


def build_index(sweep_dir: Path) -> Path:
    """Write `<sweep_dir>/index.html`; returns its path."""
    from reportgen.report.render import render_index

    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep folder {sweep_dir} does not exist")
    rows = collect_jobs(sweep_dir)
    figures = [f for f in (per_class_figure(rows), dead_channels_figure(sweep_dir, rows)) if f is not None]
    shared = shared_overrides(rows)
    comparison = "comparison/index.html" if (sweep_dir / "comparison" / "index.html").is_file() else None
    return render_index(sweep_dir, rows, figures, shared_overrides=" ".join(shared), comparison=comparison)


def shared_overrides(rows: List[JobRow]) -> List[str]:
    """The overrides every job has: said once above the table, and left out of each row (which keeps the ones
    that tell the jobs apart), so the table fits the page."""
    if len(rows) < 2:
        return []
    words = [row.overrides.split() for row in rows]
    shared = [w for w in words[0] if all(w in other for other in words[1:])]
    for row, own in zip(rows, words):
        row.overrides = " ".join(w for w in own if w not in shared)
    return shared


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reportgen.index", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun folder (outputs/multirun/<date>/<time>)")
    args = parser.parse_args(argv)
    try:
        path = build_index(args.sweep_dir)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"index: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
