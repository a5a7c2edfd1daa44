"""Throughput of the reportgen pass against the plain PyTorch loop a user would write, same folder, same run.

    python bench/throughput.py                       # demo CNN on the demo folder
    python bench/throughput.py model=resnet18 model.weights=null dataset.root=DIR dataset.limit=256

Both use the same DataLoader (workers, batch size) and the same preprocessing; the plain loop does only
`model(x)` under inference_mode. Prints images/s of each and the ratio; run it a few times, the machine is noisy.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hydra import compose, initialize_config_dir  # noqa: E402

from reportgen.config.store import conf_dir, register_configs  # noqa: E402
from reportgen.config.validate import resolve_dataset_root, select_device  # noqa: E402
from reportgen.inputs.data import ImageFolderDataset, make_loader, scan_folder  # noqa: E402
from reportgen.inputs.models import load_model  # noqa: E402
from reportgen.runs.pipeline import run  # noqa: E402


def plain_loop(cfg) -> float:
    """images/s of DataLoader -> normalise -> model(x), nothing else."""
    device = select_device(cfg.runtime.device)
    loaded = load_model(cfg.model)
    model = loaded.module.to(device).eval()
    scan = scan_folder(resolve_dataset_root(cfg.dataset), list(cfg.dataset.extensions), cfg.dataset.labels,
                       cfg.dataset.limit)
    loader = make_loader(ImageFolderDataset(scan, loaded.preprocess), int(cfg.runtime.batch_size),
                         int(cfg.runtime.num_workers), pin_memory=device.type == "cuda")
    images = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for raw in loader:
            if len(raw.indices):
                model(loaded.preprocess.normalize(raw.images.to(device)))
                images += len(raw.indices)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def compose_cfg(overrides: list[str]):
    """The config run.py would compose, with the progress bar off."""
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=["runtime.progress=false", *overrides])


def ours_per_second(cfg) -> tuple[float, dict]:
    """images/s of the reportgen pass (the loop only, from the manifest) and the manifest itself."""
    with tempfile.TemporaryDirectory() as tmp:
        run(cfg, out_dir=Path(tmp))
        manifest = json.loads((Path(tmp) / "results" / "manifest.json").read_text())
    return manifest["images_per_second"], manifest


def main(overrides: list[str]) -> None:
    cfg = compose_cfg(overrides)
    plain_loop(cfg)  # warm-up: first-touch costs (demo folder generation, page cache) hit neither measurement
    plain = plain_loop(cfg)
    ours, manifest = ours_per_second(cfg)
    print(f"analyses: {', '.join(cfg.analysis.keys())}; images: {manifest['counts']['processed']}; "
          f"batch {cfg.runtime.batch_size}, {cfg.runtime.num_workers} workers, {manifest['device']}")
    print(f"plain loop      {plain:8.1f} images/s")
    print(f"reportgen pass  {ours:8.1f} images/s   ratio {ours / plain:.2f}")
    print(f"reportgen run   timings: {manifest['timings_s']}")


if __name__ == "__main__":
    main(sys.argv[1:])
