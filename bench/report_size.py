"""Report size and page load time for a big folder: is a 1,000-image report still light to open and share?

    python bench/report_size.py                       # 1,002 generated demo images, the default analyses
    python bench/report_size.py --images 5000 analysis=[summary,predictions,gradcam]

Prints the report folder size, the single-file size, the render time, and the page's load time in Chromium
(Debian's /usr/bin/chromium through Playwright, when both are installed).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.throughput import compose_cfg  # noqa: E402
from reportgen.inputs.demo.shapes import CLASS_NAMES, generate_shapes_folder  # noqa: E402
from reportgen.runs.pipeline import run  # noqa: E402


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_shapes_folder(Path(tmp) / "shapes", per_class=-(-args.images // len(CLASS_NAMES)), seed=7)
        cfg = compose_cfg([f"dataset.root={root}", "report.single_file=true", *args.overrides])
        single = run(cfg, out_dir=Path(tmp) / "run")
        manifest = json.loads((Path(tmp) / "run" / "results" / "manifest.json").read_text())
        report_dir = Path(tmp) / "run" / "report"
        print(f"images {manifest['counts']['processed']} (+{manifest['counts']['failed']} broken), analyses "
              f"{', '.join(cfg.analysis.keys())}")
        print(f"report folder   {folder_bytes(report_dir) / 2**20:7.2f} MiB "
              f"({len(list((report_dir / 'assets').iterdir()))} assets)")
        print(f"single file     {single.stat().st_size / 2**20:7.2f} MiB")
        print(f"results folder  {folder_bytes(Path(tmp) / 'run' / 'results') / 2**20:7.2f} MiB")
        print(f"timings (s)     {manifest['timings_s']}")
        try:
            from tests.browser import open_page

            check = open_page(report_dir / "index.html")
            print(f"Chromium load   {check.load_seconds:7.2f} s, {check.images} images, "
                  f"{len(check.console_errors) + len(check.page_errors)} errors")
        except Exception as exc:  # no Chromium or Playwright here: the sizes above still stand
            print(f"Chromium load   not measured ({type(exc).__name__}: {exc})")


if __name__ == "__main__":
    main()
