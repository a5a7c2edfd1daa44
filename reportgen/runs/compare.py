"""Comparing finished runs over one image folder: which model is better and is it real, where they disagree, what
changed between two checkpoints. Classifier runs are compared with classifier runs, segmentation runs with
segmentation runs (per-class IoU and a per-image sign test), detection runs with detection runs (COCO metrics,
per-class AP and a per-image sign test of the errors); mixing them is an error naming each run's task.
Built at the end of every multirun (runs/hydra_callback.py) and by

    python -m reportgen.compare RUN_DIR... --out DIR

A RUN_DIR is a run folder (holding results/manifest.json) or a folder of them (a sweep: its job folders in order;
shard jobs are left to their merge). Failed or unfinished runs are listed on the page, not compared.

The weight change of checkpoints of one architecture needs the weights themselves: each run's model is rebuilt
from the composed config in its manifest (the same loader the run used), since results/weights.csv only holds
per-tensor statistics (norms bound ‖W_b − W_a‖ but do not give it).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from reportgen.errors import ReportgenError, RunError
from reportgen.report.compare_data import (NotCompared, RunResults, WeightChange, compare, load_run,
                                           relative_weight_change)
from reportgen.report.compare_page import write_comparison

log = logging.getLogger("reportgen")


def _is_run(folder: Path) -> bool:
    return (folder / "results").is_dir() or (folder / ".hydra").is_dir()


def _natural(folder: Path):
    return (0, int(folder.name), "") if folder.name.isdigit() else (1, 0, folder.name)


def run_folders(paths: Sequence[Path]) -> List[Path]:
    """The run folders named by `paths`: each one itself, or the job folders inside it (in natural order)."""
    found: List[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise RunError(f"{path} is not a folder: pass run folders (with results/) or a sweep folder")
        if (path / "results").is_dir():
            found.append(path)
            continue
        jobs = sorted((p for p in path.iterdir() if p.is_dir() and _is_run(p)), key=_natural)
        if not jobs:
            raise RunError(f"{path} holds no run folder (a folder with results/manifest.json)")
        found.extend(jobs)
    return list(dict.fromkeys(p.resolve() for p in found))


def load_runs(folders: Sequence[Path]) -> Tuple[List[RunResults], List[NotCompared]]:
    """The finished runs, and the others with the reason they are left out."""
    runs, left_out = [], []
    for folder in folders:
        manifest_path = folder / "results" / "manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            left_out.append(NotCompared(folder, "incomplete", "no results/manifest.json: the job did not finish"))
            continue
        status = str(manifest.get("status", "?"))
        if status == "shard":
            continue  # a slice of a folder: its merge is the run to compare
        if status != "ok":
            left_out.append(NotCompared(folder, status, str(manifest.get("error") or "see its run.log"),
                                        command=str(manifest.get("command", ""))))
            continue
        try:
            runs.append(load_run(folder))
        except RunError as exc:
            left_out.append(NotCompared(folder, str(status), str(exc)))
    return runs, left_out


def _state_dict(run: RunResults) -> Dict[str, object]:
    """The run's model parameters as float64 numpy arrays, rebuilt from its manifest's composed config."""
    from reportgen.config.store import config_from_container
    from reportgen.inputs.models import load_model

    cfg = config_from_container(run.config)
    module = load_model(cfg.model).module
    return {name: p.detach().double().numpy() for name, p in module.named_parameters()}


def _weight_shapes(run: RunResults) -> Optional[Tuple]:
    """Every weight tensor's (layer, param, shape) from results/weights.csv, or None when the run has no such file."""
    path = run.run_dir / "results" / "weights.csv"
    if not path.is_file():
        return None
    import pandas as pd

    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    return tuple(zip(table["layer"], table["param"], table["shape"]))


def weight_changes(runs: Sequence[RunResults]) -> List[WeightChange]:
    """For each run, the relative change of every parameter tensor since the previous run of its architecture (in
    the order given, e.g. ep10 → ep20 → ep30): same model class and, where both runs wrote results/weights.csv,
    the same tensor names and shapes. A model that cannot be rebuilt gets a note instead."""
    changes: List[WeightChange] = []
    cache: Dict[str, Dict[str, object]] = {}
    previous: Dict[str, RunResults] = {}  # model class -> the last run of it

    def weights(run: RunResults) -> Dict[str, object]:
        if run.name not in cache:
            if len(cache) >= 2:  # at most the pair in hand stays in memory
                del cache[next(iter(cache))]
            cache[run.name] = _state_dict(run)
        return cache[run.name]

    for b in runs:
        model = b.manifest.get("model", {}).get("name")
        a = previous.get(model) if model else None
        if model:
            previous[model] = b
        if a is None:
            continue
        shapes_a, shapes_b = _weight_shapes(a), _weight_shapes(b)
        if shapes_a is not None and shapes_b is not None and shapes_a != shapes_b:
            continue  # one class name, different layers (e.g. another depth or head): not checkpoints of one model
        change = WeightChange(a=a.name, b=b.name)
        try:
            change.rows = relative_weight_change(weights(a), weights(b))
            if not change.rows:
                change.note = "the two models share no parameter tensor of the same shape"
        except (ReportgenError, OSError, RuntimeError) as exc:
            change.note = f"could not rebuild the models to compare their weights: {type(exc).__name__}: {exc}"
        changes.append(change)
    return changes


def compare_loaded(runs: List[RunResults], left_out: Sequence[NotCompared], out_dir: Path,
                   gallery_size: int = 24) -> Path:
    """Compare loaded runs and write the page and files into `out_dir`; returns the page's path."""
    comparison = compare(runs, left_out, gallery_size=gallery_size)  # Comparison, Segmentation- or DetectionComparison
    comparison.weight_changes = weight_changes(comparison.runs)
    return write_comparison(comparison, out_dir)


def compare_runs(paths: Sequence[Path], out_dir: Path, gallery_size: int = 24) -> Path:
    """Compare the runs in `paths` (run folders or folders of them); returns the page's path."""
    runs, left_out = load_runs(run_folders(paths))
    return compare_loaded(runs, left_out, out_dir, gallery_size=gallery_size)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reportgen.compare",
                                     description="Compare finished runs over one image folder: one static page.")
    parser.add_argument("runs", nargs="+", type=Path, help="run folders, or sweep folders holding them")
    parser.add_argument("--out", type=Path, required=True, help="folder for index.html, comparison.json/.csv")
    parser.add_argument("--gallery-size", type=int, default=24, help="disagreeing images shown (default 24)")
    args = parser.parse_args(argv)
    try:
        page = compare_runs(args.runs, args.out, gallery_size=args.gallery_size)
    except ReportgenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"comparison: {page}")
    return 0
