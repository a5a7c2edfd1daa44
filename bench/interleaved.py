"""The pass's own cost, batch by batch: our step (the hooked forward, every analysis's consume and update, the
heap trim) against the plain `model(x)` under inference_mode on the same decoded batch, one right after the
other, the order swapped every batch.

    python bench/interleaved.py --images 640                # resnet18, random weights, the scale folder
    python bench/interleaved.py --images 640 analysis=[summary,predictions]   # config overrides after the options

Why: on a shared machine whose speed swings by tens of percent within minutes (bench/README.md), plain/ours
process pairs run minutes apart partly measure the machine; two measurements seconds apart on the same tensors
measure the code. The batches are decoded first and held (decode workers are left out), so this is the ratio of
the pass's compute, not of a whole run: `bench/scale.py` measures those. The plain side runs a copy of the model
made before any hook is attached, with the same weights and the same normalisation.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.scale import SETS, make_jpeg_folder  # noqa: E402
from bench.throughput import compose_cfg  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "reportgen-bench")
    args, rest = parser.parse_known_args()
    if args.images < 2 * args.batch_size:
        parser.error(f"--images must hold at least two batches ({2 * args.batch_size}): the first is a warm-up")

    from reportgen.config.validate import validate
    from reportgen.inputs.data import ImageFolderDataset, make_loader
    from reportgen.runs import one_pass
    from reportgen.runs.heap import release_free_memory
    from reportgen.runs.pipeline import prepare

    count = max(args.images, 500)  # a folder of scale.py that holds enough images
    root = make_jpeg_folder(args.cache / f"jpeg_{count}", count)
    cfg = compose_cfg([f"model={args.model}", "model.weights=null", f"dataset.root={root}",
                       f"dataset.limit={args.images}", f"runtime.batch_size={args.batch_size}",
                       "runtime.num_workers=2", SETS["default"], *rest])
    seconds: Dict[str, List[float]] = {"plain": [], "ours": []}
    with tempfile.TemporaryDirectory() as tmp:
        job = prepare(cfg, validate(cfg), Path(tmp), {})
        plain_model = copy.deepcopy(job.model).eval()  # before any hook: the loop a user would write
        example = one_pass.folder_example(job)
        one_pass.begin_analyses(job.analyses, example)
        del example
        loader = make_loader(ImageFolderDataset(job.scan, job.loaded.preprocess), args.batch_size,
                             int(cfg.runtime.num_workers), pin_memory=False)
        raws = [raw for raw in loader if len(raw.indices)]  # decoded once, held
        labels_lookup = torch.tensor(job.scan.labels + [-1], dtype=torch.int64)
        order = sorted(job.analyses, key=lambda a: not a.oom_safe)  # as the pass orders them
        release_free_memory()
        with one_pass._Stepper(job, order) as stepper:
            for number, raw in enumerate(raws):
                for side in (("plain", "ours") if number % 2 == 0 else ("ours", "plain")):
                    started = time.perf_counter()
                    if side == "plain":
                        with torch.inference_mode():
                            plain_model(job.loaded.preprocess.normalize(raw.images.to(job.device)))
                    else:
                        batch = one_pass.to_batch(raw, job, labels_lookup)
                        stepper.step(batch)
                        batch = None
                        release_free_memory()
                    if job.device.type == "cuda":
                        torch.cuda.synchronize()
                    seconds[side].append(time.perf_counter() - started)
    report(seconds, args, cfg)


def report(seconds: Dict[str, List[float]], args: argparse.Namespace, cfg) -> None:
    """Per-batch ratios plain / ours (the first batch, a warm-up for both, left out), their median and range, and
    the ratio of the totals."""
    plain, ours = seconds["plain"][1:], seconds["ours"][1:]
    ratios = [p / o for p, o in zip(plain, ours)]
    print(f"\n`python bench/interleaved.py {' '.join(sys.argv[1:])}`: {args.model}, batch {args.batch_size}, "
          f"analyses {', '.join(cfg.analysis.keys())}; {len(ratios)} batches after the first\n")
    print("| measure | plain s/batch | ours s/batch | ratio (plain / ours) |")
    print("| --- | --- | --- | --- |")
    print(f"| totals | {sum(plain) / len(plain):.3f} | {sum(ours) / len(ours):.3f} | {sum(plain) / sum(ours):.3f} |")
    print(f"| per batch, median (range {min(ratios):.3f} to {max(ratios):.3f}) | {statistics.median(plain):.3f} | "
          f"{statistics.median(ours):.3f} | {statistics.median(ratios):.3f} |")


if __name__ == "__main__":
    main()
