"""Streaming, mergeable reductions of layer activations: memory stays flat however large the folder, and the
state of any split of the data merges into exactly the state of the whole.

- `batch_reductions` runs on the device, on one batch of one layer, a few passes over its values (a cache-sized
  chunk of images at a time): per image and channel the sum, centred sum of squares, min, max, zero and saturated
  counts, and a fixed-edge histogram of the layer's values at fixed sampled positions; `peak_positions` finds the
  maximum's position only where a caller needs it. Only these small (B, C) results cross to the CPU
  (`to_host`: one transfer), where they become per-channel count, mean, M2 (float64), min, max and counts. On a
  CPU, float32 maps go to the fused C kernels of `cpu_kernels` instead (one read of each map from memory).
- `ChannelStats` merges per-batch moments with Chan et al.'s parallel update in float64, so mean and std equal a
  two-pass computation over every value to rounding.
- `ChannelTopK`: per channel, the k images with the highest spatial maximum; vectorised (C, k) arrays instead of C
  heaps, same ordering as `reducers.BoundedTop` (larger score first, ties to the smaller image index).
- `CovarianceMoments`: mean and centred second moment of feature vectors (float64, on the device), for a PCA of the
  whole folder at the end.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from reportgen.state import cpu_kernels

HIST_SAMPLE = 4096  # default histogram sample: at most this many values of each image per layer
# images reduced together: at most this many values a chunk (one image when it is more). On a CPU a chunk that fits
# in a core's L2 cache is read from memory once for all its passes (resnet18's stem: 44 -> 31 ms a batch); other
# devices take larger chunks, for fewer kernel launches. The work buffer is one chunk.
CHUNK_VALUES = {"cpu": 1 << 19}  # 2 MiB of float32
CHUNK_VALUES_ELSEWHERE = 1 << 24  # 64 MiB of float32
NORM_BLOCK = 1 << 14  # positions per float32 norm of centred values (longer maps: several, added in float64)


def symlog_edges(min_abs: float, max_abs: float, per_decade: int) -> np.ndarray:
    """Histogram edges symmetric about 0, log-spaced from min_abs to max_abs on each side: one fixed set of edges
    fits layers whose scales differ by orders of magnitude, and fixed edges keep shard histograms addable. The
    middle bin [-min_abs, min_abs) holds 0; values beyond ±max_abs fall into the end bins. The edges are float32
    numbers (returned as float64), so binning float32 activations on the device equals numpy's float64 binning."""
    decades = np.log10(max_abs) - np.log10(min_abs)
    positive = np.logspace(np.log10(min_abs), np.log10(max_abs), int(round(decades * per_decade)) + 1)
    return np.concatenate([-positive[::-1], positive]).astype(np.float32).astype(np.float64)


class Scratch:
    """One reusable work buffer for `batch_reductions`: its (B, C, P) temporaries (centred values, 0/1 masks) are
    written here instead of into fresh tensors per layer and batch, so the pass neither page-faults a new buffer
    each time nor grows the heap with differently sized temporaries. `batch_reductions` fills it a few images at a
    time, so it stays one chunk (see CHUNK_VALUES) however large the layer."""

    def __init__(self) -> None:
        self.storage: Optional[torch.Tensor] = None

    def like(self, x: torch.Tensor) -> torch.Tensor:
        """A contiguous tensor of x's shape, dtype and device (its values are whatever was left there)."""
        size = x.numel()
        if (self.storage is None or self.storage.numel() < size or self.storage.dtype != x.dtype
                or self.storage.device != x.device):
            self.storage = None  # the old buffer goes before the new one comes
            self.storage = torch.empty(size, dtype=x.dtype, device=x.device)
        return self.storage[:size].view(x.shape)


