"""Where the pass's time goes: per step (decode wait, forward, each analysis's `update` and, for streamed layers,
`consume`) and, inside `activations`, per operation (cProfile of its consume and update, built-in torch calls
listed by name).

    python bench/profile_pass.py --images 320                  # resnet18, random weights, the scale folder
    python bench/profile_pass.py --images 320 analysis=[summary,predictions]   # any config overrides after the options

It runs `pipeline.run` once with the default six analyses on the cached JPEG folder of bench/scale.py, timing each
analysis's `update` and `consume` and the forward by wrapping them in this process (the code measured is the
project's own; `consume` runs inside the forward, so the forward's line is the rest of it). A thread samples the
resident set size every 10 ms, so the third table says in which phase of the run (setup, probes, pass, finalize,
render) the peak happens. Prints four markdown tables: seconds per batch by step, the top operations of
activations (own time), its project functions (callees included), and the peak RSS per phase.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.scale import SETS, make_jpeg_folder  # noqa: E402
from bench.throughput import compose_cfg  # noqa: E402


class RssSampler(threading.Thread):
    """Peak resident set size (MiB, from /proc/self/statm) per phase, sampled every 10 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.phase = "setup"
        self.peaks: Dict[str, float] = {}
        self.running = True
        self.page_mib = os.sysconf("SC_PAGE_SIZE") / 2**20

    def run(self) -> None:
        while self.running:
            with open("/proc/self/statm") as handle:
                rss = int(handle.read().split()[1]) * self.page_mib
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), rss)
            time.sleep(0.01)

    def during(self, phase: str, function):
        def wrapper(*a, **k):
            before, self.phase = self.phase, phase
            try:
                return function(*a, **k)
            finally:
                self.phase = before
        return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "reportgen-bench")
    parser.add_argument("--top", type=int, default=14,
                        help="operations listed for activations (its consume and update together)")
    parser.add_argument("--no-operations", action="store_true",
                        help="time the steps only: cProfile's own cost (about a third on consume) left out")
    args, rest = parser.parse_known_args()

    from reportgen.analyses import get_analysis
    from reportgen.runs import one_pass
    from reportgen.runs.pipeline import run

    count = max(args.images, 500)  # the folder of scale.py that holds enough images (was always the 500 one)
    root = make_jpeg_folder(args.cache / f"jpeg_{count}", count)
    cfg = compose_cfg([f"model={args.model}", "model.weights=null", f"dataset.root={root}",
                       f"dataset.limit={args.images}", "runtime.batch_size=32", "runtime.num_workers=2",
                       SETS["default"], *rest])
    seconds: Dict[str, float] = defaultdict(float)
    profiler = cProfile.Profile()

    def timed(name: str, function, profile: bool = False):
        def wrapper(*a, **k):
            started = time.perf_counter()
            if profile:
                profiler.enable()
            try:
                return function(*a, **k)
            finally:
                if profile:
                    profiler.disable()
                seconds[name] += time.perf_counter() - started
        return wrapper

    def profiled(name) -> bool:
        return str(name) == "activations" and not args.no_operations

    for name in cfg.analysis.keys():
        cls = get_analysis(str(name))
        cls.update = timed(f"update: {name}", cls.update, profile=profiled(name))
        if "consume" in vars(cls):  # streamed layers, reduced inside the forward
            cls.consume = timed(f"consume: {name}", cls.consume, profile=profiled(name))
    step = one_pass._Stepper._forward_and_update
    one_pass._Stepper._forward_and_update = timed("forward + updates", step)
    next_batch = one_pass._next_good_batch
    one_pass._next_good_batch = timed("wait for the next decoded batch", next_batch)
    from reportgen.runs import pipeline

    sampler = RssSampler()
    one_pass.begin_analyses = sampler.during("probes (begin)", one_pass.begin_analyses)
    one_pass.capture_engine_for = _entered(one_pass.capture_engine_for, sampler)
    pipeline.render_report = sampler.during("render", pipeline.render_report)
    for name in cfg.analysis.keys():
        cls = get_analysis(str(name))
        cls.finalize = sampler.during(f"finalize: {name}", cls.finalize)
    sampler.start()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        run(cfg, out_dir=Path(tmp))
        whole = time.perf_counter() - started
    sampler.running = False
    batches = -(-args.images // 32)
    updates = sum(v for k, v in seconds.items() if k.startswith(("update: ", "consume: ")))
    seconds["forward (forward + updates, less the updates and consumes)"] = seconds["forward + updates"] - updates
    print(f"\n{args.images} images, {batches} batches of 32, {args.model}, whole run {whole:.1f} s\n")
    print("| step | s per batch | share of forward + updates |")
    print("| --- | --- | --- |")
    for name, value in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {value / batches:.3f} | {value / seconds['forward + updates']:.0%} |")
    if "activations" in cfg.analysis and not args.no_operations:
        print_operations(profiler, batches, args.top)
    print("\n| phase | peak RSS |")
    print("| --- | --- |")
    for phase, peak in sampler.peaks.items():
        print(f"| {phase} | {peak:.0f} MiB |")


def print_operations(profiler: cProfile.Profile, batches: int, top: int) -> None:
    """The top operations of activations' `consume` and `update` by own time, seconds per batch."""
    stats = pstats.Stats(profiler, stream=io.StringIO())
    total = sum(row[2] for row in stats.stats.values())  # tottime of everything in activations.update
    rows = sorted(((row[2], func) for func, row in stats.stats.items()), reverse=True)[:top]
    print("\n| activations (consume + update): operation | s per batch | share of its work |")
    print("| --- | --- | --- |")
    for tottime, (file, line, name) in rows:
        where = name if file == "~" else f"{Path(file).name}:{line} {name}"
        print(f"| `{where}` | {tottime / batches:.4f} | {tottime / max(total, 1e-9):.0%} |")
    project = str(Path(__file__).resolve().parent.parent / "reportgen")
    inclusive = sorted(((row[3], func) for func, row in stats.stats.items() if func[0].startswith(project)),
                       reverse=True)[:top]
    print("\n| activations (consume + update): project function, callees included | s per batch | share of its work |")
    print("| --- | --- | --- |")
    for cumtime, (file, line, name) in inclusive:
        print(f"| `{Path(file).name}:{line} {name}` | {cumtime / batches:.4f} | {cumtime / max(total, 1e-9):.0%} |")


def _entered(engine_for, sampler: RssSampler):
    """The pass's capture engine, with the sampler's phase set to "pass" while it is entered."""
    def make(*args, **kwargs):
        engine = engine_for(*args, **kwargs)

        class Engine(type(engine)):
            def __enter__(self):
                sampler.phase = "pass"
                return super().__enter__()

            def __exit__(self, *exc_info):
                sampler.phase = "after the pass"
                return super().__exit__(*exc_info)
        engine.__class__ = Engine  # `with` looks __enter__ up on the class
        return engine
    return make

if __name__ == "__main__":
    main()
