"""Writing results files atomically (a temporary sibling, then a rename), so a reader, a crash or a full disk never
leaves half a file; and turning a full disk into one error that says what was being written and what to do."""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterable, Iterator, Optional, Tuple, Union

from reportgen.errors import RunError

FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # no space left on the device; disk quota exceeded


class DiskFullError(RunError):
    """A write failed because the file system (or the user's quota) is full. Nothing already written is damaged:
    every results file is replaced atomically and the checkpoint is the last one that was saved whole."""

    def __init__(self, what: str, path: Path, cause: BaseException):
        self.path = Path(path)
        reason = "disk quota exceeded" if getattr(cause, "errno", None) == errno.EDQUOT else "no space left on device"
        super().__init__(f"{reason} while writing {what} ({self.path}; {_free_space(self.path)}). Free some space "
                         f"there and run the same command again: it continues from the last checkpoint")


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in FULL_DISK_ERRNOS


@contextmanager
def full_disk_named(what: str, path: Path) -> Iterator[None]:
    """Inside this block, a write failing on a full disk raises `DiskFullError(what, path)` (a plain `OSError`'s
    message names neither the file being written nor what to do); an inner, more precise one passes unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise DiskFullError(what, Path(exc.filename) if exc.filename else path, exc) from exc


def write_atomic(path: Path, data: Union[str, bytes, memoryview], what: str = "") -> None:
    """Write text (UTF-8) or bytes to a temporary sibling, then rename: readers never see half a file, and a write
    that fails (a full disk) leaves the previous version in place and no temporary file behind."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    write_atomic_with(path, lambda handle: handle.write(payload), what)


def write_atomic_with(path: Path, write: Callable[[BinaryIO], Any], what: str = "") -> None:
    """Like `write_atomic`, for a writer that streams into the open file (`write(handle)`, e.g. `torch.save`), so
    the content is never held whole in memory. The first write error the file saw is the one raised: a writer
    may replace it with its own, less telling one (torch.save on a full disk: "unexpected pos")."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with full_disk_named(what or path.name, path):
        try:
            with open(tmp, "wb") as handle:
                recording = _ErrorRecordingFile(handle)
                try:
                    write(recording)
                except Exception:
                    if recording.error is not None:
                        raise recording.error
                    raise
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


class _ErrorRecordingFile:
    """A binary file that keeps the first OSError its writes or flushes raised (see `write_atomic_with`)."""

    def __init__(self, handle: BinaryIO):
        self.handle = handle
        self.error: Optional[OSError] = None

    def write(self, data: Any) -> int:
        return self._recorded(self.handle.write, data)

    def flush(self) -> None:
        self._recorded(self.handle.flush)

    def _recorded(self, call: Callable, *args: Any) -> Any:
        try:
            return call(*args)
        except OSError as exc:
            self.error = self.error or exc
            raise


def write_json(path: Path, data: Dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str))


def write_failed(path: Path, failed: Iterable[Tuple[str, str]]) -> None:
    """failed.csv: one row per file that was found but not processed, with the reason."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "reason"])
    writer.writerows(failed)
    write_atomic(path, buffer.getvalue())


def _free_space(path: Path) -> str:
    """'12.0 KiB free of 1.0 MiB' for the file system holding `path` (or its nearest existing parent)."""
    folder = path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return "free space unknown"
    return f"{human_bytes(usage.free)} free of {human_bytes(usage.total)}"


def human_bytes(count: float) -> str:
    """'512 B', '12.0 KiB', '3.5 GiB'."""
    for unit in ("B", "KiB", "MiB"):
        if count < 1024:
            return f"{count:.1f} {unit}" if unit != "B" else f"{count:.0f} B"
        count /= 1024
    return f"{count:.1f} GiB"
