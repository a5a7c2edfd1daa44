"""What one run has loaded before its pass: the config, the scanned folder, the model on its device, the analyses.

Built once by `pipeline.prepare` and shared by a plain run, a resumed run, a shard and a merge of shards.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from omegaconf import DictConfig

from reportgen.analyses import Analysis
from reportgen.inputs.data import ScanResult
from reportgen.inputs.models import LoadedModel


@dataclass
class Job:
    cfg: DictConfig
    out_dir: Path  # the run folder: report/ and results/
    root: Path  # the dataset folder
    scan: ScanResult  # the whole folder, sorted (a shard takes a slice of it)
    loaded: LoadedModel
    model: torch.nn.Module  # on `device`, in the configured memory format
    device: torch.device
    analyses: List[Analysis]  # in config order (the report's section order)
    shard: Optional[Tuple[int, int]] = None  # (index, count) of a shard run
    start: int = 0  # this process's slice of the sorted file list, [start, end)
    end: int = 0

    @property
    def results_dir(self) -> Path:
        return self.out_dir / "results"
