"""Machine-readable results next to the report: manifest.json and failed.csv, written atomically."""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import sys
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


def library_versions() -> Dict[str, str]:
    """Versions that decide the numbers in a report, recorded so it can be reproduced."""
    import hydra
    import jinja2
    import matplotlib
    import numpy
    import PIL
    import torch
    import torchvision

    versions = {
        "python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "hydra-core": hydra.__version__, "numpy": numpy.__version__,
        "pillow": PIL.__version__, "matplotlib": matplotlib.__version__, "jinja2": jinja2.__version__,
    }
    if torch.cuda.is_available():
        versions["cuda"] = str(torch.version.cuda)
        versions["gpu"] = torch.cuda.get_device_name(0)
    return versions
