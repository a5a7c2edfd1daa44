"""Which slice of the sorted file list a process takes: `runtime.shard=i/n`, or its rank under torchrun.

Slices are contiguous and as equal as possible (sizes differ by at most one), so concatenating the shards in order
gives back the sorted list: no image is done twice or missed (unlike DistributedSampler, which pads with repeats).
"""
from __future__ import annotations

import os
import re
from typing import Any, Optional, Tuple

from reportgen.errors import ConfigError

_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(spec: Any, count: Optional[int] = None) -> Optional[Tuple[int, int]]:
    """'2/8' -> (2, 8), or '2' with count 8 -> (2, 8); None stays None. ConfigError for anything else."""
    if spec is None or str(spec).strip().lower() in ("", "none", "null"):
        return None
    text = str(spec).strip()
    if text.isdigit() and count is not None:
        text = f"{text}/{count}"
    match = _SPEC.match(text)
    if not match or not int(match.group(2)) >= 1 or not int(match.group(1)) < int(match.group(2)):
        raise ConfigError("runtime.shard", spec, "'i/n' with 0 <= i < n, e.g. runtime.shard=0/8 (sweep: -m "
                                                 "runtime.shard=0/8,1/8,... or runtime.num_shards=8 "
                                                 "'runtime.shard=range(0,8)')")
    return int(match.group(1)), int(match.group(2))


def runtime_shard(runtime: Any) -> Optional[Tuple[int, int]]:
    """The shard a runtime config asks for (`shard`, with `num_shards` for a bare index)."""
    return parse_shard(runtime.shard, runtime.get("num_shards"))


def shard_bounds(total: int, shard: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    """[start, end) of shard (i, n) over `total` sorted files; the whole list without a shard."""
    if shard is None:
        return 0, total
    index, count = shard
    return (index * total) // count, ((index + 1) * total) // count


def torchrun_rank() -> Optional[Tuple[int, int, int]]:
    """(rank, world size, local rank) when started by torchrun with more than one process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or "RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0") or 0)
