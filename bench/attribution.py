"""What the `attribution` analysis costs: the default report with and without it, same folder, one run each, and
the per-method seconds and forwards / backwards the analysis measured itself.

    python bench/attribution.py                                   # resnet18 (random weights), the demo folder
    python bench/attribution.py model=resnet50 model.weights=null dataset.root=DIR \
        analysis.attribution.images=16 analysis.attribution.sanity=[top_down]

Overrides go to both runs; `analysis.attribution.*` ones only matter to the second. The ratio is the whole
`pipeline.run` wall time (model build, probes, pass, finalize, render) of default + attribution over default alone.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.throughput import compose_cfg  # noqa: E402
from reportgen.runs.pipeline import run  # noqa: E402

DEFAULT = ["summary", "predictions", "gradcam", "activations", "weights", "graph", "knn", "embedding_maps",
           "segmentation", "detection"]


def timed_run(overrides: list[str]) -> tuple[float, Path, tempfile.TemporaryDirectory]:
    """Seconds of one report run and its (kept until the caller drops it) output folder."""
    folder = tempfile.TemporaryDirectory()
    cfg = compose_cfg(overrides)
    started = time.perf_counter()
    run(cfg, out_dir=Path(folder.name))
    return time.perf_counter() - started, Path(folder.name), folder


def main(overrides: list[str]) -> None:
    base = ["model=resnet18", "model.weights=null"]
    plain = [o for o in overrides if not o.startswith("analysis.attribution.")]
    timed_run(base + plain)  # warm-up: demo folder generation, page cache, first imports
    default_s, _, keep_default = timed_run(base + plain)
    analyses = "analysis=[" + ",".join(DEFAULT + ["attribution"]) + "]"
    with_s, out, keep_with = timed_run(base + [analyses] + overrides)
    report = json.loads((out / "results" / "faithfulness.json").read_text())
    settings = report["settings"]
    print(f"default report {default_s:7.1f} s; with attribution {with_s:7.1f} s; ratio {with_s / default_s:.2f} "
          f"({settings['images']} images scored, step {settings['step']}, ROAD on {settings['road_images']} "
          f"images, randomisation {settings['sanity_orders']} on {settings['sanity_images']} images, "
          f"{len(settings['blocks'])} blocks)")
    print(f"{'method':24s} {'F/img':>6s} {'B/img':>6s} {'maps s':>8s} {'deletion':>9s} {'insertion':>9s} "
          f"{'ROAD':>7s} {'rand. rho':>9s}")
    for name, entry in {**report["methods"], **report["controls"]}.items():
        cost = entry.get("cost", {})
        print(f"{name:24s} {cost.get('forwards', '-'):>6} {cost.get('backwards', '-'):>6} "
              f"{cost.get('seconds', float('nan')):8.2f} {entry['deletion_auc']:9.3f} {entry['insertion_auc']:9.3f} "
              f"{entry.get('road', float('nan')):7.3f} {entry.get('sanity_last') or float('nan'):9.3f}")
    keep_default.cleanup()
    keep_with.cleanup()


if __name__ == "__main__":
    main(sys.argv[1:])
