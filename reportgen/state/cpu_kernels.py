"""Fused CPU kernels for `channel_reducers`: the per-map statistics of a layer in one read of its values.

Eager PyTorch reads each (image, channel) map about seven times for its sum, centred norm, max, min and counts,
two of them with a write; on a CPU the analysed layers' values (100 MB a batch for resnet18's stem) come from memory
each time. The C kernels of `map_kernels.c` read each map once from memory for sum, min, max, counts and the
histogram sample, then once more while it is still in cache for the centred sum of squares, and find the maximum's
position by scanning a map only up to it. setup.py compiles them with the package (`pip install`; a C compiler
with OpenMP, e.g. gcc); they run on torch's thread count and add no measurable memory.

What they return has the eager path's meaning exactly, and is closer where rounding enters: min, max, counts,
histograms and positions are exact; sum and centred sum of squares accumulate in float64 (two passes about the
map's float64 mean), so mean and M2 are within a few float64 units of the exact moments of the float32 values.
Only float32 maps on the CPU are taken (`takes`), read as rows of (B * C, P): `batch_reductions` copies other
layouts (channels-last outputs, token grids) into rows a few images at a time. CUDA and float64 tensors keep the
eager path, and so does everything where the library was not built or REPORTGEN_CPU_KERNELS=0 is set.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

TABLE_SHIFT = 16  # bin_table: one entry per 2^16 consecutive float keys (as in map_kernels.c)
MAGNITUDE = np.int32(0x7FFFFFFF)


def takes(x: torch.Tensor) -> bool:
    """Whether these kernels handle x (B, C, P): float32 on the CPU, the library built. They read maps laid out as
    rows (x contiguous); callers copy other layouts into rows first (`channel_reducers.batch_reductions`)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 3 and x.numel() > 0
            and library() is not None)


def map_statistics(x: torch.Tensor, low: Optional[float], high: Optional[float], hist_stride: int = 0,
                   edges: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """(B, C) per map of x (B, C, P), see `takes`: `sum` and `m2` (float64: the sum of squared deviations from the
    map's own mean), `peak` (max) and `min` (float32 values), `zeros` (== 0) and, where a bound is given, `above`
    (>= high) and `below` (<= low) counts. With `edges` (float32 numbers, increasing, none 0, as `symlog_edges`
    makes them) also `hist` (bins,): the images' values at `sampled_positions(x, hist_stride)` binned like
    `torch.bucketize`, values beyond the ends in the end bins (no `hist` for other edges: bin them apart). A NaN or
    Inf makes that map's sum non-finite (the caller's signal to take its masked path); its min, max and histogram
    are then meaningless."""
    batch, channels, positions = x.shape
    maps = _rows(x)
    out = {"sum": np.empty((batch, channels)), "m2": np.empty((batch, channels)),
           "peak": np.empty((batch, channels), dtype=np.float32), "min": np.empty((batch, channels), dtype=np.float32)}
    counts = np.empty((3, batch, channels), dtype=np.int64)  # zeros, above, below
    binning = _bin_table(None if edges is None else np.asarray(edges, dtype=np.float64).tobytes())
    table, inner_keys = binning or (np.zeros(1 << 16, dtype=np.int32), np.zeros(0, dtype=np.int32))
    hist = np.zeros((batch, len(inner_keys) + 1), dtype=np.int64)
    library().map_statistics(
        _pointer(maps), batch, channels, positions, -np.inf if low is None else float(np.float32(low)),
        np.inf if high is None else float(np.float32(high)), int(hist_stride) if binning else 0, _pointer(table),
        _pointer(inner_keys), len(inner_keys), _pointer(out["sum"]), _pointer(out["m2"]), _pointer(out["peak"]),
        _pointer(out["min"]), _pointer(counts), _pointer(hist), torch.get_num_threads())
    for name, row, bound in (("zeros", 0, 0.0), ("above", 1, high), ("below", 2, low)):
        if bound is not None:
            out[name] = counts[row]
    if binning:
        out["hist"] = hist.sum(axis=0)
    return out


def first_positions(x: torch.Tensor, rows: np.ndarray, channels: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(n,) int64: for each (image, channel) pair, the first flat position in P where x (B, C, P), see `takes`,
    equals `targets` (n,) (its exact maximum: the first argmax). Each map is read only up to that position; -1
    where the value does not occur."""
    batch, channels_, positions = x.shape
    maps = _rows(x)
    picked = np.ascontiguousarray(np.asarray(rows, dtype=np.int64) * channels_ + np.asarray(channels, dtype=np.int64))
    wanted = np.ascontiguousarray(targets, dtype=np.float32)
    found = np.empty(len(picked), dtype=np.int64)
    library().first_positions(_pointer(maps), positions, _pointer(picked), _pointer(wanted), len(picked),
                              _pointer(found), torch.get_num_threads())
    return found


def float_key(values: np.ndarray) -> np.ndarray:
    """int32 keys of float32 values that order as the values do (NaN aside; -0 just below +0): the bits, with the
    magnitude bits flipped where the sign bit is set (map_kernels.c's float_key)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.int32)
    return bits ^ ((bits >> 31) & MAGNITUDE)


@functools.lru_cache(maxsize=8)
def _bin_table(edges: Optional[bytes]):
    """(table, inner_keys) for map_statistics' histogram over these edges (float64 bytes), built once per set of
    edges; None without edges or where the kernel cannot bin over them (inner edges not float32 numbers, not
    increasing, or one of them 0). A value's bin is the number of inner edges <= it; table[t] counts the edges whose
    keys lie below key block t (the keys from (t - 32768) << TABLE_SHIFT on), and the kernel compares the value with
    the edges inside its own block, so the bin is exact for any edges (the default symlog edges, 8 a decade, put at
    most one edge in a block)."""
    inner = None if edges is None else np.frombuffer(edges, dtype=np.float64)[1:-1]
    if inner is None or not (np.array_equal(inner.astype(np.float32), inner) and (inner != 0).all()
                             and (np.diff(inner) > 0).all()):
        return None
    inner_keys = np.ascontiguousarray(float_key(inner), dtype=np.int32)
    starts = (np.arange(1 << 16, dtype=np.int64) - 32768) << TABLE_SHIFT
    return np.searchsorted(inner_keys.astype(np.int64), starts, side="left").astype(np.int32), inner_keys


def _rows(x: torch.Tensor) -> np.ndarray:
    """x (B, C, P) as the numpy array the kernels read, without a copy: each map one contiguous row."""
    if not x.is_contiguous():
        raise ValueError("cpu_kernels read maps laid out as rows: pass a contiguous (B, C, P) tensor")
    return x.detach().numpy()


def _pointer(array: np.ndarray) -> ctypes.c_void_p:
    assert array.flags.c_contiguous
    return ctypes.c_void_p(array.ctypes.data)


@functools.lru_cache(maxsize=1)
def library() -> Optional[ctypes.CDLL]:
    """The compiled map_kernels library next to this file, or None (not built, or REPORTGEN_CPU_KERNELS=0)."""
    if os.environ.get("REPORTGEN_CPU_KERNELS", "1") == "0":
        return None
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_map_kernels{suffix}"
        if path.exists():
            lib = ctypes.CDLL(str(path))
            int64, double, pointer = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p
            lib.map_statistics.argtypes = [pointer, int64, int64, int64, double, double, int64, pointer, pointer,
                                           int64] + [pointer] * 6 + [ctypes.c_int]
            lib.first_positions.argtypes = [pointer, int64, pointer, pointer, int64, pointer, ctypes.c_int]
            return lib
    return None
