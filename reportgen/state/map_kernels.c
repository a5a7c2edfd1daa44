/* The fused CPU kernels behind reportgen/state/cpu_kernels.py (called through ctypes; built by setup.py).

   map_statistics: per (image, channel) map of a float32 (B, C, P) array, one read from memory for the float64 sum,
   max, min and the == 0, >= high, <= low counts, a second read while the map is still in cache for the sum of
   squared deviations from the map's float64 mean, and, with stride > 0, the histogram sample at the map's flat
   indices that are multiples of stride. first_positions: the first index of a known value (the maximum) in chosen
   maps, each read only up to it.

   Each map is reduced in LANES independent lanes (fixed order: the results do not depend on the thread count or
   the machine's vector width) that the compiler turns into vector registers; max and min compare integer keys (a
   float's bits, magnitude flipped when negative: they order as the floats do, and integer max/min vectorise).
   Images are spread over OpenMP threads, so no two threads write one histogram row. */
#include <stdint.h>
#include <string.h>

#define LANES 16
#define TABLE_SHIFT 16

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

static inline int32_t float_key(int32_t bits) { return bits ^ ((bits >> 31) & 0x7FFFFFFF); }

typedef struct {
    double sum, m2;
    int32_t top, bottom;
    int64_t zeros, above, below;
} MapResult;

VECTOR_CLONES
static void reduce_map(const float *x, int64_t positions, float low, float high, MapResult *out) {
    const int32_t *bits = (const int32_t *)x;
    double sum[LANES] = {0};
    int32_t zeros[LANES] = {0}, above[LANES] = {0}, below[LANES] = {0};
    int32_t top[LANES], bottom[LANES];
    for (int l = 0; l < LANES; l++) { top[l] = INT32_MIN; bottom[l] = INT32_MAX; }
    int64_t whole = positions / LANES * LANES, i;  /* int32 lane counts: exact for maps below 2^35 positions */
    for (i = 0; i < whole; i += LANES) {
        for (int l = 0; l < LANES; l++) {
            float v = x[i + l];
            int32_t key = float_key(bits[i + l]);
            sum[l] += v;
            zeros[l] += v == 0.0f;
            above[l] += v >= high;
            below[l] += v <= low;
            top[l] = key > top[l] ? key : top[l];
            bottom[l] = key < bottom[l] ? key : bottom[l];
        }
    }
    int64_t zeros_total = 0, above_total = 0, below_total = 0;
    for (int l = 0; l < LANES; l++) {
        zeros_total += zeros[l];
        above_total += above[l];
        below_total += below[l];
    }
    double total = 0.0;
    int32_t t = INT32_MIN, b = INT32_MAX;
    for (int l = 0; l < LANES; l++) {
        total += sum[l];
        t = top[l] > t ? top[l] : t;
        b = bottom[l] < b ? bottom[l] : b;
    }
    for (i = whole; i < positions; i++) {
        float v = x[i];
        int32_t key = float_key(bits[i]);
        total += v;
        zeros_total += v == 0.0f;
        above_total += v >= high;
        below_total += v <= low;
        t = key > t ? key : t;
        b = key < b ? key : b;
    }
    double mean = total / (double)positions;
    double m2[LANES] = {0};
    for (i = 0; i < whole; i += LANES) {
        for (int l = 0; l < LANES; l++) {
            double d = (double)x[i + l] - mean;
            m2[l] += d * d;
        }
    }
    double m2_total = 0.0;
    for (int l = 0; l < LANES; l++) m2_total += m2[l];
    for (i = whole; i < positions; i++) {
        double d = (double)x[i] - mean;
        m2_total += d * d;
    }
    out->sum = total;
    out->m2 = m2_total;
    out->top = t;
    out->bottom = b;
    out->zeros = zeros_total;
    out->above = above_total;
    out->below = below_total;
}

/* x (images, channels, positions) float32, C order. Outputs (images, channels): sums, m2s (float64), peaks, mins
   (float32), counts (3, images, channels) int64: == 0, >= high, <= low. hist (images, edges + 1) int64, added to,
   when stride > 0: each image's values at flat (channel, position) indices 0, stride, 2 stride, ..., binned as the
   number of inner edges <= the value (inner_keys: their float_key, increasing; table[t]: how many of them lie below
   key block t, that is below (t - 32768) << TABLE_SHIFT). */
int map_statistics(const float *x, int64_t images, int64_t channels, int64_t positions, double low, double high,
                   int64_t stride, const int32_t *table, const int32_t *inner_keys, int64_t edges, double *sums,
                   double *m2s, float *peaks, float *mins, int64_t *counts, int64_t *hist, int threads) {
    const float lo = (float)low, hi = (float)high;  /* callers pass float32 numbers or +-inf */
    const int64_t maps = images * channels;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t image = 0; image < images; image++) {
        for (int64_t c = 0; c < channels; c++) {
            const int64_t m = image * channels + c;
            const float *map = x + m * positions;
            MapResult r;
            reduce_map(map, positions, lo, hi, &r);
            sums[m] = r.sum;
            m2s[m] = r.m2;
            int32_t top = float_key(r.top), bottom = float_key(r.bottom);  /* the key map is its own inverse */
            memcpy(&peaks[m], &top, sizeof top);
            memcpy(&mins[m], &bottom, sizeof bottom);
            counts[m] = r.zeros;
            counts[maps + m] = r.above;
            counts[2 * maps + m] = r.below;
            if (stride > 0) {
                const int32_t *bits = (const int32_t *)map;
                int64_t *row = hist + image * (edges + 1);
                for (int64_t i = ((-c * positions) % stride + stride) % stride; i < positions; i += stride) {
                    int32_t key = float_key(bits[i]);
                    int64_t bin = table[(key >> TABLE_SHIFT) + 32768];
                    while (bin < edges && inner_keys[bin] <= key) bin++;
                    row[bin]++;
                }
            }
        }
    }
    return 0;
}

/* found[j]: the first i with maps[rows[j] * positions + i] == targets[j], or -1. */
int first_positions(const float *maps, int64_t positions, const int64_t *rows, const float *targets, int64_t n,
                    int64_t *found, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j = 0; j < n; j++) {
        const float *map = maps + rows[j] * positions;
        int64_t at = -1;
        for (int64_t i = 0; i < positions; i++) {
            if (map[i] == targets[j]) { at = i; break; }
        }
        found[j] = at;
    }
    return 0;
}
