"""Shared fixtures: small image folders made on the fly (the helpers they use are in tests/helpers.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_colour_folder


@pytest.fixture
def colour_folder(tmp_path: Path) -> Path:
    """red/green/blue class folders, 4 noisy images each, plus one unreadable file."""
    root = make_colour_folder(tmp_path / "colours", per_class=4, noise=20, seed=0)
    (root / "green" / "broken.jpg").write_bytes(b"not really a jpeg")
    return root
