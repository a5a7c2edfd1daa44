"""Stopping a run cleanly on a signal: SIGINT (Ctrl-C), SIGTERM (a scheduler's kill, preemption) and SIGUSR2
(SLURM's `--signal` warning before the time limit, which submitit asks for).

The handlers installed here only record the signal while the pass runs: the pass looks at the record at each batch
boundary, saves its checkpoint there and raises `RunInterrupted`. Nothing runs inside the model's forward or an
analysis's update, so a handler's work or error can never be mistaken for the model's. Outside the pass (scan,
model loading, probes, finalize, render) there is no partial batch to lose and every file is replaced atomically,
so `RunInterrupted` is raised at once.

A handler that was installed before the run (submitit's: dump the job for a requeue, `scontrol requeue`, exit) is
not lost: `RunInterrupted.hand_over()` calls it after the checkpoint is saved, from run.py, outside the pass.

The pass's decode workers ignore these signals (a terminal or SLURM sends them to every process of the group) and
are not waited for: the first signal also calls the pass's `on_stop` action, which kills them, whatever they are
doing, and ends a wait for the next batch, so a stopped run exits after the batch in hand and its checkpoint.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional

log = logging.getLogger("reportgen")
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR2") if hasattr(signal, name))


class RunInterrupted(BaseException):
    """A stop signal ended the run; `saved` says whether a checkpoint was written for it. A BaseException (like
    KeyboardInterrupt), so that no `except Exception` on the way (a model-error wrapper, a sweep's job handler)
    takes it for a failure."""

    def __init__(self, signum: int, message: str, previous: Any = None):
        super().__init__(message)
        self.signum = signum
        self.previous = previous  # the handler the run replaced for this signal (submitit's requeue), if any

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for "ended by signal N" (130 for Ctrl-C, 143 for TERM)

    def hand_over(self) -> None:
        """Call the handler that was in place before the run, if it was a program's own (submitit's time-limit
        handler: it saves the job for its requeue, requeues it and exits). Python's default SIGINT handler is not
        called: it would only raise KeyboardInterrupt with a traceback."""
        if callable(self.previous) and self.previous is not signal.default_int_handler:
            self.previous(self.signum, None)


class _StopRequests:
    """The signal received (if any) and whether the pass is between batch boundaries (then a signal waits)."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self.deferred = False
        self.previous: Dict[int, Any] = {}
        self.owner_pid = 0
        self.actions: List[Callable[[], None]] = []  # called at once when a signal waits for the batch boundary

    def handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.owner_pid:
            return  # a forked DataLoader worker inherited this handler: its parent decides, and stops it
        name = signal.Signals(signum).name
        if self.received is not None and signum == signal.SIGINT:
            raise RunInterrupted(signum, "interrupted again (SIGINT): stopped without a new checkpoint; the same "
                                         "command continues from the last one", self.previous.get(signum))
        if self.received is not None:
            return  # already stopping at the next batch boundary
        self.received = signum
        if not self.deferred:
            raise RunInterrupted(signum, f"stopped by {name} (nothing of the pass was lost); the same command "
                                         f"continues this run", self.previous.get(signum))
        log.warning("%s received: stopping after the current batch (checkpoint first)%s", name,
                    "; press Ctrl-C again to stop at once" if signum == signal.SIGINT else "")
        for action in list(self.actions):
            action()


_STOPS = _StopRequests()


@contextmanager
def stop_signals() -> Iterator[None]:
    """Install the stop handlers for the block (a whole run) and restore the previous ones after. Only the main
    thread can install handlers; elsewhere (a run started from a thread) the signals keep their old behaviour, and
    a signal the process was started to ignore (a background job's SIGINT) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = dict(_STOPS.__dict__)
    _STOPS.received, _STOPS.deferred, _STOPS.owner_pid, _STOPS.actions = None, False, os.getpid(), []
    ignored = [signum for signum in STOP_SIGNALS if signal.getsignal(signum) is signal.SIG_IGN]  # nohup, `&`
    _STOPS.previous = {signum: signal.signal(signum, _STOPS.handle) for signum in STOP_SIGNALS if signum not in ignored}
    try:
        yield
    finally:
        for signum, handler in _STOPS.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        _STOPS.__dict__.update(saved)


@contextmanager
def at_batch_boundaries() -> Iterator[None]:
    """Inside the block (the pass's batch loop), a stop signal waits for `stop_requested()` to be checked."""
    before = _STOPS.deferred
    _STOPS.deferred = True
    try:
        yield
    finally:
        _STOPS.deferred = before


@contextmanager
def on_stop(action: Callable[[], None]) -> Iterator[None]:
    """Inside the block, a stop signal that waits for the batch boundary also calls `action` at once, from the
    handler, in the main thread (the pass: `IsolatingLoader.stop`, which kills the decode workers and may raise
    to end a wait for a batch; that exception comes out where the signal interrupted). A signal received before
    the block calls it on entry."""
    _STOPS.actions.append(action)
    try:
        if _STOPS.received is not None and _STOPS.deferred:
            action()
        yield
    finally:
        _STOPS.actions.remove(action)


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker's `worker_init_fn`: the stop signals reach every process of a terminal's or a SLURM
    step's group, and a worker killed by one makes its parent raise "DataLoader worker ... is killed by signal"
    in the middle of a forward. The worker ignores them instead; its parent stops at a batch boundary and ends it."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def stop_requested() -> Optional[int]:
    """The stop signal received since `stop_signals()` began, or None."""
    return _STOPS.received


def interruption(signum: int, message: str) -> RunInterrupted:
    """The exception to raise at a batch boundary once the checkpoint is saved."""
    return RunInterrupted(signum, f"stopped by {signal.Signals(signum).name}: {message}",
                          _STOPS.previous.get(signum))
