"""Ordered batches of decoded images that survive a decoder which crashes or hangs.

A file that raises is already a failure record (data.py). A decoder that crashes in native code (a segfault in a
codec library) would kill its DataLoader worker, and the DataLoader would then raise in the middle of the pass; one
that hangs in native code cannot be interrupted inside its process. `IsolatingLoader` is a DataLoader per attempt:
when a worker dies, or the next batch does not come within the time its files may take, it stops those workers
(SIGKILL: workers ignore the stop signals), decodes the batches that worker may have held one file at a time in a
single fresh worker, lists the file that crashes or hangs with its reason, and goes on. With `num_workers=0`
everything is decoded in the run's own process, so only the per-file time limit of data.py applies there.
"""
from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Subset

log = logging.getLogger("reportgen")
PREFETCH = 4  # batches each worker decodes ahead
STARTUP_SECONDS = 30.0  # a worker's start and a batch's collation, beyond the files' own decode time


@dataclass
class RawBatch:
    """A collated batch on the CPU: only the images that decoded, plus the failures of this batch."""

    indices: torch.Tensor  # (B,) int64
    images: torch.Tensor  # (B, 3, H, W) uint8
    failed: List[Tuple[int, str]]  # (index, reason)

    def pin_memory(self) -> "RawBatch":
        """Called by DataLoader(pin_memory=True) so the host-to-device copy can be asynchronous."""
        self.indices = self.indices.pin_memory()
        self.images = self.images.pin_memory()
        return self

    @property
    def size(self) -> int:
        """Files this batch accounts for, decoded or not."""
        return len(self.indices) + len(self.failed)


def collate(samples: List[Dict[str, Any]]) -> RawBatch:
    good = [s for s in samples if s["image"] is not None]
    failed = [(s["index"], s["error"]) for s in samples if s["image"] is None]
    if good:
        images = torch.stack([s["image"] for s in good])  # (B, 3, H, W)
    else:
        images = torch.empty((0, 3, 0, 0), dtype=torch.uint8)
    indices = torch.tensor([s["index"] for s in good], dtype=torch.int64)
    return RawBatch(indices=indices, images=images, failed=failed)


class IsolatingLoader:
    """Like `DataLoader(dataset, batch_size, shuffle=False, collate_fn=collate)`, iterated the same way; with
    workers, a decoder crash or hang costs only its own file. `decode_seconds` is the dataset's per-file limit."""

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int, pin_memory: bool,
                 decode_seconds: float):
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory
        self.decode_seconds = float(decode_seconds)
        self.worker_init_fn: Optional[Callable[[int], None]] = None  # passed to every DataLoader made

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> Iterator[RawBatch]:
        if self.num_workers == 0:
            yield from self._loader(self.dataset, self.batch_size, 0)
            return
        # a healthy worker hands over a batch within its files' time limits (a stalled one is killed after that)
        batch_seconds = self.batch_size * self.decode_seconds + STARTUP_SECONDS if self.decode_seconds > 0 else 0.0
        position = 0
        while position < len(self.dataset):
            batches = None
            try:
                batches = _started(self._loader(Subset(self.dataset, range(position, len(self.dataset))),
                                                self.batch_size, self.num_workers))
                while True:
                    raw = _next_within(batches, batch_seconds)
                    position += raw.size
                    yield raw
            except StopIteration:
                return
            except RuntimeError as exc:
                if not _worker_failure(exc):
                    raise
                _stop_workers(batches)
            # any batch handed to a worker (up to PREFETCH each) may hold the culprit: those files one at a time
            suspect = range(position, min(position + PREFETCH * self.num_workers * self.batch_size,
                                          len(self.dataset)))
            log.warning("a decode worker crashed or stalled: decoding the next %d files one at a time to find the "
                        "file that did it", len(suspect))
            pending: List[Dict[str, Any]] = []
            for sample in self._one_at_a_time(suspect):
                pending.append(sample)
                if len(pending) == self.batch_size:
                    yield collate(pending)
                    pending = []
            if pending:
                yield collate(pending)
            position = suspect.stop

    def _one_at_a_time(self, items: range) -> Iterator[Dict[str, Any]]:
        """Every item of `items` as a sample, decoded in one worker with nothing fetched ahead, so a worker that
        dies or stalls was decoding exactly the item waited for."""
        seconds = (self.decode_seconds if self.decode_seconds > 0 else 3600.0) + STARTUP_SECONDS
        start = items.start
        while start < items.stop:
            samples = None
            try:
                samples = _started(DataLoader(Subset(self.dataset, range(start, items.stop)), batch_size=None,
                                              num_workers=1, prefetch_factor=1, worker_init_fn=self.worker_init_fn))
                while True:
                    sample = _next_within(samples, seconds)
                    start += 1
                    yield sample
            except StopIteration:
                return
            except RuntimeError as exc:
                if not _worker_failure(exc):
                    raise
                reason = _failure_reason(samples, exc, seconds)
                _stop_workers(samples)
                yield {"index": self._index(start), "image": None, "error": reason}
                start += 1

    def _index(self, item: int) -> int:
        indices = getattr(self.dataset, "indices", None)
        return int(indices[item]) if indices is not None else item

    def _loader(self, dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate,
                          pin_memory=self.pin_memory, persistent_workers=num_workers > 0,
                          prefetch_factor=PREFETCH if num_workers > 0 else None, worker_init_fn=self.worker_init_fn)


