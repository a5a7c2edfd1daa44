"""What `python run.py` (and the `reportgen` command) runs: one pipeline run, or under torchrun one shard per
rank that rank 0 merges (runs/distributed.py).

Kept apart from pipeline.py so the pipeline never imports the modules built on top of it (distributed, merge).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from reportgen.inputs.shards import runtime_shard, torchrun_rank
from reportgen.runs import distributed, pipeline


def launch(cfg: DictConfig, out_dir: Optional[Path] = None) -> Optional[Path]:
    """The report's index.html (or a shard's state.pt); None on torchrun ranks other than 0."""
    rank = torchrun_rank()
    if rank is not None and runtime_shard(cfg.runtime) is None:
        return distributed.run_ranks(cfg, out_dir, *rank)
    return pipeline.run(cfg, out_dir)
