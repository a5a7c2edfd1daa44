"""Builds the sweep comparison page when a Hydra multirun ends (configured in conf/config.yaml).

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
        from reportgen.index import build_index

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            path = build_index(sweep_dir)
        except Exception as exc:  # the jobs' reports exist whatever happens here; say why the index does not
            log.error("could not build the sweep index in %s: %s: %s", sweep_dir, type(exc).__name__, exc)
            return
        log.info("sweep index: %s", path)
        print(f"index: {path}")
