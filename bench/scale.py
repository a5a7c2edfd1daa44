"""The scale benchmark: a synthetic-but-realistic JPEG folder, the plain loop against our pass per analysis set,
peak memory, report size and render time, in one table. Each measurement runs in its own process, so peak RSS is
that run's alone.

    python bench/scale.py                                      # 500 images, resnet18 (random weights), CPU
    python bench/scale.py --images 500 5000 --sets default     # memory at 10x the images
    python bench/scale.py --device cuda --set-overrides runtime=gpu   # on a GPU: bf16, channels_last, pinned memory
    python bench/scale.py --marginal 64 320 --sets default     # whole processes: (time(320) - time(64)) per image
        # (wall and CPU seconds per image, the in-pass speed and peak RSS ratios at both sizes, then the same
        # difference split by stage of the run: one command for every number of the speed and memory goals)
    python bench/scale.py --images 500 --sets default --repeat 5   # five plain/ours pairs: the median ratio

The folder: photo-like JPEGs (smooth colour gradients, overlapping shapes, sensor-like noise, quality 85) of mixed
sizes from 320x240 to 800x600 in 10 class folders, made once and cached under --cache (default
/tmp/reportgen-bench). "plain" is the loop a user would write (same DataLoader, workers, batch size, preprocessing,
then `model(x)` under inference_mode); "ours" is `pipeline.run` with the given analyses (its pass, from the
manifest: the one-time probes are timed apart). Peak RSS is the main process's (the workers decode and hold only
prefetched batches). The plain loop is measured again right before each set and each ratio uses that neighbour,
with the 1-minute load average at both: on a shared machine the load changes from one minute to the next.
`--repeat N` measures N such pairs per set (and per marginal measure) and adds the median ratio and the range:
on a shared machine one pair can be 10% off either way. In `--marginal`, every second pair runs ours first.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SETS = {"summary,predictions": "analysis=[summary,predictions]",
        "+gradcam": "analysis=[summary,predictions,gradcam]",
        "default": "analysis=[summary,predictions,gradcam,activations,weights,graph]"}


def make_jpeg_folder(root: Path, count: int, seed: int = 0) -> Path:
    """`count` photo-like JPEGs in 10 class folders (cached: made once per count and seed)."""
    from PIL import Image, ImageDraw, ImageFilter

    done = root / ".complete"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    for i in range(count):
        width, height = int(rng.integers(320, 801)), int(rng.integers(240, 601))
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        base = np.stack([(rng.uniform(0, 255) + rng.uniform(-1, 1) * 120 * x / width
                          + rng.uniform(-1, 1) * 120 * y / height) for _ in range(3)], axis=-1)
        image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(3, 9))):
            x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
            box = [x0, y0, x0 + int(rng.integers(20, width // 2)), y0 + int(rng.integers(20, height // 2))]
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 2.0))))
        pixels = np.asarray(image).astype(np.float32) + rng.normal(0, 6, (height, width, 3))
        folder = root / f"class_{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"img_{i:06d}.jpg", quality=85)
    done.write_text(str(count))
    return root


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(kind: str, overrides: List[str]) -> Dict[str, float]:
    """One measurement in this process: the plain loop or our run; returns a JSON-able dict."""
    from bench.throughput import compose_cfg, plain_loop
    from reportgen.runs.pipeline import run

    cfg = compose_cfg(overrides)
    if kind == "plain":
        return {"images_per_second": plain_loop(cfg), "peak_rss_mib": peak_rss_mib(), "timings_s": {}}
    with tempfile.TemporaryDirectory() as tmp:
        run(cfg, out_dir=Path(tmp))
        manifest = json.loads((Path(tmp) / "results" / "manifest.json").read_text())
        timings = manifest["timings_s"]
        return {"images_per_second": manifest["images_per_second"], "peak_rss_mib": peak_rss_mib(),
                "report_mib": folder_bytes(Path(tmp) / "report") / 2**20,
                "results_mib": folder_bytes(Path(tmp) / "results") / 2**20,
                "finalize_render_s": timings.get("finalize", 0) + timings.get("render", 0),
                "probes_s": timings.get("probes", 0), "images": manifest["counts"]["processed"], "timings_s": timings}


def marginal_seconds(kind: str, overrides: List[str], small: int, large: int) -> Dict[str, object]:
    """Seconds per image of whole processes (start-up, probes, finalize and render included), as the difference
    of a run over `large` and one over `small` images: what cancels is every one-time cost. Also the same
    difference per stage of the run (`stages`: the manifest's timings; "loop" for the plain one, "outside the run"
    for the process's own start-up, imports and exit), so a stage that grows with the folder shows; the CPU
    seconds per image of the same difference (`cpu`: all cores, decode workers included); and each run's own
    loop or pass speed (`images_per_second`) and peak RSS (`peak_rss_mib`), keyed by its image count, so one pair
    also gives the in-pass ratio and the memory ratio at both sizes."""
    walls, cpus, stages, speeds, memory = [], [], [], {}, {}
    for count in (small, large):
        started = time.perf_counter()
        result = measure(kind, overrides + [f"dataset.limit={count}"])
        walls.append(time.perf_counter() - started)
        cpus.append(result["cpu_s"])
        speeds[count], memory[count] = result["images_per_second"], result["peak_rss_mib"]
        timings = dict(result["timings_s"]) or {"loop": count / result["images_per_second"]}
        if "total" in timings:  # what the run's own stages leave of its total (building analyses, checkpoints)
            timings["rest of the run"] = timings["total"] - sum(v for k, v in timings.items() if k != "total")
        timings["outside the run"] = walls[-1] - timings.get("total", timings.get("loop", 0.0))
        stages.append(timings)
    per_stage = {name: (stages[1].get(name, 0.0) - stages[0].get(name, 0.0)) / (large - small)
                 for name in stages[1] if name != "total"}
    return {"wall": (walls[1] - walls[0]) / (large - small), "cpu": (cpus[1] - cpus[0]) / (large - small),
            "stages": per_stage, "images_per_second": speeds, "peak_rss_mib": memory}


def measure(kind: str, overrides: List[str]) -> Dict[str, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, __file__, "--child", kind, *overrides], capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} {overrides} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # CPU seconds of the whole process tree (the decode workers are joined, so theirs count): less moved by the
    # other tenants' load than the wall clock, though cache and memory contention still move it by a few percent
    result["cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    result["load"] = os.getloadavg()[0]  # the machine's 1-minute load average as the measurement ended
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[500])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "reportgen-bench")
    parser.add_argument("--set-overrides", nargs="*", default=[], help="more config overrides for every run")
    parser.add_argument("--marginal", type=int, nargs=2, metavar=("SMALL", "LARGE"),
                        help="instead: whole-process seconds per image from runs over SMALL and LARGE images")
    parser.add_argument("--repeat", type=int, default=1, help="plain/ours pairs per set; the median ratio is shown")
    parser.add_argument("--child", choices=["plain", "ours"], help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        print(json.dumps(child(args.child, rest)))
        return
    rows = []
    started = time.perf_counter()
    if args.marginal:
        small, large = args.marginal
        root = make_jpeg_folder(args.cache / f"jpeg_{max(large, 500)}", max(large, 500))
        base = [f"model={args.model}", "model.weights=null", f"dataset.root={root}", f"runtime.device={args.device}",
                f"runtime.batch_size={args.batch_size}", f"runtime.num_workers={args.workers}", *args.set_overrides]
        print(f"\n`python bench/scale.py {' '.join(sys.argv[1:])}`: whole processes, time({large}) - time({small})\n")
        print("| analyses | plain s/image | ours s/image | ratio (plain / ours) | plain CPU s/image | ours CPU s/image "
              f"| CPU ratio | in-pass ratio at {small}, {large} | peak RSS ratio at {small}, {large} "
              f"| ours peak RSS at {large} | first | load |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        ratios: Dict[str, List[float]] = {}
        cpu_ratios: Dict[str, List[float]] = {}
        pass_ratios: Dict[str, List[float]] = {}
        rss_ratios: Dict[str, List[float]] = {}
        splits = []
        for name in args.sets:
            for pair in range(args.repeat):
                # every second pair runs ours first: a machine that slows under sustained load (or speeds up
                # when the page cache is warm) then favours neither side in the median
                order = ("ours", "plain") if pair % 2 else ("plain", "ours")
                found = {kind: marginal_seconds(kind, base + ([SETS[name]] if kind == "ours" else []), small, large)
                         for kind in order}
                plain, ours = found["plain"], found["ours"]
                speed = [ours["images_per_second"][n] / plain["images_per_second"][n] for n in (small, large)]
                rss = [ours["peak_rss_mib"][n] / plain["peak_rss_mib"][n] for n in (small, large)]
                ratios.setdefault(name, []).append(plain["wall"] / ours["wall"])
                cpu_ratios.setdefault(name, []).append(plain["cpu"] / ours["cpu"])
                for count, speed_ratio, rss_ratio in zip((small, large), speed, rss):
                    pass_ratios.setdefault(f"{name}, {count} images", []).append(speed_ratio)
                    rss_ratios.setdefault(f"{name}, {count} images", []).append(rss_ratio)
                splits.append((name, plain["stages"], ours["stages"]))
                print(f"| {name} | {plain['wall']:.4f} | {ours['wall']:.4f} | {plain['wall'] / ours['wall']:.2f} | "
                      f"{plain['cpu']:.4f} | {ours['cpu']:.4f} | {plain['cpu'] / ours['cpu']:.2f} | "
                      f"{speed[0]:.2f}, {speed[1]:.2f} | {rss[0]:.2f}, {rss[1]:.2f} | "
                      f"{ours['peak_rss_mib'][large]:.0f} MiB | {order[0]} | {os.getloadavg()[0]:.1f} |")
        print_medians(ratios, "plain / ours")
        print_medians(cpu_ratios, "CPU seconds, plain / ours")
        print_medians(pass_ratios, "in-pass speed ratio")
        print_medians(rss_ratios, "peak RSS ratio")
        print_stage_split(splits)
        return
    for count in args.images:
        root = make_jpeg_folder(args.cache / f"jpeg_{count}", count)
        base = [f"model={args.model}", "model.weights=null", f"dataset.root={root}", f"runtime.device={args.device}",
                f"runtime.batch_size={args.batch_size}", f"runtime.num_workers={args.workers}", *args.set_overrides]
        measure("plain", base)  # warm-up: page cache and first-touch costs
        for name in args.sets:
            for _ in range(args.repeat):
                plain = measure("plain", base)
                ours = measure("ours", base + [SETS[name]])
                rows.append((count, name, plain, ours))
                print(f"{count} images, {name}: plain {plain['images_per_second']:.1f}/s, ours "
                      f"{ours['images_per_second']:.1f}/s, RSS {ours['peak_rss_mib']:.0f} MiB", file=sys.stderr)
    print(f"\n`python bench/scale.py {' '.join(sys.argv[1:])}` ({args.model}, random weights, batch "
          f"{args.batch_size}, {args.workers} workers, device {args.device}; {time.perf_counter() - started:.0f} s)\n")
    print("| images | analyses | plain img/s | ours img/s | ratio | plain peak RSS | ours peak RSS | RSS ratio | "
          "report | results | finalize+render | probes | load (plain, ours) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for count, name, plain, ours in rows:
        print(f"| {count} | {name} | {plain['images_per_second']:.1f} | {ours['images_per_second']:.1f} | "
              f"{ours['images_per_second'] / plain['images_per_second']:.2f} | {plain['peak_rss_mib']:.0f} MiB | "
              f"{ours['peak_rss_mib']:.0f} MiB | {ours['peak_rss_mib'] / plain['peak_rss_mib']:.2f} | "
              f"{ours['report_mib']:.2f} MiB | {ours['results_mib']:.2f} MiB | {ours['finalize_render_s']:.1f} s | "
              f"{ours['probes_s']:.1f} s | {plain['load']:.1f}, {ours['load']:.1f} |")
    if args.repeat > 1:
        ratios: Dict[str, List[float]] = {}
        memory: Dict[str, List[float]] = {}
        for count, name, plain, ours in rows:
            ratios.setdefault(f"{count} images, {name}", []).append(
                ours["images_per_second"] / plain["images_per_second"])
            memory.setdefault(f"{count} images, {name}", []).append(ours["peak_rss_mib"] / plain["peak_rss_mib"])
        print_medians(ratios, "speed ratio")
        print_medians(memory, "peak RSS ratio")
    by_set: Dict[str, List] = {}
    for count, name, _, ours in rows:
        by_set.setdefault(name, []).append((count, ours["peak_rss_mib"]))
    for name, points in by_set.items():
        if len({count for count, _ in points}) > 1:  # more than one folder size
            (small, rss_small), (large, rss_large) = min(points), max(points)
            print(f"\npeak RSS, {name}: {rss_large:.0f} MiB at {large} images / {rss_small:.0f} MiB at {small} "
                  f"images = {rss_large / rss_small:.2f}x")


def print_stage_split(splits: List[Tuple[str, Dict[str, float], Dict[str, float]]]) -> None:
    """Per pair, the marginal milliseconds per image of each stage: where a whole-process gap comes from."""
    print("\n| analyses | plain: loop, outside the run (ms/image) | ours: " + ", ".join(
        name for name in splits[0][2]) + " (ms/image) |")
    print("| --- | --- | --- |")
    for name, plain, ours in splits:
        print(f"| {name} | {plain['loop'] * 1e3:.2f}, {plain['outside the run'] * 1e3:.2f} | "
              + ", ".join(f"{value * 1e3:.2f}" for value in ours.values()) + " |")


def print_medians(ratios: Dict[str, List[float]], what: str) -> None:
    """One line per set: the median of its repeated ratios and their range."""
    for name, values in ratios.items():
        if len(values) > 1:
            print(f"\n{name}: {what} median {statistics.median(values):.2f} over {len(values)} pairs "
                  f"(from {min(values):.2f} to {max(values):.2f})")


if __name__ == "__main__":
    main()
