"""Ordered batches of decoded images that survive a decoder which crashes or hangs.

A file that raises is already a failure record (data.py). A decoder that crashes in native code (a segfault in a
codec library) would kill its DataLoader worker, and the DataLoader would then raise in the middle of the pass; one
that hangs in native code cannot be interrupted inside its process. `IsolatingLoader` is a DataLoader per attempt:
when a worker dies, or the next batch does not come within the time its files may take, it stops those workers
(SIGKILL: workers ignore the stop signals), decodes the batches that worker may have held one file at a time in a
single fresh worker, lists the file that crashes or hangs with its reason, and goes on. With `num_workers=0`
everything is decoded in the run's own process, so only the per-file time limit of data.py applies there.

No worker outlives its iteration: the end of the iteration, `close()` on it or an exception through it SIGKILLs
its workers (they ignore the stop signals, so PyTorch's SIGTERM would not end one, and a worker blocked in a decoder
cannot be asked to stop) and reaps them. `stop()`, called from a stop signal's handler, does that at once and ends
a wait for the next batch. Two guards cover the paths that skip those: every worker asks Linux to SIGKILL it when
the process that started it ends, however it ends, and at the interpreter's exit the workers still alive are killed
before multiprocessing's exit hook would wait forever for them.
"""
from __future__ import annotations

import atexit
import ctypes
import functools
import logging
import multiprocessing.util  # noqa: F401  (its exit hook is registered before this module's: see the end)
import os
import signal
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset, Subset

log = logging.getLogger("reportgen")
PREFETCH = 4  # batches each worker decodes ahead
STARTUP_SECONDS = 30.0  # a worker's start and a batch's collation, beyond the files' own decode time
STOP_SECONDS = 5.0  # a SIGKILLed worker is reaped at once; this only bounds a process the kernel is slow to end
PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when the thread that created it ends
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


@dataclass
class RawBatch:
    """A collated batch on the CPU: only the images that decoded, plus the failures of this batch.

    Images of one size are one (B, C, H, W) tensor. The `whole` preprocessing (segmentation) keeps each image's
    aspect ratio, so a batch may hold several sizes: then `images` is a list of (C, H, W) tensors, and `groups()`
    splits it into runs of consecutive images of one size, each forwarded as its own batch (padding images to one
    size would change what a CNN predicts near the padded border)."""

    indices: torch.Tensor  # (B,) int64
    images: Union[torch.Tensor, List[torch.Tensor]]  # (B, C, H, W) uint8, or B tensors (C, H_i, W_i) of several sizes
    failed: List[Tuple[int, str]]  # (index, reason)
    sizes: Optional[torch.Tensor] = None  # (B, 2) int64: each image's (height, width) as decoded, before resizing

    def pin_memory(self) -> "RawBatch":
        """Called by DataLoader(pin_memory=True) so the host-to-device copy can be asynchronous."""
        self.indices = self.indices.pin_memory()
        if isinstance(self.images, torch.Tensor):
            self.images = self.images.pin_memory()
        else:
            self.images = [image.pin_memory() for image in self.images]
        return self

    @property
    def size(self) -> int:
        """Files this batch accounts for, decoded or not."""
        return len(self.indices) + len(self.failed)

    def groups(self) -> List["RawBatch"]:
        """The decoded images as batches of one image size each, in order (consecutive images of equal size
        together); the failures stay with this batch, not its groups."""
        if isinstance(self.images, torch.Tensor):
            return [RawBatch(self.indices, self.images, [], self.sizes)] if len(self.indices) else []
        parts: List[RawBatch] = []
        start = 0
        for end in range(1, len(self.images) + 1):
            if end == len(self.images) or self.images[end].shape != self.images[start].shape:
                parts.append(RawBatch(self.indices[start:end], torch.stack(self.images[start:end]), [],
                                      None if self.sizes is None else self.sizes[start:end]))
                start = end
        return parts


