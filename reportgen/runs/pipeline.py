"""`run(cfg) -> Path`: validate, load, one hooked pass over the folder feeding every analysis, render.

The pass itself is in one_pass.py (decode in workers -> device -> forward -> every analysis's `update`, with
checkpoints). This module decides what a run is: a whole run (renders the report), a shard (`runtime.shard=i/n`:
saves its mergeable state for `python -m reportgen.merge`), one rank's shard under torchrun (launch.py, distributed.py), or the
continuation of an interrupted run found in the same folder. Analyses keep bounded state; figures are made only in
`finalize`.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from omegaconf import DictConfig

from reportgen.analyses import Analysis, RunContext
from reportgen.analyses.base import (NotApplicable, SwitchedOff, build_analysis, finalize_order,
                                     not_applicable_section)
from reportgen.config.schema import to_container
from reportgen.config.validate import resolve_dataset_root, select_device, validate
from reportgen.errors import RunError
from reportgen.inputs.data import scan_folder
from reportgen.inputs.models import load_model
from reportgen.inputs.shards import runtime_shard, shard_bounds
from reportgen.inputs.tasks import decide_task, resizes_inside
from reportgen.report.manifest import write_manifest
from reportgen.report.page import PassOutcome, build_page, enum_name
from reportgen.report.render import render_report
from reportgen.runs.folder_lock import folder_lock
from reportgen.runs.job import Job
from reportgen.runs.one_pass import raising_module, run_pass, save_checkpoint, stops_the_run, switch_off
from reportgen.state.files import DiskFullError, full_disk_named, write_failed
from reportgen.state.run_state import STATE_FILE, RunState, config_differences, load_state
from reportgen.state.streams import remove_stream_folders

log = logging.getLogger("reportgen")
__all__ = ["run", "prepare", "finish", "record_failure"]

# runtime keys that change how a run executes, not what it computes: a run may resume or merge across them
EXECUTION_KEYS = ("runtime.progress", "runtime.num_workers", "runtime.resume", "runtime.checkpoint_every",
                  "runtime.batch_size", "runtime.device", "runtime.shard",
                  "runtime.num_shards")


def run(cfg: DictConfig, out_dir: Optional[Path] = None) -> Path:
    """Produce `<out_dir>/report/index.html` and `<out_dir>/results/`; returns the index.html path.

    With `runtime.shard=i/n`, only that slice is processed and `<out_dir>/results/state.pt` is returned instead.
    Under torchrun, runs/launch.py calls this once per rank with that rank's shard."""
    started = time.perf_counter()
    timings: Dict[str, float] = {}
    analysis_cfgs = validate(cfg)
    shard = runtime_shard(cfg.runtime)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir()
    with full_disk_named("the run's files", out_dir), folder_lock(out_dir):
        if finished_run(out_dir):
            return already_finished(cfg, out_dir)
        job = prepare(cfg, analysis_cfgs, out_dir, timings, shard)
        state = _resume_or_start(job)
        timings["probes"] = run_pass(job, state)  # one-time: FLOP count, layer probes, graphs (not per image)
        timings["pass"] = state.pass_seconds
        log.info("pass: %d images in %.1f s (%.1f images/s), %d failed", state.processed, state.pass_seconds,
                 state.processed / max(state.pass_seconds, 1e-9), len(state.failed))
        if shard is not None:
            return _save_shard(job, state, timings, started)
        if int(cfg.runtime.checkpoint_every):
            save_checkpoint(job, state)  # complete: a crash while finalizing or rendering resumes right here
        return finish(job, [state], timings, started)


