"""The one hooked pass over a slice of the folder: decode in workers -> device -> forward (streamed layers reduced
by their analyses as each returns) -> every analysis's update.

It advances a `RunState` (positions done, images processed, failures) and saves it with every analysis's mergeable
state each `runtime.checkpoint_every` batches, so a killed run resumes where its last checkpoint was. A stop signal
(Ctrl-C, SIGTERM, SLURM's time-limit USR2; see signals.py) is acted on at the next batch boundary: checkpoint, then
`RunInterrupted`. A CUDA out-of-memory error halves the batch (and every later one) and goes on, with a warning in
the report, when it came from the forward before any streamed layer was consumed, or from an analysis whose update
changes nothing before its device work is done (`oom_safe`, run first: Grad-CAM's gradients, predictions); after
that, a retry could count images twice, so the run stops instead.

Nothing one analysis does stops the others: one whose `begin`, `consume` or `update` raises on this model is
switched off (`switch_off`: its section becomes one line saying why), and so is one whose hooks make the forward
raise where the model's plain forward runs (`_Stepper._blame`). Errors that are the user's or the machine's
(`stops_the_run`) and a model whose plain forward fails still stop the run, as they always did.
"""
from __future__ import annotations

import logging
import sys
import time
import traceback
from typing import Dict, List, Optional, Set, Tuple

import torch
from tqdm import tqdm

from reportgen.analyses.base import Analysis, Batch, Requirements, SwitchedOff, capture_engine_for
from reportgen.config.schema import Precision
from reportgen.engine.capture import CaptureEngine, Captures, Consumer
from reportgen.errors import ConfigError, ReportgenError, RunError
from reportgen.inputs.data import ImageFolderDataset, RawBatch, ScanResult, example_batch, make_loader
from reportgen.inputs.tasks import ModelOutputs, adapt_outputs
from reportgen.runs.heap import release_free_memory
from reportgen.runs.job import Job
from reportgen.runs.signals import at_batch_boundaries, ignore_stop_signals, interruption, on_stop, stop_requested
from reportgen.state.files import full_disk_named, is_disk_full
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
        with at_batch_boundaries(), on_stop(loader.stop), _Stepper(job, order) as stepper:
            raw = _next_good_batch(batches, scan, state, progress, strict)
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
    """Every analysis's one-time setup on an example batch. One that raises is switched off for the run, unless
    the error is the user's (ConfigError, RunError: raised as they are) or stops any run (`stops_the_run`), or the
    model's plain forward fails on the example too: then the run stops with the files named."""
    for analysis in list(analyses):
        try:
            analysis.begin(example)
        except (ConfigError, RunError):
            raise
        except Exception as exc:  # probes run the model: its errors must name the files, as in the pass
            model = analysis.ctx.model
            if stops_the_run(exc) or _plain_forward_raises(model, example):
                raise RunError(f"analysis '{analysis.name}' failed while probing the model with the first batch "
                               f"(files {example.paths}): {type(exc).__name__}: {exc}") from exc
            switch_off(analyses, analysis, exc, raising_module(exc, model))


def restore_analyses(analyses: List[Analysis], states: Dict[str, dict]) -> None:
    """Fold saved states into freshly begun analyses (a resume, or each shard in turn for a merge). An analysis
    that a state records as switched off is switched off here too, whatever the other states hold, so partial
    states are never mixed."""
    for position, analysis in enumerate(analyses):
        if analysis.name not in states:
            raise RunError(f"the saved state has no '{analysis.name}' analysis (it has {sorted(states)})")
        stand_in = SwitchedOff.from_state(analysis.name, states[analysis.name])
        if stand_in is not None and not isinstance(analysis, SwitchedOff):
            analyses[position] = stand_in
        else:
            analysis.merge(states[analysis.name])


def stops_the_run(exc: BaseException) -> bool:
    """Errors no analysis is switched off for: the project's own (a bad option, a full disk, a missing package),
    out of memory (the pass halves its batch or stops) and a full disk not named yet. Ctrl-C, stop signals and
    time limits are BaseExceptions, never caught at all."""
    return isinstance(exc, (ReportgenError, *OUT_OF_MEMORY)) or is_disk_full(exc)


def switch_off(analyses: List[Analysis], analysis: Analysis, exc: Exception,
               where: Optional[str] = None) -> SwitchedOff:
    """Replace `analysis` in `analyses` by its one-line stand-in for the rest of the run, with a warning."""
    stand_in = SwitchedOff.after(analysis, exc, where)
    analyses[analyses.index(analysis)] = stand_in
    log.warning("%s", stand_in.line)
    return stand_in


