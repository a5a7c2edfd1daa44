"""The numba code of `cpu_kernels` (imported only there, and only when numba is installed): compiled on first
call, cached on disk next to this file (or in numba's user cache where this folder is read-only)."""
import numba
import numpy as np

# reassociation lets float64 sums run in vector lanes; no "nnan"/"ninf": a NaN or Inf must reach the sum
OPTIONS = dict(parallel=True, nogil=True, cache=True, fastmath={"reassoc", "nsz", "contract"})
LOWEST, HIGHEST, MAGNITUDE = np.int32(-2 ** 31), np.int32(2 ** 31 - 1), np.int32(0x7FFFFFFF)


@numba.njit(**OPTIONS)
def row_statistics(x, bits, low, high, sums, m2s, peaks, mins, counts):
    """Per row of x (R, P) float32 (`bits`: the same memory as int32): the float64 sum, then the sum of squared
    deviations from the row's float64 mean while the row is still in cache; max and min into `peaks` and `mins`
    (int32 views of float32 arrays), as integers: a float's bits with the magnitude bits flipped when negative
    order as the floats do, and integer max/min vectorise where numba's NaN-aware float ones do not;
    counts (3, R): values == 0, >= high, <= low."""
    positions = x.shape[1]
    for r in numba.prange(x.shape[0]):
        total = 0.0
        zeros = np.int32(0)
        above = np.int32(0)
        below = np.int32(0)
        top, bottom = LOWEST, HIGHEST
        for i in range(positions):
            value = x[r, i]
            total += value
            zeros += np.int32(1) if value == 0 else np.int32(0)
            above += np.int32(1) if value >= high else np.int32(0)
            below += np.int32(1) if value <= low else np.int32(0)
            key = bits[r, i] ^ ((bits[r, i] >> 31) & MAGNITUDE)
            top = max(top, key)
            bottom = min(bottom, key)
        mean = total / positions
        m2 = 0.0
        for i in range(positions):
            deviation = x[r, i] - mean
            m2 += deviation * deviation
        sums[r] = total
        m2s[r] = m2
        peaks[r] = top ^ ((top >> 31) & MAGNITUDE)
        mins[r] = bottom ^ ((bottom >> 31) & MAGNITUDE)
        counts[0, r] = zeros
        counts[1, r] = above
        counts[2, r] = below


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
