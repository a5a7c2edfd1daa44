"""The saved state of a run: what a checkpoint (resume) and a finished shard (merge) write to `results/state.pt`.

It holds every analysis's mergeable `state_dict()` plus the bookkeeping of the pass (which files are done, which
failed). Saved with `torch.save` through a temporary file and a rename, so a kill never leaves half a state; loaded
with `weights_only=True` and an allowlist of the project's reducer classes and numpy's array types, so a state file
from someone else's folder cannot run code (like checkpoints, see models.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from reportgen.errors import RunError
from reportgen.state.channel_reducers import ChannelStats, ChannelTopK, CovarianceMoments
from reportgen.state.files import write_atomic_with
from reportgen.state.reducers import BoundedTop, FixedHistogram, _Payload
from reportgen.state.streams import StreamRef

STATE_FILE = "state.pt"
FORMAT = 2  # the state's layout: 2 since crop heaps keep the cut box ("region", "centre") and prediction items
#   no thumbnail; load_state refuses other layouts with a clear error instead of failing at the end of the run


@dataclass
class RunState:
    """A run's progress over its slice of the sorted file list, `positions[start:end]`."""

    config: Dict[str, Any]  # the run's config (to_container), to refuse resuming or merging a different run
    start: int  # first position of the slice (0 unless a shard)
    end: int  # one past the last position
    done: int  # positions of the slice already consumed (== end - start when complete)
    shard: Optional[Tuple[int, int]]  # (index, count) or None
    found: int  # images the scan found in the whole folder
    folder: str = ""  # ScanResult.fingerprint(): the same files, not just as many
    processed: int = 0
    failed: List[Tuple[str, str]] = field(default_factory=list)  # (path, reason)
    notes: Dict[str, str] = field(default_factory=dict)  # capture notes
    warnings: List[str] = field(default_factory=list)  # e.g. batches halved after running out of memory
    pass_seconds: float = 0.0
    results_dir: str = ""  # where its streams were written (rebased when the folder moved)
    analyses: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # name -> state_dict()
    format: int = FORMAT  # the layout it was written in (states from before FORMAT 2 do not have it)

    @property
    def complete(self) -> bool:
        return self.done >= self.end - self.start


def config_differences(saved: Dict[str, Any], current: Dict[str, Any], ignore: Sequence[str] = ()) -> List[str]:
    """'key: saved -> current' for every leaf that differs between two config dicts, except the `ignore`d keys."""
    out: List[str] = []

    def walk(a: Any, b: Any, key: str) -> None:
        if key in ignore:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for name in sorted(set(a) | set(b)):
                walk(a.get(name), b.get(name), f"{key}.{name}" if key else name)
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")

    walk(saved, current, "")
    return out


def without_keys(config: Dict[str, Any], keys: Sequence[str]) -> Dict[str, Any]:
    """A copy of a config dict without the dotted `keys` (e.g. to group the shards of one run)."""
    def strip(node: Any, prefix: str) -> Any:
        if not isinstance(node, dict):
            return node
        return {k: strip(v, f"{prefix}{k}.") for k, v in node.items() if f"{prefix}{k}" not in keys}

    return strip(config, "")


def _allowed_globals() -> List[Any]:
    multiarray = (getattr(np, "_core", None) or np.core).multiarray
    numpy_types: List[Any] = [np.ndarray, np.dtype]
    for name in ("_reconstruct", "scalar"):  # numpy 2 renamed numpy.core: a state pickled under either loads
        function = getattr(multiarray, name)
        numpy_types += [(function, f"numpy.core.multiarray.{name}"), (function, f"numpy._core.multiarray.{name}")]
    numpy_types += [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32,
                                                 np.int64, np.uint8, np.bool_, object, np.str_)]
    return [RunState, StreamRef, BoundedTop, _Payload, FixedHistogram, ChannelStats, ChannelTopK,
            CovarianceMoments, *numpy_types, *_extra_globals]


_extra_globals: List[Any] = []


def allow_in_state(*objects: Any) -> None:
    """Let an analysis module put its own small classes (dataclasses of plain values) in its state."""
    _extra_globals.extend(objects)


def save_state(path: Path, state: RunState) -> None:
    """Atomically write `state` (temporary file in the same folder, then rename), streamed by torch.save into the
    file: serialising it in memory first held the state several times over at each checkpoint (a 38 MiB state
    raised the peak RSS by 150-230 MiB). On a full disk the file's own ENOSPC is raised, naming the checkpoint,
    and the last checkpoint stays."""
    write_atomic_with(Path(path), lambda handle: torch.save(state, handle), what="the checkpoint")


def load_state(path: Path) -> RunState:
    """Read a state file written by `save_state`, refusing anything but the allowlisted types."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            state = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"{path} is not a reportgen run state this version can read safely: {exc}") from exc
    if not isinstance(state, RunState):
        raise ValueError(f"{path} holds {type(state).__name__}, not a reportgen run state")
    written = state.__dict__.get("format", 1)
    if written != FORMAT:
        raise RunError(f"{path} was written by another reportgen version (state format {written}; this one reads "
                       f"{FORMAT}): set runtime.resume=false to start over, or finish that run with the version "
                       f"that started it")
    moved_from, moved_to = state.results_dir, str(path.parent)
    if moved_from and moved_from != moved_to:
        _rebase(state.analyses, moved_from, moved_to)
        state.results_dir = moved_to
    inside = path.parent.resolve()
    for ref in _refs(state.analyses):  # a state may only point at its own results folder
        if not Path(ref.location).resolve().is_relative_to(inside):
            raise ValueError(f"{path} points outside its results folder ({ref.location}): refused")
    return state


def _refs(value: Any):
    """Every StreamRef inside a state."""
    if isinstance(value, StreamRef):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _refs(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _refs(item)


def _rebase(value: Any, old: str, new: str) -> None:
    """Point the stream refs of a state whose folder was moved (copied off a cluster, renamed) at the new place."""
    for ref in _refs(value):
        if ref.location.startswith(old):
            ref.location = new + ref.location[len(old):]
