"""The one hooked pass over a slice of the folder: decode in workers -> device -> forward (streamed layers reduced
by their analyses as each returns) -> every analysis's update.

It advances a `RunState` (positions done, images processed, failures) and saves it with every analysis's mergeable
state each `runtime.checkpoint_every` batches, so a killed run resumes where its last checkpoint was. A stop signal
(Ctrl-C, SIGTERM, SLURM's time-limit USR2; see signals.py) is acted on at the next batch boundary: checkpoint, then
`RunInterrupted`. A CUDA out-of-memory error halves the batch (and every later one) and goes on, with a warning in
the report, when it came from the forward before any streamed layer was consumed, or from an analysis whose update
changes nothing before its device work is done (`oom_safe`, run first: Grad-CAM's gradients, predictions); after
that, a retry could count images twice, so the run stops instead.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Dict, List, Optional

import torch
from tqdm import tqdm

from reportgen.analyses.base import Analysis, Batch, capture_engine_for
from reportgen.config.schema import Precision
from reportgen.engine.capture import CaptureEngine
from reportgen.errors import ConfigError, RunError
from reportgen.inputs.data import ImageFolderDataset, RawBatch, ScanResult, example_batch, make_loader
from reportgen.inputs.tasks import adapt_outputs
from reportgen.runs.heap import release_free_memory
from reportgen.runs.job import Job
from reportgen.runs.signals import at_batch_boundaries, ignore_stop_signals, interruption, on_stop, stop_requested
from reportgen.state.files import full_disk_named
from reportgen.state.run_state import STATE_FILE, RunState, save_state

log = logging.getLogger("reportgen")
DTYPES = {Precision.fp32: torch.float32, Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}
OUT_OF_MEMORY = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)
EXAMPLE_IMAGES = 16  # images of the analyses' one-time setup (probes, channel choices)


def run_pass(job: Job, state: RunState) -> float:
    """Process the positions of `state`'s slice not done yet; returns the seconds spent in analyses' `begin`.
    `state` is updated in place (and saved at checkpoints); the caller saves or finalises it at the end."""
    cfg, scan = job.cfg, job.scan
    runtime = cfg.runtime
    remaining = range(state.start + state.done, state.end)
    dataset = ImageFolderDataset(scan, job.loaded.preprocess, indices=remaining, max_pixels=int(cfg.dataset.max_pixels),
                                 decode_seconds=float(cfg.dataset.decode_timeout))
    loader = make_loader(dataset, int(runtime.batch_size), int(runtime.num_workers),
                         pin_memory=job.device.type == "cuda")
    loader.worker_init_fn = ignore_stop_signals  # workers leave stopping to this process (runs/signals.py)
    batches = iter(loader)  # a generator: its workers start with its first batch, and end when it is closed
    labels_lookup = torch.tensor(scan.labels + [-1], dtype=torch.int64)
    strict = bool(runtime.strict)
    every = int(runtime.checkpoint_every)
    progress = tqdm(total=state.end - state.start, initial=state.done, unit="img", disable=not runtime.progress,
                    file=sys.stderr, desc="reportgen", dynamic_ncols=True)
    try:
        probe_started = time.perf_counter()
        example = folder_example(job)
        if example is None:  # nothing in the folder decodes: list every failure; the analyses never begin
            _next_good_batch(batches, scan, state, progress, strict)
            return 0.0
        begin_analyses(job.analyses, example)
        del example  # its decoded images are not held through the pass
        if state.analyses:  # resumed: the saved state goes into freshly begun analyses (exact, see merge)
            restore_analyses(job.analyses, state.analyses)
        release_free_memory()  # what the probes freed
        probe_seconds = time.perf_counter() - probe_started
        # the workers start now, not during the probes: the pass is timed from its first batch's decode, as a
        # plain loop over the same loader would be (benchmarks compare the two)
        pass_started, pass_before = time.perf_counter(), state.pass_seconds
        order = sorted(job.analyses, key=lambda a: not a.oom_safe)  # retryable updates first (out of memory)
        # after begin: what the analyses require may depend on their probes. A stop signal kills the workers at
        # once (a fetch it interrupts ends with no batch: the batches before it are all processed)
        with at_batch_boundaries(), on_stop(loader.stop), capture_engine_for(job.model, order) as engine:
            raw = _next_good_batch(batches, scan, state, progress, strict)
            stepper = _Stepper(job, engine, order)
            batches_done = 0
            while raw is not None:  # a fetched batch counts as done: stop only between processing and the next fetch
                images = 0
                for part in raw.groups():  # one forward per image size (several only with whole-image inputs)
                    batch = to_batch(part, job, labels_lookup)
                    state.notes.update(stepper.step(batch))
                    images += len(batch.paths)
                    batch = None  # this batch's tensors go before the next one is decoded and normalised
                release_free_memory()  # see heap.py: the pass's peak stays its live memory
                state.warnings.extend(w for w in stepper.warnings if w not in state.warnings)
                state.processed += images
                progress.update(images)
                batches_done += 1
                if every and batches_done % every == 0:
                    state.pass_seconds = pass_before + time.perf_counter() - pass_started
                    save_checkpoint(job, state)
                _stop_if_requested(job, state, pass_before + time.perf_counter() - pass_started)
                raw = _next_good_batch(batches, scan, state, progress, strict)
            # a signal during the last fetch: the complete state is saved, the rerun goes straight to the report
            _stop_if_requested(job, state, pass_before + time.perf_counter() - pass_started)
        state.pass_seconds = pass_before + time.perf_counter() - pass_started
        return probe_seconds
    finally:
        batches.close()  # every way out of the pass kills and reaps its workers here, before any exit handler
        progress.close()


def _stop_if_requested(job: Job, state: RunState, pass_seconds: float) -> None:
    """At a batch boundary: if a stop signal came, save the checkpoint (whatever `checkpoint_every` says: this is
    the work the next run would otherwise redo) and raise `RunInterrupted`."""
    signum = stop_requested()
    if signum is None:
        return
    state.pass_seconds = pass_seconds
    save_checkpoint(job, state)
    raise interruption(signum, f"checkpoint saved at {state.done} of {state.end - state.start} images in "
                               f"{job.results_dir}; the same command continues from there")


def folder_example(job: Job) -> Optional[Batch]:
    """The example batch every analysis's `begin` sees: the folder's first images that decode, whichever slice
    this process runs, so a shard, a resumed run and a merge set up identically (same layers, same channels)."""
    dataset = ImageFolderDataset(job.scan, job.loaded.preprocess, max_pixels=int(job.cfg.dataset.max_pixels),
                                 decode_seconds=float(job.cfg.dataset.decode_timeout))
    raw = example_batch(dataset, EXAMPLE_IMAGES, attempts=4 * EXAMPLE_IMAGES,
                        num_workers=int(job.cfg.runtime.num_workers))  # a decoder crash costs its file only
    if raw is None:
        return None
    return to_batch(raw.groups()[0], job, torch.tensor(job.scan.labels + [-1], dtype=torch.int64))


def begin_analyses(analyses: List[Analysis], example: Batch) -> None:
    """Every analysis's one-time setup on an example batch; a model error names the files."""
    for analysis in analyses:
        try:
            analysis.begin(example)
        except (ConfigError, RunError):
            raise
        except Exception as exc:  # probes run the model: its errors must name the files, as in the pass
            raise RunError(f"analysis '{analysis.name}' failed while probing the model with the first batch "
                           f"(files {example.paths}): {type(exc).__name__}: {exc}") from exc


