"""Where the run configs (`conf/`) and the page templates (`templates/`) are, in a checkout and when installed.

A checkout keeps them at the top level, beside the package; a wheel carries them inside it, as `reportgen/conf`
and `reportgen/templates` (setup.py maps the top-level folders into the package when it builds). One lookup serves
both, so `python run.py` in a checkout and the `reportgen` command of an installed package read the same files.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # the reportgen package folder


def resource_dir(name: str) -> Path:
    """The folder `name` ("conf" or "templates"): inside the installed package first (beside an installed package
    lie other distributions' folders, which may have the same name), else beside the package in a checkout."""
    for candidate in (PACKAGE / name, PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"reportgen's {name}/ folder is neither in {PACKAGE} (an installed package) nor in "
                            f"{PACKAGE.parent} (a checkout): reinstall the package (pip install .)")