def collate(samples: List[Dict[str, Any]]) -> RawBatch:
    good = [s for s in samples if s["image"] is not None]
    failed = [(s["index"], s["error"]) for s in samples if s["image"] is None]
    images: Union[torch.Tensor, List[torch.Tensor]]
    if not good:
        images = torch.empty((0, 3, 0, 0), dtype=torch.uint8)
    elif all(s["image"].shape == good[0]["image"].shape for s in good):
        images = torch.stack([s["image"] for s in good])  # (B, C, H, W)
    else:
        images = [s["image"] for s in good]  # several sizes (the whole-image preprocessing): see RawBatch.groups
    indices = torch.tensor([s["index"] for s in good], dtype=torch.int64)
    sizes = torch.tensor([s.get("size", (0, 0)) for s in good], dtype=torch.int64).reshape(-1, 2)  # (B, 2)
    return RawBatch(indices=indices, images=images, failed=failed, sizes=sizes)


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
        self.worker_init_fn: Optional[Callable[[int], None]] = None  # run in every worker it starts
        self._current: Any = None  # the DataLoader iterator whose workers decode now
        self._stopping = False  # stop() was called: no batch is fetched any more
        self._waiting = False  # the iterating thread waits for a batch (stop() then ends the wait)

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> Iterator[RawBatch]:
        """The batches in order; however the iteration ends (its end, `close()`, an exception, `stop()`), its
        workers are killed and reaped before it returns."""
        try:
            yield from self._batches()
        except _Stopped:
            return
        finally:
            self._waiting = False
            self._close()

    def stop(self) -> None:
        """End the iteration from a signal handler in the iterating thread (the run's stop signals: see
        runs/signals.py): the workers are killed, whatever they are doing, and a wait for the next batch ends at
        once; the iteration then ends without the batches not handed over yet. Afterwards nothing is fetched. With
        `num_workers=0` the batch being decoded in this process is finished first."""
        self._stopping = True
        _kill(self._current)
        if self._waiting:  # raised inside the wait (the iterating thread is there): the iteration catches it
            self._waiting = False
            raise _Stopped()

    def _batches(self) -> Iterator[RawBatch]:
        if self.num_workers == 0:
            for raw in self._loader(self.dataset, self.batch_size, 0):
                if self._stopping:
                    return
                yield raw
            return
        # a healthy worker hands over a batch within its files' time limits (a stalled one is killed after that)
        batch_seconds = self.batch_size * self.decode_seconds + STARTUP_SECONDS if self.decode_seconds > 0 else 0.0
        position = 0
        while position < len(self.dataset):
            try:
                batches = self._open(self._loader(Subset(self.dataset, range(position, len(self.dataset))),
                                                  self.batch_size, self.num_workers))
                while True:
                    raw = self._fetch(batches, batch_seconds)
                    position += raw.size
                    yield raw
            except StopIteration:
                return
            except RuntimeError as exc:
                if self._stopping:  # the workers were killed by stop()
                    raise _Stopped() from exc
                if not _worker_failure(exc):
                    raise
                self._close()
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
                samples = self._open(DataLoader(Subset(self.dataset, range(start, items.stop)), batch_size=None,
                                                num_workers=1, prefetch_factor=1, worker_init_fn=self._worker_init()))
                while True:
                    sample = self._fetch(samples, seconds)
                    start += 1
                    yield sample
            except StopIteration:
                return
            except RuntimeError as exc:
                if self._stopping:  # the workers were killed by stop()
                    raise _Stopped() from exc
                if not _worker_failure(exc):
                    raise
                reason = _failure_reason(samples, exc, seconds)
                self._close()
                yield {"index": self._index(start), "image": None, "error": reason}
                start += 1

    def _index(self, item: int) -> int:
        indices = getattr(self.dataset, "indices", None)
        return int(indices[item]) if indices is not None else item

    def _loader(self, dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate,
                          pin_memory=self.pin_memory, persistent_workers=num_workers > 0,
                          prefetch_factor=PREFETCH if num_workers > 0 else None, worker_init_fn=self._worker_init())

    def _worker_init(self) -> Callable[[int], None]:
        return functools.partial(_start_worker, os.getpid(), self.worker_init_fn)

    def _open(self, loader: DataLoader) -> Iterator[Any]:
        """Start `loader`'s workers as the current ones (none once stopped)."""
        if self._stopping:
            raise _Stopped()
        self._current = _started(loader)
        if self._stopping:  # stopped while they started: stop() could not see them
            raise _Stopped()
        return self._current

    def _fetch(self, iterator: Iterator[Any], seconds: float) -> Any:
        """The next item of `iterator` (see _next_within); `stop()` ends the wait."""
        if self._stopping:
            raise _Stopped()
        self._waiting = True
        try:
            return _next_within(iterator, seconds)
        finally:
            self._waiting = False

    def _close(self) -> None:
        """Kill and reap the current workers."""
        current, self._current = self._current, None
        _stop_workers(current)


class _Stalled(RuntimeError):
    """The next batch did not come within its time: the workers were killed."""


class _Stopped(BaseException):
    """`stop()` ended the iteration. A BaseException, so that PyTorch's `except Exception` around its wait lets it
    through."""


def _start_worker(parent_pid: int, then: Optional[Callable[[int], None]], worker_id: int) -> None:
    """Every worker's `worker_init_fn`: die with the run's process, then the loader's own `worker_init_fn`."""
    _die_with(parent_pid)
    if then is not None:
        then(worker_id)


def _die_with(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this worker when the thread that started it ends, however the run's process ends
    (SIGKILL, the OOM killer, a scheduler's last kill: no Python runs there to stop it), since a worker ignores the
    stop signals and one blocked in a decoder never looks at its parent. A parent that ended before the request
    took effect left this worker to another process: it ends now. (Another parent that is alive is a fork
    server's: it ends with the run's process, and so does this worker.)"""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid and not _alive(parent_pid):
        os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_STARTED: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()  # live iterators -> pid of their parent


def _started(loader: DataLoader) -> Iterator[Any]:
    """The loader's iterator, its workers started, and taken off PyTorch's SIGCHLD check: that check raises from a
    signal handler, anywhere in the run's process (inside a forward), when a worker dies; here a dead worker is
    noticed where the next batch is awaited (PyTorch polls its workers while it waits)."""
    iterator = iter(loader)
    if getattr(iterator, "_workers", None):
        _STARTED[iterator] = os.getpid()
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
    """Kill an iterator's workers, let it close its queues and threads, and reap the workers (PyTorch skips its
    part once the interpreter is exiting)."""
    if iterator is None:
        return
    _kill(iterator)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for worker in getattr(iterator, "_workers", []):
        worker.join(timeout=STOP_SECONDS)
    _STARTED.pop(iterator, None)


def _kill_left_workers() -> None:
    """At the interpreter's exit: kill and reap the workers still alive (a path that skipped `close()`, such as a
    signal inside it). multiprocessing's own exit hook runs after this one (atexit runs hooks in reverse order of
    registration, and multiprocessing.util registered its hook when it was imported, above): it sends daemon
    children SIGTERM, which the workers ignore, then waits for each, so a live worker would keep the run's process
    from ever exiting."""
    for iterator, parent_pid in list(_STARTED.items()):
        if parent_pid != os.getpid():
            continue  # a forked child exiting: its parent's workers are not its own
        _kill(iterator)
        for worker in getattr(iterator, "_workers", []):
            worker.join(timeout=STOP_SECONDS)


atexit.register(_kill_left_workers)