def histogram_stride(channels: int, positions: int, sample: int) -> int:
    """Every how many of an image's C x P values a layer's histogram counts so that it sees at most `sample` of
    them: 1 (every value) for small layers or `sample` 0, else the smallest prime that is enough and does not divide
    P. Such a stride starts each channel at another offset and steps across rows and columns of the map, so the
    sample covers every channel and every region instead of the same few columns."""
    values = channels * positions
    if sample <= 0 or values <= sample:
        return 1
    stride = -(-values // sample)
    while positions % stride == 0 or any(stride % d == 0 for d in range(2, int(stride ** 0.5) + 1)):
        stride += 1
    return stride


def sampled_positions(x: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, C, P) -> (B, n): each image's values at flat (channel, position) indices 0, stride, 2 stride, ... The
    same positions in every image, whatever batch it arrives in, so a histogram of them merges exactly across
    batches and shards; stride 1 is every value."""
    flat = x.reshape(x.shape[0], -1)  # (B, C * P)
    return flat if stride == 1 else flat[:, ::stride]


def batch_reductions(x: torch.Tensor, edges: torch.Tensor, low: Optional[float] = None,
                     high: Optional[float] = None, hist_stride: int = 1,
                     scratch: Optional[Scratch] = None) -> Dict[str, np.ndarray]:
    """Reduce one batch of one layer, (B, C, P) values, on its device; returns numpy arrays (one transfer).

    Per channel (C,): `count` finite values, their `mean` and `m2` (sum of squared deviations, float64), `min`,
    `max`, `zeros` (values == 0), `saturated` (values >= high or <= low; a None bound is not applied) and
    `nonfinite` (NaN/Inf, left out of everything else). `hist` (bins,): the layer's finite values at the positions
    `sampled_positions(x, hist_stride)` over `edges` (float32-exact, see `symlog_edges`), out-of-range values in the
    end bins. Per image and channel (B, C): `peak`, the spatial maximum of the finite values (-inf when there are
    none; `peak_positions` finds where it is, for the few images and channels that need it: a max with indices
    over every value costs three times a plain max on a CPU), and `image_mean` (float64; only when every value is
    finite).

    The device does only per-image work; the host merges its (B, C) results in float64 (Chan's update with equal
    counts). On a CPU, float32 maps go to `cpu_kernels` (one read of each map from memory: float64 sum and centred
    sum of squares, min, max, counts and the histogram sample; other layouts copied into rows a chunk at a time),
    within float64 rounding of the exact moments. Elsewhere (CUDA, float64) eager torch ops do a few passes over x, a few images at
    a time: each image's channel sum (float32), the root of its sum of squared deviations from that image's mean
    (the centred values go to `scratch`: two passes, no cancellation; per run of NORM_BLOCK positions), min, max,
    zero and saturated counts. Either path keeps |mean error| and |std error| within 2^-20 (8 float32 units) times
    the channel's root mean square against the exact moments of the float32 values, which
    `tests/test_activations.py` checks on data built to cancel. With a NaN/Inf anywhere, a float64 masked path."""
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # (B, C, P) bf16/fp16 under autocast
    batch, channels, positions = x.shape
    if cpu_kernels.takes(x):  # one fused read of each map (float64 sums, the histogram sample), see cpu_kernels
        host = _kernel_reductions(x, low, high, hist_stride, edges.numpy(), scratch)
        if "hist" not in host:  # edges the kernel cannot bin over
            host["hist"] = _histogram(sampled_positions(x, hist_stride), edges, finite_only=False).numpy()
    else:
        device = _per_image_reductions(x, low, high, scratch or Scratch())  # (B, C) each
        device["hist"] = _histogram(sampled_positions(x, hist_stride), edges, finite_only=False)
        host = to_host(device)
        host["m2"] = (host.pop("root_m2") ** 2).sum(axis=2)  # (B, C) from the blocks' norms
    if not (np.isfinite(host["sum"]).all() and np.isfinite(host["m2"]).all()):  # NaN/Inf, or an overflow
        return _masked_reductions(x, edges, low, high, hist_stride)
    image_mean = host["sum"] / positions  # (B, C) float64
    mean = image_mean.mean(axis=0)  # (C,)
    saturated = sum((host[name].sum(axis=0) for name in ("above", "below") if name in host), np.zeros(channels))
    return {"count": np.full(channels, batch * positions, dtype=np.int64), "mean": mean,
            "m2": host["m2"].sum(axis=0) + positions * ((image_mean - mean) ** 2).sum(axis=0),
            "min": host["min"].min(axis=0).astype(np.float64), "max": host["peak"].max(axis=0).astype(np.float64),
            "zeros": host["zeros"].sum(axis=0).astype(np.int64), "saturated": saturated.astype(np.int64),
            "nonfinite": np.zeros(channels, dtype=np.int64), "peak": host["peak"].astype(np.float64),
            "image_mean": image_mean,
            "hist": host["hist"]}


def _kernel_reductions(x: torch.Tensor, low: Optional[float], high: Optional[float], hist_stride: int,
                       edges: np.ndarray, scratch: Optional[Scratch]) -> Dict[str, np.ndarray]:
    """`cpu_kernels.map_statistics` of x (B, C, P). Maps not laid out as rows (channels-last layers, token grids)
    are copied into rows a chunk of images at a time (CHUNK_VALUES) through `scratch`, so the copy stays one chunk
    however large the layer; each image's results depend on its own values only, so chunks change no result."""
    if x.is_contiguous():
        return cpu_kernels.map_statistics(x, low, high, hist_stride, edges)
    scratch = scratch or Scratch()
    batch, channels, positions = x.shape
    step = max(1, CHUNK_VALUES["cpu"] // max(1, channels * positions))
    parts = [cpu_kernels.map_statistics(scratch.like(x[start:start + step]).copy_(x[start:start + step]), low, high,
                                        hist_stride, edges) for start in range(0, batch, step)]
    return {name: (sum(part[name] for part in parts) if name == "hist"
                   else np.concatenate([part[name] for part in parts])) for name in parts[0]}


def _masked_reductions(x: torch.Tensor, edges: torch.Tensor, low: Optional[float], high: Optional[float],
                       hist_stride: int) -> Dict[str, np.ndarray]:
    """`batch_reductions` of a batch holding NaN/Inf: float64 over the finite values only (rare, so plainly)."""
    batch, channels, positions = x.shape
    finite = torch.isfinite(x)  # (B, C, P)
    count = finite.sum(dim=(0, 2))  # (C,)
    wide = torch.where(finite, x.to(torch.float64), 0.0)  # (B, C, P)
    mean = wide.sum(dim=(0, 2)) / count.clamp_min(1)
    deviation = torch.where(finite, wide - mean[None, :, None], 0.0)  # (B, C, P)
    peak = torch.where(finite, x, -torch.inf).amax(dim=2)  # (B, C)
    saturated = torch.zeros(channels, dtype=torch.int64, device=x.device)
    for bound, beyond in ((high, torch.ge), (low, torch.le)):
        if bound is not None:
            saturated += (beyond(x, bound) & finite).sum(dim=(0, 2))
    return to_host({"count": count, "mean": mean, "m2": (deviation * deviation).sum(dim=(0, 2)),
                    "min": torch.where(finite, x, torch.inf).amin(dim=(0, 2)), "max": peak.amax(dim=0),
                    "zeros": (x == 0).sum(dim=(0, 2)), "saturated": saturated,
                    "nonfinite": batch * positions - count, "peak": peak,
                    "hist": _histogram(sampled_positions(x, hist_stride), edges, finite_only=True)})


def peak_positions(x: torch.Tensor, wanted: np.ndarray, finite: bool = False,
                   peaks: Optional[np.ndarray] = None) -> np.ndarray:
    """(B, C) int64: for the (image, channel) pairs where `wanted` (B, C) is True, the flat index into P of the
    largest finite value of x (B, C, P) (the first one on ties; 0 when none is finite); -1 elsewhere. `finite`: the
    caller knows x holds no NaN/Inf (batch_reductions' `nonfinite` counts are all 0), which saves a pass. `peaks`
    (B, C): the maps' maxima from batch_reductions; with them and `finite`, a CPU kernel reads each wanted map only
    up to its maximum's first position."""
    positions = np.full(wanted.shape, -1, dtype=np.int64)
    rows, channels = np.nonzero(wanted)
    if not len(rows):
        return positions
    if finite and peaks is not None and cpu_kernels.takes(x) and x.is_contiguous():
        positions[rows, channels] = cpu_kernels.first_positions(x, rows, channels, peaks[rows, channels])
        return positions
    if not finite:
        x = torch.where(torch.isfinite(x), x, -torch.inf)  # (B, C, P), rare: only batches holding NaN/Inf
    if 4 * len(rows) > wanted.size:  # most pairs: one max over every value is cheaper than gathering them
        positions[rows, channels] = x.max(dim=2).indices.cpu().numpy()[rows, channels]
    else:  # the usual case once the top-k are full: a few (image, channel) maps
        if x.is_contiguous():  # whole rows of the (B * C, P) view: a copy of n maps, row by row
            picked = x.view(-1, x.shape[2]).index_select(0, torch.as_tensor(rows * x.shape[1] + channels,
                                                                             device=x.device))
        else:
            picked = x[torch.as_tensor(rows, device=x.device), torch.as_tensor(channels, device=x.device)]
        positions[rows, channels] = picked.argmax(dim=1).cpu().numpy()  # picked: (n, P)
    return positions


def _per_image_reductions(x: torch.Tensor, low: Optional[float], high: Optional[float],
                          scratch: Scratch) -> Dict[str, torch.Tensor]:
    """(B, C) per image and channel: `sum`, `root_m2` ((B, C, blocks): the norms of the values centred on the
    image's mean, `_blocked_norms`), `peak` (max), `min` and the `zeros`, `above` (>= high) and `below` (<= low)
    counts. A chunk of images at a time
    (CHUNK_VALUES), every pass over it while it is in cache; the temporaries go through `scratch`. Each image's
    results depend on its own values only, so the chunking changes no result."""
    batch, channels, positions = x.shape
    step = max(1, CHUNK_VALUES.get(x.device.type, CHUNK_VALUES_ELSEWHERE) // max(1, channels * positions))
    parts: Dict[str, List[torch.Tensor]] = {}
    for start in range(0, batch, step):
        chunk = x[start:start + step]  # (b, C, P)
        sums = chunk.sum(dim=2)  # (b, C)
        centred = torch.sub(chunk, (sums / positions)[:, :, None], out=scratch.like(chunk))
        found = {"sum": sums, "root_m2": _blocked_norms(centred), "peak": chunk.amax(dim=2),
                 "min": chunk.amin(dim=2), "zeros": _count(torch.eq, chunk, 0, scratch)}
        for name, bound, beyond in (("above", high, torch.ge), ("below", low, torch.le)):
            if bound is not None:
                found[name] = _count(beyond, chunk, bound, scratch)
        for name, value in found.items():
            parts.setdefault(name, []).append(value)
    return {name: values[0] if len(values) == 1 else torch.cat(values) for name, values in parts.items()}


def _blocked_norms(x: torch.Tensor) -> torch.Tensor:
    """(B, C, P) -> (B, C, blocks): the norms of each map's runs of NORM_BLOCK positions (and of the rest). A
    float32 norm over one long run loses precision as the run grows (2^-19 of the sum of squares at a million
    values on a CPU); blocks keep it near 2^-23, and the host adds their squares in float64."""
    positions = x.shape[2]
    if positions <= NORM_BLOCK:
        return torch.linalg.vector_norm(x, dim=2)[:, :, None]
    whole = positions // NORM_BLOCK * NORM_BLOCK
    parts = [torch.linalg.vector_norm(x[:, :, :whole].unflatten(2, (-1, NORM_BLOCK)), dim=3)]  # (B, C, blocks)
    if whole < positions:
        parts.append(torch.linalg.vector_norm(x[:, :, whole:], dim=2)[:, :, None])
    return torch.cat(parts, dim=2)


def _count(compare, x: torch.Tensor, value: float, scratch: Scratch) -> torch.Tensor:
    """(B, C) counts of `compare(x, value)` per image and channel. The 0/1 results are written as x's floats into
    the scratch buffer and summed: exact below 2^24 positions, and far faster on a CPU than summing a bool tensor."""
    if x.shape[2] >= 1 << 24:
        return compare(x, value).sum(dim=2)
    return compare(x, value, out=scratch.like(x)).sum(dim=2)


def _histogram(values: torch.Tensor, edges: torch.Tensor, finite_only: bool) -> torch.Tensor:
    """(bins,) int64 counts of `values` (any shape) over `edges`, out-of-range ones in the end bins; with
    `finite_only`, NaN/Inf are left out (without it, the caller knows there are none)."""
    inner = edges[1:-1].to(device=values.device, dtype=values.dtype)
    bins = len(edges) - 1
    values = values.contiguous()  # a strided sample: one small copy
    bucket = torch.bucketize(values, inner, right=True, out_int32=True).flatten()  # bin index per value
    if finite_only:
        bucket = torch.where(torch.isfinite(values).flatten(), bucket, bins)  # to a dropped bin past the last
    return torch.bincount(bucket, minlength=bins + 1)[:bins]


def to_host(tensors: Dict[str, torch.Tensor]) -> Dict[str, np.ndarray]:
    """Move a dict of small tensors to numpy in one device-to-host transfer (float64 holds every int64 count and
    float32 value of a batch exactly); integer tensors come back as int64."""
    names = list(tensors)
    packed = torch.cat([tensors[n].detach().reshape(-1).to(torch.float64) for n in names]).cpu().numpy()
    out, offset = {}, 0
    for name in names:
        tensor = tensors[name]
        size = tensor.numel()
        array = packed[offset:offset + size].reshape(tuple(tensor.shape))
        is_int = not (tensor.dtype.is_floating_point or tensor.dtype.is_complex)
        out[name] = array.astype(np.int64) if is_int else array
        offset += size
    return out


class ChannelStats:
    """Per-channel count, mean, M2, min, max, zero / saturated / non-finite counts of a layer, float64, merged
    exactly in any order (Chan, Golub & LeVeque 1979: the pairwise update of mean and M2)."""

    FIELDS = ("count", "mean", "m2", "min", "max", "zeros", "saturated", "nonfinite")

    def __init__(self, channels: int):
        self.count = np.zeros(channels, dtype=np.int64)  # finite values seen
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)  # sum of squared deviations from the mean
        self.min = np.full(channels, np.inf)
        self.max = np.full(channels, -np.inf)
        self.zeros = np.zeros(channels, dtype=np.int64)  # values exactly 0
        self.saturated = np.zeros(channels, dtype=np.int64)
        self.nonfinite = np.zeros(channels, dtype=np.int64)  # NaN/Inf, left out of the moments

    @property
    def channels(self) -> int:
        return len(self.count)

    def add(self, count: np.ndarray, mean: np.ndarray, m2: np.ndarray, min: np.ndarray, max: np.ndarray,
            zeros: np.ndarray, saturated: np.ndarray, nonfinite: np.ndarray) -> None:
        """Fold in one part's per-channel results (e.g. one batch from `batch_reductions`)."""
        count = np.asarray(count, dtype=np.int64)
        total = self.count + count
        safe = np.maximum(total, 1)
        delta = np.asarray(mean, dtype=np.float64) - self.mean
        self.mean = np.where(total > 0, self.mean + delta * (count / safe), 0.0)
        self.m2 = self.m2 + np.asarray(m2, dtype=np.float64) + delta * delta * (self.count * (count / safe))
        self.count = total
        self.min = np.minimum(self.min, min)
        self.max = np.maximum(self.max, max)
        self.zeros = self.zeros + zeros
        self.saturated = self.saturated + saturated
        self.nonfinite = self.nonfinite + nonfinite

    def merge(self, other: "ChannelStats") -> None:
        if other.channels != self.channels:
            raise ValueError(f"cannot merge statistics of {other.channels} channels into {self.channels}")
        self.add(*(getattr(other, name) for name in self.FIELDS))

    @property
    def values(self) -> np.ndarray:
        """(C,) every value seen, finite or not: the denominator of the fractions."""
        return self.count + self.nonfinite

    @property
    def std(self) -> np.ndarray:
        """(C,) population standard deviation (ddof=0) of the finite values."""
        return np.sqrt(np.maximum(self.m2, 0.0) / np.maximum(self.count, 1))

    @property
    def frac_zero(self) -> np.ndarray:
        return self.zeros / np.maximum(self.values, 1)

    @property
    def frac_saturated(self) -> np.ndarray:
        return self.saturated / np.maximum(self.values, 1)

    def pooled(self) -> Tuple[float, float]:
        """(mean, std) of the whole layer, every channel's finite values taken together."""
        total = int(self.count.sum())
        if not total:
            return float("nan"), float("nan")
        mean = float((self.count * self.mean).sum() / total)
        m2 = float(self.m2.sum() + (self.count * (self.mean - mean) ** 2).sum())
        return mean, float(np.sqrt(max(m2, 0.0) / total))

    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in self.FIELDS)


def best_of_batch(scores: np.ndarray, orders: np.ndarray, k: int) -> np.ndarray:
    """(B, C) bool: per channel, the batch's k best items by score (B, C), ties to the smaller order (B,), the
    ranking of `ChannelTopK` and `reducers.BoundedTop`: no other item of the batch can be among the k best of any
    set it joins."""
    wanted = np.zeros(scores.shape, dtype=bool)
    ranked = np.broadcast_to(np.asarray(orders, dtype=np.int64)[:, None], scores.shape)
    best = np.lexsort((ranked, -scores), axis=0)[:max(k, 0)]  # (k, C) rows
    wanted[best, np.arange(scores.shape[1])[None, :]] = True
    return wanted


class ChannelTopK:
    """For each of C channels, the `capacity` items with the highest score, ties broken by the smaller order key
    (the image index), so the kept set does not depend on arrival order or on how the data was split. Extra
    per-item columns (e.g. the position of the maximum, the path) travel with their item."""

    def __init__(self, channels: int, capacity: int):
        self.capacity = int(capacity)
        self.scores = np.empty((channels, 0))  # (C, m), best first
        self.orders = np.empty((channels, 0), dtype=np.int64)  # (C, m)
        self.extra: Dict[str, np.ndarray] = {}  # name -> (C, m)

    @property
    def channels(self) -> int:
        return self.scores.shape[0]

    def add(self, scores: np.ndarray, orders: np.ndarray, **extra: np.ndarray) -> None:
        """One batch: scores (B, C), orders (B,), each extra (B, C) or (B,) (the same for every channel)."""
        scores = np.asarray(scores, dtype=np.float64).T  # (C, B)
        channels, batch = scores.shape
        orders = np.broadcast_to(np.asarray(orders, dtype=np.int64)[None, :], (channels, batch))  # (C, B)
        columns = {}
        for name, value in extra.items():
            value = np.asarray(value)
            columns[name] = np.broadcast_to(value[None, :], (channels, batch)) if value.ndim == 1 else value.T
        self._keep(scores, orders, columns)

    def accepts(self, scores: np.ndarray, orders: Sequence[int]) -> np.ndarray:
        """(B, C) bool: the items of a batch (scores (B, C), orders (B,)) that could enter: per channel at most the
        batch's own best `capacity`, and of those only the ones that beat the k-th kept item. A superset of what
        `add` keeps (another item of the batch may still push one out). Lets callers build an extra column (e.g.
        the maximum's position) for these alone: at most capacity x C of the batch's B x C items."""
        scores = np.asarray(scores, dtype=np.float64)  # (B, C)
        if self.capacity <= 0:
            return np.zeros(scores.shape, dtype=bool)
        scores = np.where(np.isnan(scores), -np.inf, scores)
        orders = np.asarray(orders, dtype=np.int64)[:, None]  # (B, 1)
        wanted = best_of_batch(scores, orders[:, 0], self.capacity)  # only the batch's best k can enter
        if self.scores.shape[1] < self.capacity:
            return wanted
        worst, worst_order = self.scores[None, :, -1], self.orders[None, :, -1]  # (1, C) the k-th kept item
        return wanted & ((scores > worst) | ((scores == worst) & (orders < worst_order)))

    def merge(self, other: "ChannelTopK") -> None:
        if other.channels != self.channels:
            raise ValueError(f"cannot merge top-k of {other.channels} channels into {self.channels}")
        self._keep(other.scores, other.orders, other.extra)

    def _keep(self, scores: np.ndarray, orders: np.ndarray, columns: Dict[str, np.ndarray]) -> None:
        if set(columns) != set(self.extra) and self.scores.shape[1]:
            raise ValueError(f"top-k columns differ: {sorted(columns)} vs {sorted(self.extra)}")
        scores = np.concatenate([self.scores, np.where(np.isnan(scores), -np.inf, scores)], axis=1)  # (C, m + B)
        orders = np.concatenate([self.orders, orders], axis=1)
        pick = np.lexsort((orders, -scores), axis=1)[:, : self.capacity]  # (C, k): score desc, then order asc
        self.scores = np.take_along_axis(scores, pick, axis=1)
        self.orders = np.take_along_axis(orders, pick, axis=1)
        merged = {}
        for name, value in columns.items():
            kept = self.extra.get(name, np.empty((self.channels, 0), dtype=value.dtype))
            merged[name] = np.take_along_axis(np.concatenate([kept, value], axis=1), pick, axis=1)
        self.extra = merged

    def items(self, channel: int) -> List[Tuple[float, int, Dict[str, Any]]]:
        """(score, order, {column: value}) of one channel, best first; items without a finite score left out."""
        out = []
        for j in range(self.scores.shape[1]):
            if np.isfinite(self.scores[channel, j]):
                out.append((float(self.scores[channel, j]), int(self.orders[channel, j]),
                            {name: value[channel, j] for name, value in self.extra.items()}))
        return out

    def nbytes(self) -> int:
        return self.scores.nbytes + self.orders.nbytes + sum(v.nbytes for v in self.extra.values())


class CovarianceMoments:
    """Count, mean (D,) and centred second moment M2 (D, D) of a stream of D-vectors, float64 on the device they
    arrive on (no D x D matrix crosses to the CPU per batch), merged exactly (Chan et al.'s update, matrix form)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Optional[torch.Tensor] = None  # (D,)
        self.m2: Optional[torch.Tensor] = None  # (D, D)

    def add(self, features: torch.Tensor) -> None:
        """features (B, D)."""
        values = features.detach().to(torch.float64)  # (B, D)
        mean = values.mean(dim=0)  # (D,)
        centred = values - mean  # (B, D)
        self._combine(values.shape[0], mean, centred.T @ centred)

    def merge(self, other: "CovarianceMoments") -> None:
        if other.count:
            self._combine(other.count, torch.as_tensor(other.mean), torch.as_tensor(other.m2))

    def _combine(self, count: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if self.mean is None:
            self.count, self.mean, self.m2 = count, mean.clone(), m2.clone()
            return
        if mean.device != self.mean.device and mean.device.type != "cpu":  # e.g. resumed on the CPU, fed on a GPU
            self.mean, self.m2 = self.mean.to(mean.device), self.m2.to(mean.device)
        mean, m2 = mean.to(self.mean.device), m2.to(self.mean.device)
        total = self.count + count
        delta = mean - self.mean  # (D,)
        self.m2 = self.m2 + m2 + torch.outer(delta, delta) * (self.count * count / total)
        self.mean = self.mean + delta * (count / total)
        self.count = total

    def to_cpu(self) -> "CovarianceMoments":
        """A copy on the CPU (for state_dict and shards)."""
        copy = CovarianceMoments()
        copy.count = self.count
        copy.mean = None if self.mean is None else self.mean.cpu()
        copy.m2 = None if self.m2 is None else self.m2.cpu()
        return copy

    def pca(self, components: int = 2) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(mean (D,), components (k, D), explained variance (k,), explained variance ratio (k,)) of the
        population covariance M2 / n; each component's sign fixed so its largest-magnitude entry is positive."""
        mean = self.mean.cpu().numpy()
        covariance = self.m2.cpu().numpy() / max(self.count, 1)
        eigenvalues, eigenvectors = np.linalg.eigh((covariance + covariance.T) / 2)
        order = np.argsort(eigenvalues)[::-1][:components]
        vectors = eigenvectors[:, order].T  # (k, D)
        signs = np.sign(vectors[np.arange(len(order)), np.abs(vectors).argmax(axis=1)])
        vectors = vectors * np.where(signs == 0, 1.0, signs)[:, None]
        variance = np.maximum(eigenvalues[order], 0.0)
        total = float(np.maximum(eigenvalues, 0.0).sum())
        return mean, vectors, variance, variance / total if total > 0 else np.zeros_like(variance)
