"""Writing results files atomically (a temporary sibling, then a rename), so a reader or a crash never leaves half a file."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Tuple


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary sibling, then rename: readers never see half a file."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, data: Dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str))


def write_failed(path: Path, failed: Iterable[Tuple[str, str]]) -> None:
    """failed.csv: one row per file that was found but not processed, with the reason."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "reason"])
    writer.writerows(failed)
    write_atomic(path, buffer.getvalue())
