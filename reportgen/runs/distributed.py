"""torchrun: `torchrun --nproc_per_node=N run.py ...` runs one shard per rank and rank 0 merges them.

Every rank takes the slice `rank/world` of the sorted file list (contiguous, no padding: DistributedSampler would
repeat images to even out the ranks) into `<run>/shards/<rank>/`, on GPU `LOCAL_RANK` where there are GPUs (NCCL)
or on the CPU (gloo). The ranks then exchange only their status; rank 0 merges the shard folders and renders the one
report into `<run>/`. A rerun of the same command resumes each unfinished shard from its checkpoint.
"""
from __future__ import annotations

import copy
import datetime as dt
import logging
from pathlib import Path
from typing import List, Optional

import torch

from reportgen.config.validate import select_device
from reportgen.errors import RunError
from reportgen.runs import pipeline

log = logging.getLogger("reportgen")
WAIT = dt.timedelta(days=2)  # how long ranks wait for the slowest one at the end (a large folder takes hours)


def run_ranks(cfg, out_dir: Optional[Path], rank: int, world: int, local_rank: int) -> Optional[Path]:
    """This rank's shard, then (rank 0) the merged report; returns its index.html on rank 0, None elsewhere."""
    import torch.distributed as dist


    device = select_device(cfg.runtime.device)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=WAIT)
    try:
        folder = [str(out_dir if out_dir is not None else pipeline.default_out_dir())]
        dist.broadcast_object_list(folder, src=0)  # every rank writes under rank 0's run folder
        root = Path(folder[0])
        shard_cfg = copy.deepcopy(cfg)
        shard_cfg.runtime.shard = f"{rank}/{world}"
        error: Optional[str] = None
        try:
            pipeline.run(shard_cfg, out_dir=shard_folder(root, rank))
        except Exception as exc:  # reported to every rank below, so none waits forever for a failed one
            error = f"rank {rank}: {type(exc).__name__}: {exc}"
            log.exception("rank %d failed", rank)
        errors: List[Optional[str]] = [None] * world
        dist.all_gather_object(errors, error)  # also the barrier: every shard is finished past this line
        failed = [e for e in errors if e]
        if failed:
            raise RunError(f"{len(failed)} of {world} ranks failed: " + " | ".join(failed))
        if rank != 0:
            return None
        if pipeline.finished_run(root):  # the same command again (a requeued job): the merged report stands
            return pipeline.already_finished(cfg, root)
        from reportgen.runs.merge import merge_runs

        return merge_runs([shard_folder(root, r) for r in range(world)], root)
    finally:
        dist.destroy_process_group()


def shard_folder(root: Path, rank: int) -> Path:
    return root / "shards" / str(rank)
