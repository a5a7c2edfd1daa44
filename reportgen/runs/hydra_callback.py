"""Builds the sweep's pages when a Hydra multirun ends (configured in conf/config.yaml): merges the sweep's shard
jobs (`-m runtime.shard=0/8,...`) into one report per config, compares the finished runs
(`<sweep>/comparison/index.html`, reportgen/runs/compare.py) and writes the job index (`<sweep>/index.html`).

Jobs catch their own errors in run.py and record them in their manifest, so one failing job neither stops the
sweep nor keeps this callback from running.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("reportgen")
COMPARISON_DIR = "comparison"  # <sweep>/comparison/: the comparison page and comparison.json/.csv


class SweepIndexCallback(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from reportgen.report.sweep import build_index
        from reportgen.runs.merge import merge_sweep

        sweep_dir = Path(config.hydra.sweep.dir)
        for report in merge_sweep(sweep_dir):
            log.info("merged shards: %s", report)
            print(f"report: {report}")
        self._compare(sweep_dir)
        try:
            path = build_index(sweep_dir)
        except Exception as exc:  # the jobs' reports exist whatever happens here; say why the index does not
            log.error("could not build the sweep index in %s: %s: %s", sweep_dir, type(exc).__name__, exc)
            return
        log.info("sweep index: %s", path)
        print(f"index: {path}")

    @staticmethod
    def _compare(sweep_dir: Path) -> None:
        """The comparison of the sweep's finished runs; a sweep with fewer than two gets none, and an error here is
        logged, never raised: the jobs' reports and the index stand without it."""
        from reportgen.runs.compare import compare_loaded, load_runs, run_folders

        try:
            runs, left_out = load_runs(run_folders([sweep_dir]))
            if len(runs) < 2:
                log.info("comparison: %d finished run(s) in %s, nothing to compare", len(runs), sweep_dir)
                return
            path = compare_loaded(runs, left_out, sweep_dir / COMPARISON_DIR)
        except Exception as exc:  # noqa: BLE001 - whatever breaks here must not end the sweep
            log.error("could not compare the runs of %s: %s: %s", sweep_dir, type(exc).__name__, exc)
            return
        log.info("comparison: %s", path)
        print(f"comparison: {path}")
