"""Process helpers for the tests that start runs and signal them: a child whose stop signals are the defaults
whatever the shell that started pytest ignores, and the processes a run leaves behind, found by pid in /proc."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Dict, Iterable, Set, Tuple

PROC = Path("/proc")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)
Process = Tuple[int, int]  # (pid, start time in clock ticks): a pid the kernel reuses is another process


def default_stop_signals() -> None:
    """A `preexec_fn`: the child starts with SIGINT, SIGTERM and SIGUSR2 at their defaults. A background job of a
    non-interactive shell inherits SIGINT ignored (POSIX), and an ignored signal stays ignored across exec, so
    without this a child of such a pytest never sees Ctrl-C."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)


def _stat(pid: int) -> Tuple[int, str, int]:
    """(parent pid, state letter, start time) of a live or zombie process; OSError when it is gone."""
    text = (PROC / str(pid) / "stat").read_text()
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": the name may hold spaces and brackets
    return int(fields[1]), fields[0], int(fields[19])


def descendants(pid: int) -> Set[Process]:
    """Every live process below `pid` (children, their children, ...)."""
    parents: Dict[int, Tuple[int, int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            try:
                ppid, state, started = _stat(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
            if state != "Z":
                parents[int(entry.name)] = (ppid, started)
    found: Set[Process] = set()
    frontier = {pid}
    while frontier:
        below = {(child, started) for child, (ppid, started) in parents.items() if ppid in frontier}
        below -= found
        found |= below
        frontier = {child for child, _ in below}
    return found


def with_environment(entry: str, leave_out: Iterable[str] = ()) -> Set[Process]:
    """Every live process whose environment (as it was started) holds `entry` ("NAME=value"), except those whose
    program name is in `leave_out`."""
    wanted = entry.encode() + b"\0"
    found: Set[Process] = set()
    for folder in PROC.iterdir():
        if not folder.name.isdigit():
            continue
        try:
            environment = (folder / "environ").read_bytes()
            name = (folder / "comm").read_text().strip()
            _, state, started = _stat(int(folder.name))
        except (OSError, ValueError, IndexError):
            continue
        if state != "Z" and name not in leave_out and (environment.startswith(wanted) or b"\0" + wanted in environment):
            found.add((int(folder.name), started))
    return found


def alive(process: Process) -> bool:
    """Whether this process still runs (a zombie has ended: only its exit status is left)."""
    pid, started = process
    try:
        _, state, now_started = _stat(pid)
    except (OSError, ValueError, IndexError):
        return False
    return now_started == started and state != "Z"


def left_after(processes: Iterable[Process], seconds: float) -> Set[Process]:
    """The processes still alive after waiting up to `seconds` for all of them to end."""
    deadline = time.monotonic() + seconds
    remaining = {p for p in processes if alive(p)}
    while remaining and time.monotonic() < deadline:
        time.sleep(0.05)
        remaining = {p for p in remaining if alive(p)}
    return remaining


def describe(processes: Iterable[Process]) -> str:
    """Each process's pid and command line, for a failure message."""
    lines = []
    for pid, _ in sorted(processes):
        try:
            command = (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = _stat(pid)[1]
        except OSError:
            command, state = "(gone)", "-"
        lines.append(f"pid {pid} [{state}]: {command.strip()}")
    return "\n".join(lines)


def kill_all(processes: Iterable[Process]) -> None:
    """SIGKILL what a failed test left behind (only these processes, each checked to be the one recorded)."""
    for process in processes:
        if alive(process):
            try:
                os.kill(process[0], signal.SIGKILL)
            except ProcessLookupError:
                pass
