"""Builds the sweep comparison page when a Hydra multirun ends (configured in conf/config.yaml), after merging
the sweep's shard jobs (`-m runtime.shard=0/8,...`) into one report per config.

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


class SweepIndexCallback(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from reportgen.report.sweep import build_index
        from reportgen.runs.merge import merge_sweep

        sweep_dir = Path(config.hydra.sweep.dir)
        for report in merge_sweep(sweep_dir):
            log.info("merged shards: %s", report)
            print(f"report: {report}")
        try:
            path = build_index(sweep_dir)
        except Exception as exc:  # the jobs' reports exist whatever happens here; say why the index does not
            log.error("could not build the sweep index in %s: %s: %s", sweep_dir, type(exc).__name__, exc)
            return
        log.info("sweep index: %s", path)
        print(f"index: {path}")
