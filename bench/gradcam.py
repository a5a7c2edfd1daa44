"""Grad-CAM throughput: plain inference loop vs the reportgen pass with `gradcam` vs pytorch-grad-cam, same folder.

    python bench/gradcam.py                                              # resnet18 (random weights), demo folder
    python bench/gradcam.py model=resnet50 model.weights=null dataset.root=DIR dataset.limit=256

All three share the DataLoader and preprocessing. pytorch-grad-cam (the `grad-cam` package) runs its usual way:
forward with hooks, then a full backward into every parameter, per batch.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.throughput import compose_cfg, ours_per_second, plain_loop  # noqa: E402
from reportgen.analyses.gradcam import default_target_layer  # noqa: E402
from reportgen.config.validate import resolve_dataset_root  # noqa: E402
from reportgen.engine.layers import named_modules  # noqa: E402
from reportgen.inputs.data import ImageFolderDataset, make_loader, scan_folder  # noqa: E402
from reportgen.inputs.models import load_model  # noqa: E402


def pytorch_grad_cam_loop(cfg) -> float:
    from pytorch_grad_cam import GradCAM

    loaded = load_model(cfg.model)
    model = loaded.module.eval()
    scan = scan_folder(resolve_dataset_root(cfg.dataset), list(cfg.dataset.extensions), cfg.dataset.labels,
                       cfg.dataset.limit)
    loader = make_loader(ImageFolderDataset(scan, loaded.preprocess), int(cfg.runtime.batch_size),
                         int(cfg.runtime.num_workers), pin_memory=False)
    images = 0
    start = time.perf_counter()
    cam = None
    for raw in loader:
        if not len(raw.indices):
            continue
        x = loaded.preprocess.normalize(raw.images)
        if cam is None:
            layer = default_target_layer(model, x[:1])
            cam = GradCAM(model=model, target_layers=[named_modules(model)[layer]])
            start = time.perf_counter()  # exclude the probe used to pick the layer
        cam(input_tensor=x, targets=None)
        images += len(raw.indices)
    return images / (time.perf_counter() - start)


def main(overrides: list[str]) -> None:
    defaults = ["model=resnet18", "model.weights=null", "analysis=[gradcam]"]
    cfg = compose_cfg(defaults + overrides)
    plain_loop(cfg)  # warm-up
    plain = plain_loop(cfg)
    ours, manifest = ours_per_second(cfg)
    theirs = pytorch_grad_cam_loop(cfg)
    print(f"model {cfg.model.name or cfg.model.source}, {manifest['counts']['processed']} images, batch "
          f"{cfg.runtime.batch_size}, {cfg.runtime.num_workers} workers, {manifest['device']}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    print(f"plain inference loop        {plain:8.1f} images/s   1.00")
    print(f"reportgen pass with gradcam {ours:8.1f} images/s   {ours / plain:.2f}")
    print(f"pytorch-grad-cam GradCAM    {theirs:8.1f} images/s   {theirs / plain:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