def prepare(cfg: DictConfig, analysis_cfgs: Dict[str, Any], out_dir: Path, timings: Dict[str, float],
            shard: Optional[Tuple[int, int]] = None) -> Job:
    """Scan the folder, load the model onto its device, build the analyses (nothing runs the model yet)."""
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
    if scan.skipped and cfg.runtime.strict:
        raise RunError(f"runtime.strict=true and {scan.skipped[0][0]} was skipped: {scan.skipped[0][1]}")
    with _timed(timings, "model"):
        loaded = load_model(cfg.model, scan.class_names)
        model = loaded.module.to(device)
        if cfg.runtime.channels_last:
            model = model.to(memory_format=torch.channels_last)
        blank = torch.zeros(2, loaded.preprocess.channels, loaded.preprocess.crop, loaded.preprocess.crop,
                            device=device)  # (2, C, H, W): two images, so the batch dimension shows
        loaded.task, loaded.task_reason = decide_task(cfg.model.task, loaded, model, blank)
        if loaded.task == "segmentation":  # every labelled pixel is scored: never a crop (preprocess.py)
            loaded.preprocess = loaded.preprocess.for_segmentation(cfg.model.preprocess)
        if loaded.task == "detection":  # boxes in the pixels of the whole image (preprocess.py)
            loaded.preprocess = loaded.preprocess.for_detection(cfg.model.preprocess, resizes_inside(model))
    log.info("model: %s (%s)", loaded.name, loaded.weights)
    log.info("task: %s (%s)", loaded.task, loaded.task_reason)
    start, end = shard_bounds(len(scan.paths), shard)
    ctx = RunContext(model=model, loaded=loaded, dataset_classes=scan.class_names, num_images=len(scan.paths),
                     device=device, results_dir=results_dir, report=cfg.report, stream_rows=end - start,
                     dataset_root=root, dataset=cfg.dataset, paths=scan.paths)
    analyses = [build_analysis(name, acfg, ctx) for name, acfg in analysis_cfgs.items()]
    return Job(cfg=cfg, out_dir=out_dir, root=root, scan=scan, loaded=loaded, model=model, device=device,
               analyses=analyses, shard=shard, start=start, end=end)


def finish(job: Job, states: Sequence[RunState], timings: Dict[str, float], started: float) -> Path:
    """Finalize the analyses (already holding every state), render the report, write the manifest. An analysis
    whose finalize raises gets the section of a switched-off one; the report is made all the same."""
    cfg, results_dir = job.cfg, job.results_dir
    processed = sum(s.processed for s in states)
    failed = [f for s in states for f in s.failed]
    notes: Dict[str, str] = {}
    warnings: List[str] = []
    for state in states:
        notes.update(state.notes)
        warnings.extend(w for w in state.warnings if w not in warnings)
    pass_seconds = max(s.pass_seconds for s in states)  # shards run side by side: the slowest one's time
    throughput = processed / max(pass_seconds, 1e-9)
    with _timed(timings, "finalize"):
        applicable = [a for a in job.analyses if not isinstance(a, NotApplicable)]
        finalized = {a.name: _finalize(job, a) for a in finalize_order(applicable)}  # readers last
        sections = [finalized[a.name] for a in applicable if finalized[a.name] is not None]  # config order
        sections += not_applicable_section([a for a in job.analyses if isinstance(a, NotApplicable)])
    warnings.extend(a.line for a in job.analyses if isinstance(a, SwitchedOff) and a.line not in warnings)
    write_failed(results_dir / "failed.csv", failed)
    outcome = PassOutcome(processed=processed, failed=failed, timings=timings, throughput=throughput,
                          capture_notes=notes, warnings=warnings, shards=len(states))
    page = build_page(cfg, job.loaded, job.scan, job.root, job.device, outcome, sections)
    with _timed(timings, "render"), full_disk_named("the report", job.out_dir / "report"):
        index = render_report(page, job.out_dir / "report", str(cfg.report.image_format), bool(cfg.report.single_file))
    timings["total"] = time.perf_counter() - started
    write_manifest(
        results_dir, "ok", cfg,
        counts={"found": len(job.scan.paths), "processed": processed, "failed": len(failed),
                "classes": len(job.scan.class_names)},
        model=job.loaded.describe(),
        device=str(job.device), precision=enum_name(cfg.runtime.precision), shards=len(states), warnings=warnings,
        images_per_second=throughput, timings_s={k: round(v, 3) for k, v in timings.items()},
        report=index.relative_to(job.out_dir).as_posix())
    (results_dir / STATE_FILE).unlink(missing_ok=True)  # finished: the report and results replace the checkpoint
    remove_stream_folders(results_dir)
    log.info("report: %s (total %.1f s)", index, timings["total"])
    return index


def _finalize(job: Job, analysis: Analysis):
    """One analysis's results files and report section (its files named if the disk fills up meanwhile); when it
    raises, it is switched off and its section says why."""
    with full_disk_named(f"the results of analysis '{analysis.name}'", job.results_dir):
        try:
            return analysis.finalize()
        except Exception as exc:
            if stops_the_run(exc):
                raise
            return switch_off(job.analyses, analysis, exc, raising_module(exc, job.model)).finalize()