def restore_analyses(analyses: List[Analysis], states: Dict[str, dict]) -> None:
    """Fold saved states into freshly begun analyses (a resume, or each shard in turn for a merge)."""
    for analysis in analyses:
        if analysis.name not in states:
            raise RunError(f"the saved state has no '{analysis.name}' analysis (it has {sorted(states)})")
        analysis.merge(states[analysis.name])


def save_checkpoint(job: Job, state: RunState) -> None:
    """Write `results/state.pt` with every analysis's state (streams flushed first, by their `state_dict`)."""
    started = time.perf_counter()
    with full_disk_named("the per-image streams flushed for the checkpoint", job.results_dir):
        state.analyses = {a.name: a.state_dict() for a in job.analyses}
    save_state(job.results_dir / STATE_FILE, state)
    log.info("checkpoint: %d of %d images done (saved in %.2f s)", state.done, state.end - state.start,
             time.perf_counter() - started)


def to_batch(raw: RawBatch, job: Job, labels_lookup: torch.Tensor) -> Batch:
    """A decoded CPU batch of one image size (see `RawBatch.groups`) as analyses see it: normalised inputs on the
    run device (non-blocking from pinned memory on CUDA), labels on the device, the uint8 images kept on the CPU for
    thumbnails."""
    device = job.device
    non_blocking = device.type == "cuda"
    images = raw.images.to(device, non_blocking=non_blocking)  # (B, C, H, W) uint8, C = 1 (grayscale) or 3
    inputs = job.loaded.preprocess.normalize(images)  # (B, C, H, W) float32 on device
    if job.cfg.runtime.channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    labels = labels_lookup[raw.indices].to(device, non_blocking=non_blocking)  # (B,)
    shown = raw.images.repeat(1, 3, 1, 1) if raw.images.shape[1] == 1 else raw.images  # (B, 3, H, W) for display
    return Batch(indices=raw.indices, paths=[job.scan.paths[i] for i in raw.indices.tolist()], images=shown,
                 inputs=inputs, labels=labels, sizes=raw.sizes)