class _Stalled(RuntimeError):
    """The next batch did not come within its time: the workers were killed."""


def _started(loader: DataLoader) -> Iterator[Any]:
    """The loader's iterator, its workers started, and taken off PyTorch's SIGCHLD check: that check raises from a
    signal handler, anywhere in the run's process (inside a forward), when a worker dies; here a dead worker is
    noticed where the next batch is awaited (PyTorch polls its workers while it waits)."""
    iterator = iter(loader)
    if getattr(iterator, "_worker_pids_set", False):
        torch._C._remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False
    return iterator


def _next_within(iterator: Iterator[Any], seconds: float) -> Any:
    """next(iterator); when that takes longer than `seconds` (0: no limit), its workers are killed and _Stalled
    is raised."""
    if not seconds:
        return next(iterator)
    stalled = threading.Event()

    def expire() -> None:
        workers = getattr(iterator, "_workers", [])
        if all(worker.is_alive() for worker in workers):  # a dead one crashed: PyTorch reports it within 5 s
            stalled.set()
            _kill(iterator)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        return next(iterator)
    except RuntimeError as exc:
        if stalled.is_set():
            raise _Stalled(f"no batch within {seconds:g} s") from exc
        raise
    finally:
        timer.cancel()


def _worker_failure(exc: RuntimeError) -> bool:
    """Whether the DataLoader raised because a worker died (PyTorch's wording) or stalled."""
    return isinstance(exc, _Stalled) or "DataLoader worker (pid" in str(exc)


def _failure_reason(samples: Any, exc: RuntimeError, seconds: float) -> str:
    if isinstance(exc, _Stalled):
        return (f"decoding did not finish within {seconds:g} s (dataset.decode_timeout plus the worker's start; the "
                f"decoder hung where it cannot be interrupted); its worker process was stopped")
    worker = (getattr(samples, "_workers", None) or [None])[0]
    code = worker.exitcode if worker is not None else None
    if code is not None and code < 0:
        return f"the decoder crashed its worker process ({signal.Signals(-code).name}); the file was skipped"
    return f"the decoder ended its worker process (exit status {code}); the file was skipped"


def _kill(iterator: Any) -> None:
    """SIGKILL an iterator's live workers (they ignore the stop signals, so terminate() would not end them)."""
    for worker in getattr(iterator, "_workers", []):
        if worker.is_alive():
            worker.kill()


def _stop_workers(iterator: Any) -> None:
    """Kill a failed iterator's workers and let it close its queues and threads."""
    if iterator is None:
        return
    _kill(iterator)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
