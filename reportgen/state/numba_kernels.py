"""The numba code of `cpu_kernels` (imported only there, and only when numba is installed): compiled on first
call, cached on disk next to this file (or in numba's user cache where this folder is read-only)."""
import numba
import numpy as np

# reassociation lets float64 sums run in vector lanes; no "nnan"/"ninf": a NaN or Inf must reach the sum
OPTIONS = dict(parallel=True, nogil=True, cache=True, fastmath={"reassoc", "nsz", "contract"})
LOWEST, HIGHEST, MAGNITUDE = np.int32(-2 ** 31), np.int32(2 ** 31 - 1), np.int32(0x7FFFFFFF)
TABLE_SHIFT = 16  # bin_table: one entry per 2^16 consecutive keys


@numba.njit(**OPTIONS)
def map_statistics(x, bits, low, high, stride, table, inner_keys, sums, m2s, peaks, mins, counts, hist):
    """Per map x[b, c] of x (B, C, P) float32 (`bits`: the same memory as int32): the float64 sum, then the sum of
    squared deviations from the map's float64 mean while the map is still in cache; max and min into `peaks` and
    `mins` (int32 views of (B, C) float32 arrays) as integer keys (`float_key`: integer max/min vectorise where
    numba's NaN-aware float ones do not); counts (3, B, C): values == 0, >= high, <= low. With stride > 0, also
    the histogram hist (B, bins) of each image's values at flat (channel, position) indices 0, stride, 2 stride, ...
    of its C x P values, over the inner edges whose keys are `inner_keys` (`bin_table`), taken from each map while it
    is in cache. One image per thread at a time, so no two threads write the same histogram row."""
    images, channels, positions = x.shape
    edges = inner_keys.shape[0]
    for b in numba.prange(images):
        for c in range(channels):
            total = 0.0
            zeros = np.int32(0)
            above = np.int32(0)
            below = np.int32(0)
            top, bottom = LOWEST, HIGHEST
            for i in range(positions):
                value = x[b, c, i]
                total += value
                zeros += np.int32(1) if value == 0 else np.int32(0)
                above += np.int32(1) if value >= high else np.int32(0)
                below += np.int32(1) if value <= low else np.int32(0)
                key = bits[b, c, i] ^ ((bits[b, c, i] >> 31) & MAGNITUDE)
                top = max(top, key)
                bottom = min(bottom, key)
            mean = total / positions
            m2 = 0.0
            for i in range(positions):
                deviation = x[b, c, i] - mean
                m2 += deviation * deviation
            sums[b, c] = total
            m2s[b, c] = m2
            peaks[b, c] = top ^ ((top >> 31) & MAGNITUDE)
            mins[b, c] = bottom ^ ((bottom >> 31) & MAGNITUDE)
            counts[0, b, c] = zeros
            counts[1, b, c] = above
            counts[2, b, c] = below
            if stride > 0:
                for i in range((-c * positions) % stride, positions, stride):  # flat index c * P + i, a multiple
                    key = bits[b, c, i] ^ ((bits[b, c, i] >> 31) & MAGNITUDE)
                    index = table[(key >> TABLE_SHIFT) + 32768]  # inner edges below this key's block
                    while index < edges and inner_keys[index] <= key:
                        index += 1
                    hist[b, index] += 1


@numba.njit(**OPTIONS)
def first_positions(maps, rows, targets, found):
    """found[j]: the first i with maps[rows[j], i] == targets[j] (-1 if none); each row read only up to it."""
    for j in numba.prange(rows.shape[0]):
        row, target = rows[j], targets[j]
        found[j] = -1
        for i in range(maps.shape[1]):
            if maps[row, i] == target:
                found[j] = i
                break


def float_key(values: np.ndarray) -> np.ndarray:
    """int32 keys of float32 values that order as the values do (NaN aside; -0 just below +0): the bits, with the
    magnitude bits flipped where the sign bit is set."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.int32)
    return bits ^ ((bits >> 31) & MAGNITUDE)


def bin_table(inner_edges: np.ndarray):
    """(table, inner_keys) for `map_statistics`' histogram over increasing, nonzero float32 inner edges: a value's
    bin is the number of inner edges <= it (torch.bucketize with right=True). table[t] counts the edges whose keys
    lie below key block t (the keys from (t - 32768) << TABLE_SHIFT on); the kernel then compares the value with
    the edges inside its own block, so the bin is exact for any edges (the default symlog edges, 8 a decade, put at
    most one edge in a block)."""
    inner_keys = float_key(inner_edges).astype(np.int32)
    starts = (np.arange(1 << 16, dtype=np.int64) - 32768) << TABLE_SHIFT
    table = np.searchsorted(inner_keys.astype(np.int64), starts, side="left").astype(np.int32)
    return table, inner_keys
