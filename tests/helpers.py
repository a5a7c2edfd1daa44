"""What many test modules share: composing the real config as run.py does, small image folders made on the fly,
and the override lists that select the tiny test models (tests/tiny_models.py) with fast settings."""
from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
from hydra import compose, initialize_config_dir
from PIL import Image

from reportgen.config.store import conf_dir, register_configs

register_configs()

# TinyNet (3 classes, 16 px, identity normalisation), no workers, no progress bar: the fastest full run
TINY = ["model=target", "model.target._target_=tests.tiny_models.tiny_net", "model.preprocess.resize=16",
        "model.preprocess.crop=16", "model.preprocess.mean=[0,0,0]", "model.preprocess.std=[1,1,1]",
        "runtime.num_workers=0", "runtime.progress=false"]

# WideNet with every analysis but attention, batch 4: the runs that the shard, merge and resume tests compare
WIDE_MODEL = ["model=target", "model.target._target_=tests.tiny_models.wide_net", "model.preprocess.resize=16",
              "model.preprocess.crop=16", "runtime.num_workers=0", "runtime.progress=false", "runtime.batch_size=4"]
WIDE = WIDE_MODEL + ["analysis=[summary,predictions,gradcam,activations,weights,graph]",
                     "analysis.activations.channels_per_layer=3", "analysis.activations.n_images=4",
                     "report.gallery_size=5"]


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


def binomial_p(better: int, worse: int) -> float:
    """Two-sided exact binomial test at p = 1/2 (the sign test), brute force: the probability of every count no
    more likely than the one observed (scipy's definition), by math.comb."""
    import math

    n = better + worse
    if n == 0:
        return 1.0
    observed = math.comb(n, better)
    return min(1.0, sum(math.comb(n, k) for k in range(n + 1) if math.comb(n, k) <= observed) / 2 ** n)