def raising_module(exc: BaseException, model: torch.nn.Module) -> Optional[str]:
    """The qualified name of the innermost module of `model` whose code was running when `exc` was raised (read
    from the traceback's frames), or None."""
    names = {id(module): name for name, module in model.named_modules() if name}
    found = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        found = names.get(id(frame.f_locals.get("self")), found)
    return found


def forward_raises(model: torch.nn.Module, batch: Batch, engine: CaptureEngine, dtype: torch.dtype) -> bool:
    """Whether `model`'s forward raises on `batch` inside the entered `engine` (its hooks, its autograd mode) under
    autocast to `dtype`. An error that stops any run (out of memory) is raised, not answered: it says nothing
    about whose fault an error is."""
    engine.start_batch(batch)
    with engine.forward_mode(), torch.autocast(batch.inputs.device.type, dtype=dtype,
                                               enabled=dtype is not torch.float32):
        try:
            model(batch.inputs)
        except Exception as exc:
            if stops_the_run(exc):
                raise
            return True
    return False


def _plain_forward_raises(model: torch.nn.Module, batch: Batch) -> bool:
    """Whether the model's forward with no hooks raises on `batch` (in fp32, as the probes run it)."""
    with CaptureEngine(model) as bare:
        return forward_raises(model, batch, bare, torch.float32)


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
    """Forward one batch and feed every analysis still on; on out-of-memory, halve and retry (and keep the smaller
    size). An analysis that fails on the model is switched off and the others go on (`_forward_and_update`).
    A context manager owning the capture engine, rebuilt for the analyses still on after one is switched off."""

    def __init__(self, job: Job, analyses: List[Analysis]):
        self.job, self.analyses = job, list(analyses)  # the analyses still on, in update order
        self.precision = Precision(getattr(job.cfg.runtime.precision, "name", str(job.cfg.runtime.precision)))
        self.limit: Optional[int] = None  # images per forward after an out-of-memory error
        self.warnings: List[str] = []
        self.updated = False  # whether an analysis consumed the current attempt (then a retry would count twice)
        self.engine = self._engine_for(self.analyses)
        self.stale = False  # an analysis was switched off: the engine is rebuilt before the next forward
        self.feeding = True  # whether streamed layers reach their analyses (not in `_blame`'s trial forwards)
        self.fed: Set[Tuple[str, str]] = set()  # (analysis, call key) consumed for the current batch: a forward
        #   done again after a hook's fault skips them, so each call is counted once
        self.failures: Dict[str, Tuple[Exception, str]] = {}  # analysis -> (error, call key) of a consume that raised

    def __enter__(self) -> "_Stepper":
        self.engine.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self.engine.__exit__(*exc_info)

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
            if self.updated or self.engine.consumed or self.fed or len(batch.paths) == 1:
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
        """Forward `batch` with the hooks of every analysis still on, then update each; one whose `consume` or
        `update` raises is switched off and the others count the batch once. A forward that raises is the model's
        fault (RunError) or one analysis's hooks' (`_blame`): that one is switched off and the batch done again."""
        self.fed = set()
        while True:
            if self.stale:
                self._rebuild()
            captures = self.engine.start_batch(batch)
            with self.engine.forward_mode():
                try:
                    with torch.autocast(self.job.device.type, dtype=DTYPES[self.precision],
                                        enabled=self.precision is not Precision.fp32):
                        raw = self.job.model(batch.inputs)
                except Exception as exc:
                    if stops_the_run(exc):  # out of memory (see _step_or_halve), a consumer's full disk
                        raise
                    failure = exc  # whose fault it is needs the hooks off: after forward_mode
                else:
                    outputs = adapt_outputs(self.job.loaded.task or "classification", raw, len(batch.paths))
                    raw = None  # only the typed outputs live on (a detector's or segmenter's extras go now)
                    self._update_all(batch, outputs, captures)
                    return captures.notes
            self._blame(batch, failure)

    def _update_all(self, batch: Batch, outputs: ModelOutputs, captures: Captures) -> None:
        """Every analysis still on folds the batch in; one whose `consume` raised in the forward, or whose `update`
        raises now, is switched off instead (its partial state goes with it)."""
        self._switch_off_failed_consumers()
        for analysis in list(self.analyses):
            if not analysis.oom_safe:
                self.updated = True  # an out-of-memory error inside may leave part of this batch counted
            try:
                with full_disk_named(f"the per-image results of analysis '{analysis.name}'", self.job.results_dir):
                    analysis.update(batch, outputs, captures)
            except Exception as exc:
                if stops_the_run(exc):
                    raise
                self._switch_off(analysis, exc, raising_module(exc, self.job.model))
            else:
                self.updated = True

    def _blame(self, batch: Batch, exc: Exception) -> None:
        """The hooked forward raised `exc`. If it raises with no analysis's hooks too, the model is at fault: the
        RunError naming the files, as always. Otherwise the analyses with hooks are taken out one at a time
        (gradient leaves first, then attention, then stored and streamed layers) until the forward runs; the last
        one taken out is switched off, naming its layers, and the caller does the batch again with the others."""
        self._switch_off_failed_consumers()
        suspicion = {a.name: _suspicion(a.requires()) for a in self.analyses}
        suspects = sorted((a for a in self.analyses if suspicion[a.name][1]), key=lambda a: suspicion[a.name][0])
        if not suspects:  # the hooked forward was the plain one
            raise _forward_error(batch, exc) from exc
        self.engine.__exit__(None, None, None)  # exiting it again (`_rebuild`, `__exit__`) changes nothing
        self.stale = True
        self.feeding = False  # trial forwards: no analysis counts them
        try:
            if not self._runs(batch, []):
                raise _forward_error(batch, exc) from exc
            culprit = next((suspect for taken, suspect in enumerate(suspects[:-1], start=1)
                            if self._runs(batch, [a for a in self.analyses if a not in suspects[:taken]])),
                           suspects[-1])  # without every suspect it is the plain forward, which runs
        finally:
            self.feeding = True
        self._switch_off(culprit, exc, _names(suspicion[culprit.name][1]))

    def _runs(self, batch: Batch, analyses: List[Analysis]) -> bool:
        """Whether the forward of `batch` runs with only these analyses' hooks on (a trial: nothing is fed)."""
        with self._engine_for(analyses) as engine:
            return not forward_raises(self.job.model, batch, engine, DTYPES[self.precision])

    def _engine_for(self, analyses: List[Analysis]) -> CaptureEngine:
        return capture_engine_for(self.job.model, analyses, consumer=self._guarded)

    def _rebuild(self) -> None:
        """A new engine for the analyses still on: the switched-off ones' hooks go."""
        self.engine.__exit__(None, None, None)
        self.engine = self._engine_for(self.analyses).__enter__()
        self.stale = False

    def _guarded(self, analysis: Analysis) -> Consumer:
        """`analysis.consume` as a streamed layer calls it: an error that does not stop the run is kept for
        `_switch_off_failed_consumers` (the forward goes on for the others), and a call already counted for this
        batch, or made in a trial forward, is skipped."""
        def consume(batch: Batch, key: str, output: torch.Tensor) -> None:
            if not self.feeding or analysis.name in self.failures or (analysis.name, key) in self.fed:
                return
            try:
                analysis.consume(batch, key, output)
            except Exception as exc:
                if stops_the_run(exc):
                    raise
                self.failures[analysis.name] = (exc, key)
                return
            self.fed.add((analysis.name, key))

        return consume

    def _switch_off_failed_consumers(self) -> None:
        """Switch off the analyses whose `consume` raised in the last forward (naming the layer call)."""
        for analysis in [a for a in self.analyses if a.name in self.failures]:
            exc, key = self.failures.pop(analysis.name)
            self._switch_off(analysis, exc, key)

    def _switch_off(self, analysis: Analysis, exc: Exception, where: Optional[str]) -> None:
        self.analyses.remove(analysis)
        switch_off(self.job.analyses, analysis, exc, where)
        self.stale = True


def _forward_error(batch: Batch, exc: Exception) -> RunError:
    return RunError(f"the model's forward raised on the batch of files {batch.paths}: {type(exc).__name__}: {exc}")


def _suspicion(needs: Requirements) -> Tuple[int, List[str]]:
    """How likely an analysis's hooks are to break a forward, most likely first: (rank, its layers of that kind);
    (3, []) when it has none. A gradient leaf turns autograd on for the rest of the forward, forced attention
    weights change a module's path, stored and streamed layers are only read."""
    for rank, layers in enumerate((needs.gradients, needs.attention, needs.activations + needs.streamed)):
        if layers:
            return rank, sorted(set(layers))
    return 3, []


def _names(layers: List[str], shown: int = 3) -> str:
    more = f" and {len(layers) - shown} more" if len(layers) > shown else ""
    return ", ".join(layers[:shown]) + more


def _slice(batch: Batch, start: int, end: int) -> Batch:
    if start == 0 and end >= len(batch.paths):
        return batch
    return Batch(indices=batch.indices[start:end], paths=batch.paths[start:end], images=batch.images[start:end],
                 inputs=batch.inputs[start:end], labels=batch.labels[start:end],
                 sizes=None if batch.sizes is None else batch.sizes[start:end])