def _next_good_batch(batches, scan: ScanResult, state: RunState, progress, strict: bool) -> Optional[RawBatch]:
    """Next batch with at least one decoded image. Every fetched batch counts as done (checkpoints are saved only
    after the batches before them were processed); its failures go to the state (runtime.strict: stop instead)."""
    for raw in batches:
        if strict and raw.failed:
            index, reason = raw.failed[0]
            raise RunError(f"runtime.strict=true and {scan.paths[index]} could not be read: {reason}")
        for index, reason in raw.failed:
            state.failed.append((scan.paths[index], reason))
            log.warning("skipped %s: %s", scan.paths[index], reason)
        state.done += len(raw.failed) + len(raw.indices)
        progress.update(len(raw.failed))
        if len(raw.indices):
            return raw
    return None


class _Stepper:
    """Forward one batch and feed every analysis; on out-of-memory, halve and retry (and keep the smaller size)."""

    def __init__(self, job: Job, engine: CaptureEngine, analyses: List[Analysis]):
        self.job, self.engine, self.analyses = job, engine, analyses
        self.precision = Precision(getattr(job.cfg.runtime.precision, "name", str(job.cfg.runtime.precision)))
        self.limit: Optional[int] = None  # images per forward after an out-of-memory error
        self.warnings: List[str] = []
        self.updated = False  # whether an analysis consumed the current attempt (then a retry would count twice)

    def step(self, batch: Batch) -> Dict[str, str]:
        notes: Dict[str, str] = {}
        size = self.limit or len(batch.paths)
        for start in range(0, len(batch.paths), size):
            notes.update(self._step_or_halve(_slice(batch, start, start + size)))
        return notes

    def _step_or_halve(self, batch: Batch) -> Dict[str, str]:
        self.updated = False
        try:
            return self._forward_and_update(batch)
        except OUT_OF_MEMORY as exc:
            if self.updated or self.engine.consumed or len(batch.paths) == 1:
                where = "with a batch of one image" if len(batch.paths) == 1 else "after some analyses had updated"
                raise RunError(f"out of memory {where} (files {batch.paths}); lower runtime.batch_size or choose "
                               f"fewer layers: {exc}") from exc
        if self.job.device.type == "cuda":
            torch.cuda.empty_cache()
        half = (len(batch.paths) + 1) // 2
        self.limit = half if self.limit is None else min(self.limit, half)
        message = (f"out of memory at {len(batch.paths)} images per forward: continued with {self.limit} "
                   f"(set runtime.batch_size={self.limit} to avoid the retry)")
        log.warning("%s", message)
        self.warnings.append(message)
        notes: Dict[str, str] = {}
        size = self.limit  # fixed for this batch's parts (a part may lower self.limit again for the next ones)
        for start in range(0, len(batch.paths), size):
            notes.update(self._step_or_halve(_slice(batch, start, start + size)))
        return notes

    def _forward_and_update(self, batch: Batch) -> Dict[str, str]:
        captures = self.engine.start_batch(batch)
        device_type = self.job.device.type
        with self.engine.forward_mode():
            try:
                with torch.autocast(device_type, dtype=DTYPES[self.precision],
                                    enabled=self.precision is not Precision.fp32):
                    raw = self.job.model(batch.inputs)
            except OUT_OF_MEMORY:
                raise
            except Exception as exc:
                raise RunError(f"the model's forward raised on the batch of files {batch.paths}: "
                               f"{type(exc).__name__}: {exc}") from exc
            outputs = adapt_outputs(self.job.loaded.task or "classification", raw, len(batch.paths))
            raw = None  # only the typed outputs live on (a detector's or segmenter's extras go now)
            for analysis in self.analyses:
                if not analysis.oom_safe:
                    self.updated = True  # an out-of-memory error inside may leave part of this batch counted
                with full_disk_named(f"the per-image results of analysis '{analysis.name}'", self.job.results_dir):
                    analysis.update(batch, outputs, captures)
                self.updated = True
        return captures.notes


def _slice(batch: Batch, start: int, end: int) -> Batch:
    if start == 0 and end >= len(batch.paths):
        return batch
    return Batch(indices=batch.indices[start:end], paths=batch.paths[start:end], images=batch.images[start:end],
                 inputs=batch.inputs[start:end], labels=batch.labels[start:end],
                 sizes=None if batch.sizes is None else batch.sizes[start:end])
