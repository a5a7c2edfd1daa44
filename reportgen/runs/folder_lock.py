"""One process at a time in a run folder: two runs writing the same results would corrupt each other (two runs
started in the same second share Hydra's dated folder; a requeued cluster job may start while the old one lives).

An exclusive POSIX lock (`lockf`) on `<run>/.reportgen-lock`: the kernel drops it when the holder exits or is killed,
so a crashed run never leaves a stale lock behind; it belongs to the process alone (forked DataLoader workers that
outlive a killed run for a few seconds do not hold it), and NFS servers honour it.
"""
from __future__ import annotations

import fcntl
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from reportgen.errors import FolderBusy


@contextmanager
def folder_lock(out_dir: Path) -> Iterator[None]:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    handle = open(Path(out_dir) / ".reportgen-lock", "a+", encoding="utf-8")
    try:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise FolderBusy(f"{out_dir} is in use by {holder}: wait for it, or choose another folder "
                             f"(hydra.run.dir=...)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock; the file stays (removing it could race with a waiting process)
