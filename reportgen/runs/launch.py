"""What `python run.py` (and the `reportgen` command) runs: one pipeline run, or under torchrun one shard per
rank that rank 0 merges (runs/distributed.py), with the stop-signal handlers of runs/signals.py in place.

Kept apart from pipeline.py so the pipeline never imports the modules built on top of it (distributed, merge).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from reportgen.inputs.shards import runtime_shard, torchrun_rank
from reportgen.runs import distributed, pipeline
from reportgen.runs.signals import stop_signals


def launch(cfg: DictConfig, out_dir: Optional[Path] = None) -> Optional[Path]:
    """The report's index.html (or a shard's state.pt); None on torchrun ranks other than 0."""
    rank = torchrun_rank()
    with stop_signals():  # Ctrl-C, SIGTERM, SLURM's time-limit USR2: checkpoint at a batch boundary, then stop
        if rank is not None and runtime_shard(cfg.runtime) is None:
            return distributed.run_ranks(cfg, out_dir, *rank)
        return pipeline.run(cfg, out_dir)
