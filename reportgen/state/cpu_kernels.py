"""Fused CPU kernels for `channel_reducers`: the per-map statistics of a layer in one read of its values.

Eager PyTorch reads each (image, channel) map about seven times for its sum, centred norm, max, min and counts,
two of them with a write; on a CPU the analysed layers' values (100 MB a batch for resnet18's stem) come from memory
each time. These kernels read each map once from memory for sum, min, max and counts, then once more while it is
still in cache for the centred sum of squares, and find the maximum's position by scanning a map only up to it.
They are compiled by numba on first use (about 2 s, cached on disk after that) and run on torch's thread count.

What they return equals the eager path's meaning exactly, and more closely than the eager path where rounding
enters: min, max, counts and positions are exact; sum and centred sum of squares accumulate in float64 (two passes
about the map's float64 mean), so mean and M2 are within a few float64 units of the exact moments of the float32
values. Only float32 maps laid out as contiguous rows of (B * C, P) on the CPU are taken (`takes`); others (CUDA,
channels-last outputs, float64) keep the eager path. Set REPORTGEN_CPU_KERNELS=0 to use the eager path everywhere
(e.g. where numba is not installed it is used anyway).
"""
from __future__ import annotations

import functools
import os
import threading
from typing import Dict, Optional

import numpy as np
import torch

_LOCK = threading.Lock()  # numba's thread pools are not all safe to enter from two threads at once
_kernels = None  # the numba_kernels module once imported; False when numba is missing or switched off


def takes(x: torch.Tensor) -> bool:
    """Whether these kernels handle x (B, C, P): float32 on the CPU, each map a contiguous row, numba available."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 3 and x.is_contiguous()
            and x.numel() > 0 and _compiled() is not None)


def prepare() -> None:
    """Import numba and load (or, the first time on a machine, compile) the kernels now, on a tiny map: about 1 s
    that belongs to setup, not to the first batch of the pass."""
    tiny = torch.zeros(1, 1, 2)
    if takes(tiny):
        map_statistics(tiny, -1.0, 1.0, 1, np.array([-np.inf, -1.0, 1.0, np.inf]))
        first_positions(tiny, np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64), np.zeros(1))


def map_statistics(x: torch.Tensor, low: Optional[float], high: Optional[float], hist_stride: int = 0,
                   edges: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """(B, C) per map of x (B, C, P), see `takes`: `sum` and `m2` (float64: the sum of squared deviations from the
    map's own mean), `peak` (max) and `min` (float32 values), `zeros` (== 0) and, where a bound is given, `above`
    (>= high) and `below` (<= low) counts. With `edges` (float32 numbers, increasing, none 0, as `symlog_edges`
    makes them) also `hist` (bins,): the images' values at `sampled_positions(x, hist_stride)` binned like
    `torch.bucketize`, values beyond the ends in the end bins (no `hist` for other edges: bin them apart). A NaN or Inf makes that map's sum non-finite (the caller's signal to take its
    masked path); its min, max and histogram are then meaningless."""
    batch, channels, positions = x.shape
    maps = x.detach().numpy()
    out = {"sum": np.empty((batch, channels)), "m2": np.empty((batch, channels)),
           "peak": np.empty((batch, channels), dtype=np.float32), "min": np.empty((batch, channels), dtype=np.float32)}
    counts = np.empty((3, batch, channels), dtype=np.int32)  # zeros, above, below
    binning = _bin_table(None if edges is None else np.asarray(edges, dtype=np.float64).tobytes())
    table, inner_keys = binning or (np.zeros(1 << 16, dtype=np.int32), np.zeros(0, dtype=np.int32))
    hist = np.zeros((batch, len(inner_keys) + 1), dtype=np.int64)
    kernels = _compiled()
    with _LOCK:
        _use_torch_threads()
        kernels.map_statistics(maps, maps.view(np.int32), -np.inf if low is None else float(low),
                               np.inf if high is None else float(high), int(hist_stride) if binning else 0,
                               table, inner_keys, out["sum"], out["m2"], out["peak"].view(np.int32),
                               out["min"].view(np.int32), counts, hist)
    for name, row, bound in (("zeros", 0, 0.0), ("above", 1, high), ("below", 2, low)):
        if bound is not None:
            out[name] = counts[row].astype(np.int64)
    if binning:
        out["hist"] = hist.sum(axis=0)
    return out


@functools.lru_cache(maxsize=8)
def _bin_table(edges: Optional[bytes]):
    """`numba_kernels.bin_table` of these edges (float64 bytes), built once per set of edges; None without edges
    or where the kernel cannot bin over them (inner edges not float32 numbers, not increasing, or one of them 0)."""
    from reportgen.state import numba_kernels

    inner = None if edges is None else np.frombuffer(edges, dtype=np.float64)[1:-1]
    if inner is None or not (np.array_equal(inner.astype(np.float32), inner) and (inner != 0).all()
                             and (np.diff(inner) > 0).all()):
        return None
    return numba_kernels.bin_table(inner)


def first_positions(x: torch.Tensor, rows: np.ndarray, channels: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(n,) int64: for each (image, channel) pair, the first flat position in P where x (B, C, P), see `takes`,
    equals `targets` (n,) (its exact maximum: the first argmax). Each map is read only up to that position; -1
    where the value does not occur."""
    batch, channels_, positions = x.shape
    maps = x.detach().view(batch * channels_, positions).numpy()
    found = np.empty(len(rows), dtype=np.int64)
    kernels = _compiled()
    with _LOCK:
        _use_torch_threads()
        kernels.first_positions(maps, (np.asarray(rows) * channels_ + np.asarray(channels)).astype(np.int64),
              np.asarray(targets, dtype=np.float32), found)
    return found


def _use_torch_threads() -> None:
    import numba

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def _compiled():
    """The kernels' module (numba_kernels), or None (numba missing, or REPORTGEN_CPU_KERNELS=0)."""
    global _kernels
    if _kernels is None:
        with _LOCK:
            if _kernels is None:
                _kernels = _compile() if os.environ.get("REPORTGEN_CPU_KERNELS", "1") != "0" else False
    return _kernels or None


def _compile():
    try:
        from reportgen.state import numba_kernels
    except ImportError:  # numba not installed
        return False
    return numba_kernels
