"""Merge shard runs into one report: `python -m reportgen.merge DIR... --out DIR`.

Each DIR is a run folder written with `runtime.shard=i/n` (or a folder holding such run folders, e.g. a Hydra
multirun sweep over `runtime.shard`). The shards must be the n slices of one config over one folder, each finished.
The merge loads the model and one image of the folder (the analyses' setup runs again, cheaply: one-image probes),
folds every shard's state in shard order, concatenates the per-image files in the folder's sorted order, and renders
the report a single process would have made (statistics equal to rounding, top-k and predictions exactly).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from reportgen.config.store import config_from_container
from reportgen.config.validate import validate
from reportgen.errors import ReportgenError, RunError
from reportgen.runs.folder_lock import folder_lock
from reportgen.runs.one_pass import begin_analyses, folder_example, restore_analyses
from reportgen.runs.pipeline import EXECUTION_KEYS, finish, finished_run, prepare
from reportgen.state.files import full_disk_named
from reportgen.state.run_state import STATE_FILE, RunState, config_differences, load_state, without_keys

log = logging.getLogger("reportgen")


def find_shards(dirs: Sequence[Path]) -> List[Path]:
    """The run folders among `dirs`: each DIR holding results/state.pt, else its subfolders that do."""
    found: List[Path] = []
    for folder in map(Path, dirs):
        if (folder / "results" / STATE_FILE).is_file():
            found.append(folder)
            continue
        children = sorted(p.parent.parent for p in folder.glob(f"*/results/{STATE_FILE}"))
        if not children:
            state = "does not exist" if not folder.exists() else f"has no results/{STATE_FILE}, nor do its subfolders"
            raise RunError(f"{folder} {state}: expected shard run folders (written with runtime.shard=i/n)")
        found.extend(children)
    return found


def load_shards(folders: Sequence[Path]) -> List[Tuple[Path, RunState]]:
    """Every shard's state without its analyses (reloaded one shard at a time by the merge, so memory holds one
    shard's galleries at most), checked to be the n finished slices of one config, sorted by shard index."""
    shards = []
    for folder in folders:
        state = load_state(folder / "results" / STATE_FILE)
        state.analyses = {}
        if state.shard is None:
            raise RunError(f"{folder} is an interrupted whole run, not a shard: rerun it to resume instead")
        if not state.complete:
            raise RunError(f"{folder} (shard {state.shard[0]}/{state.shard[1]}) is unfinished: {state.done} of "
                           f"{state.end - state.start} images done. Rerun its command: it resumes")
        shards.append((folder, state))
    counts = {state.shard[1] for _, state in shards}
    if len(counts) != 1:
        raise RunError(f"the shards split the folder differently: {sorted(counts)} parts")
    count = counts.pop()
    by_index: Dict[int, List[Path]] = {}
    for folder, state in shards:
        by_index.setdefault(state.shard[0], []).append(folder)
    twice = {i: [str(f) for f in fs] for i, fs in by_index.items() if len(fs) > 1}
    if twice:
        raise RunError(f"shards given more than once: {twice}")
    missing = [f"{i}/{count}" for i in range(count) if i not in by_index]
    if missing:
        raise RunError(f"missing shards {missing} of {count}; run them (runtime.shard=...) and merge again")
    shards.sort(key=lambda item: item[1].shard[0])
    first_folder, first = shards[0]
    for folder, state in shards[1:]:
        different = config_differences(first.config, state.config, EXECUTION_KEYS)
        if different:
            raise RunError(f"{folder} was run with a different config than {first_folder}: {'; '.join(different)}")
        if (state.found, state.folder) != (first.found, first.folder):
            raise RunError(f"{folder} saw other files in the folder than {first_folder} ({state.found} and "
                           f"{first.found} images)")
    return shards


def merge_runs(dirs: Sequence[Path], out_dir: Path) -> Path:
    """Merge the shards found in `dirs` into `out_dir`; returns the report's index.html."""
    started = time.perf_counter()
    timings: Dict[str, float] = {}
    shards = load_shards(find_shards(dirs))
    out_dir = Path(out_dir)
    with full_disk_named("the merged run's files", out_dir), folder_lock(out_dir):
        if finished_run(out_dir):
            raise RunError(f"{out_dir} already holds a finished run; choose another --out folder")
        return _merge_into(shards, out_dir, started, timings)


def _merge_into(shards: List[Tuple[Path, RunState]], out_dir: Path, started: float, timings: Dict[str, float]) -> Path:
    """Load the model and folder, set the analyses up on the folder's first images, fold in each shard, render."""
    states = [state for _, state in shards]  # bookkeeping only: counts, failures, notes, times
    cfg = config_from_container(states[0].config)
    cfg.runtime.shard, cfg.runtime.num_shards = None, None
    if not torch.cuda.is_available():
        cfg.runtime.device = "cpu"  # the merge runs one-image probes only; shards may have run on GPUs
    job = prepare(cfg, validate(cfg), out_dir, timings)
    if (len(job.scan.paths), job.scan.fingerprint()) != (states[0].found, states[0].folder):
        raise RunError(f"the folder now holds other files than the shards saw ({len(job.scan.paths)} images now, "
                       f"{states[0].found} then): it changed since they ran; run the shards again")
    started_probes = time.perf_counter()
    example = folder_example(job)
    if example is not None:
        begin_analyses(job.analyses, example)
        for folder, state in shards:
            if state.processed:  # a shard where nothing decoded never began its analyses: nothing to fold in
                restore_analyses(job.analyses, load_state(folder / "results" / STATE_FILE).analyses)
    timings["probes"] = time.perf_counter() - started_probes
    timings["pass"] = max(s.pass_seconds for s in states)
    log.info("merged %d shards: %d images", len(states), sum(s.processed for s in states))
    return finish(job, states, timings, started)


def merge_sweep(sweep_dir: Path) -> List[Path]:
    """At the end of a Hydra multirun: merge the shard jobs of each config into `<sweep>/merged` (`merged-2`, ...
    when the sweep ran several configs in shards). Groups with missing or failed shards are left, with a message
    saying how to merge them later. Returns the merged reports."""
    import json

    groups: Dict[str, List[Path]] = {}
    for manifest in sorted(Path(sweep_dir).glob("*/results/manifest.json")):
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if data.get("status") == "shard":
            config = data.get("config", {})
            key = json.dumps(without_keys(config, EXECUTION_KEYS), sort_keys=True)
            groups.setdefault(key, []).append(manifest.parent.parent)
    reports = []
    for number, folders in enumerate(groups.values(), start=1):
        out = Path(sweep_dir) / ("merged" if number == 1 else f"merged-{number}")
        if finished_run(out):  # the sweep was run again (requeued jobs): its merge is already there
            reports.append(out / "report" / "index.html")
            continue
        try:
            reports.append(merge_runs(folders, out))
        except (ReportgenError, ValueError) as exc:
            log.error("shards %s not merged: %s (merge them later: python -m reportgen.merge DIR... --out DIR)",
                      [f.name for f in folders], exc)
    return reports


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reportgen.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="shard run folders, or folders holding them")
    parser.add_argument("--out", type=Path, required=True, help="run folder for the merged report")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    try:
        index = merge_runs(args.dirs, args.out)
    except (ReportgenError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
