"""Shared fixtures: compose the real config (as run.py does) and small image folders made on the fly."""
from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from reportgen.config import conf_dir, register_configs

register_configs()

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230)}


def compose_config(overrides: List[str]):
    """The config run.py would see for these command-line overrides."""
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def make_colour_folder(root: Path, per_class: int, noise: float, seed: int) -> Path:
    """ImageFolder layout: red/green/blue class folders of `per_class` noisy 20x24 PNGs each."""
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(rgb) + rng.normal(0, noise, (20, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i}.png")
    return root


@pytest.fixture
def colour_folder(tmp_path: Path) -> Path:
    """red/green/blue class folders, 4 noisy images each, plus one unreadable file."""
    root = make_colour_folder(tmp_path / "colours", per_class=4, noise=20, seed=0)
    (root / "green" / "broken.jpg").write_bytes(b"not really a jpeg")
    return root
