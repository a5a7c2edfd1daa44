"""A per-file time limit for decoding, by SIGALRM: the dataset wraps each file's decode and crop in `time_limit`.

It runs in the process that decodes (a DataLoader worker, or the run's own process with `runtime.num_workers=0`).
A decoder that never returns to Python cannot be stopped this way; loader.py stops its worker instead.
"""
from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator


class DecodeTimeout(BaseException):
    """A file took longer than its time limit. A BaseException, so that no `except Exception` inside a decoder
    plugin can swallow it and go on decoding."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise DecodeTimeout in the block once `seconds` have passed (SIGALRM; main thread only, elsewhere and for
    0 no limit). Python code is interrupted at once, a native decoder when it next returns to Python (PIL feeds
    decoders block by block). A timer armed by someone else (pytest-timeout) keeps its deadline and handler."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return
    outer_handler = signal.getsignal(signal.SIGALRM)
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, 0)
    started = time.monotonic()
    ours_first = not outer_delay or seconds < outer_delay

    def on_alarm(signum: int, frame: Any) -> None:
        if ours_first:
            raise DecodeTimeout(f"decoding took longer than {seconds:g} s (dataset.decode_timeout)")
        if callable(outer_handler):
            outer_handler(signum, frame)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds if ours_first else outer_delay)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, outer_handler if outer_handler is not None else signal.SIG_DFL)
        if outer_delay:
            left = outer_delay - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), outer_interval)