def _resume_or_start(job: Job) -> RunState:
    """The saved state of an interrupted run of the same config in this folder (runtime.resume), else a new one."""
    path = job.results_dir / STATE_FILE
    config = to_container(job.cfg)
    start, end, shard = job.start, job.end, job.shard
    if path.exists() and job.cfg.runtime.resume:
        state = load_state(path)
        different = config_differences(state.config, config, EXECUTION_KEYS)
        if different:
            raise RunError(f"{job.out_dir} holds an interrupted run of a different config ({'; '.join(different)}). "
                           f"Rerun it with the same config to resume, set runtime.resume=false to start over, or "
                           f"choose another folder")
        if (state.start, state.end, state.found, state.folder) != (start, end, len(job.scan.paths),
                                                                    job.scan.fingerprint()):
            raise RunError(f"{job.out_dir} holds an interrupted run over images {state.start}..{state.end} of "
                           f"{state.found}, but the folder now gives {start}..{end} of {len(job.scan.paths)} or "
                           f"other files: the folder changed. Set runtime.resume=false to start over")
        log.info("resuming %s: %d of %d images were done", job.out_dir, state.done, end - start)
        return state
    first_slice = shard is None or shard[0] == 0  # scan findings are listed once, by the first slice
    return RunState(config=config, start=start, end=end, done=0, shard=shard, found=len(job.scan.paths),
                    folder=job.scan.fingerprint(), failed=list(job.scan.skipped) if first_slice else [],
                    results_dir=str(job.results_dir))


def _save_shard(job: Job, state: RunState, timings: Dict[str, float], started: float) -> Path:
    """A finished shard: its whole mergeable state in results/state.pt and a manifest saying it is a shard."""
    save_checkpoint(job, state)
    path = job.results_dir / STATE_FILE
    timings["total"] = time.perf_counter() - started
    write_manifest(
        job.results_dir, "shard", job.cfg, shard=list(state.shard),
        counts={"found": state.found, "slice": [state.start, state.end], "processed": state.processed,
                "failed": len(state.failed)},
        device=str(job.device), images_per_second=state.processed / max(state.pass_seconds, 1e-9),
        timings_s={k: round(v, 3) for k, v in timings.items()}, state=STATE_FILE)
    log.info("shard %d/%d: %d images; merge the shards with python -m reportgen.merge DIR... --out DIR",
             *state.shard, state.processed)
    return path


def already_finished(cfg: DictConfig, out_dir: Path) -> Path:
    """A rerun into a finished run's folder (a requeued cluster job, a repeated sweep): the same config gets the
    existing output back untouched; another config is refused (a finished report is never overwritten)."""
    manifest = json.loads((out_dir / "results" / "manifest.json").read_text())
    different = config_differences(manifest.get("config", {}), to_container(cfg), EXECUTION_KEYS)
    if different:
        raise RunError(f"{out_dir} already holds a finished run of another config ({'; '.join(different)}); "
                       f"choose another output folder (hydra.run.dir=...) rather than overwrite it")
    log.info("%s already holds this finished run: nothing to do", out_dir)
    if manifest["status"] == "ok":
        remove_stream_folders(out_dir / "results")  # in case the run was killed right after its manifest
    return out_dir / (manifest["report"] if manifest["status"] == "ok" else f"results/{STATE_FILE}")


def record_failure(cfg: DictConfig, exc: BaseException, out_dir: Optional[Path] = None) -> None:
    """Write `results/manifest.json` with status "failed" and the error, so a sweep index can show the job
    (never over a finished run's manifest)."""
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir()
    if finished_run(out_dir):
        return
    try:
        (out_dir / "results").mkdir(parents=True, exist_ok=True)
        write_manifest(out_dir / "results", "failed", cfg, error=f"{type(exc).__name__}: {exc}")
    except (OSError, DiskFullError) as write_error:
        said = isinstance(exc, DiskFullError)  # the disk that failed the run is still full: already logged
        (log.debug if said else log.warning)("could not record the failure in %s: %s", out_dir / "results",
                                             write_error)


def finished_run(out_dir: Path) -> bool:
    """True when `out_dir` already holds a finished run's or shard's manifest (never overwrite finished work)."""
    try:
        return json.loads((out_dir / "results" / "manifest.json").read_text())["status"] in ("ok", "shard")
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _timed:
    """Context manager adding the elapsed seconds of a stage to `timings[name]`."""

    def __init__(self, timings: Dict[str, float], name: str):
        self.timings, self.name = timings, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.timings[self.name] = self.timings.get(self.name, 0.0) + time.perf_counter() - self.start
