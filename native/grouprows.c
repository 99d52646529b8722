/* Exact grouping of equal fixed-width byte rows with an open-addressing hash table.
 * Compiled at first use by native.py; headers.group_rows has the same contract in numpy/pandas
 * as the fallback and the reference (a test keeps the two identical).
 *
 * codes[i] is the group of row i, groups numbered in order of first appearance; first[g] is the
 * first row of group g. Returns the number of groups, or -1 when the table cannot be allocated. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static uint64_t hash_row(const uint8_t *p, int64_t width) {
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ (uint64_t)width;
    int64_t i = 0;
    for (; i + 8 <= width; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        h ^= w;
        h *= 0xFF51AFD7ED558CCDULL;
        h ^= h >> 33;
    }
    if (i < width) {
        uint64_t w = 0;
        memcpy(&w, p + i, (size_t)(width - i));
        h ^= w;
        h *= 0xFF51AFD7ED558CCDULL;
        h ^= h >> 33;
    }
    h *= 0xC4CEB9FE1A85EC53ULL;
    h ^= h >> 33;
    return h;
}

int64_t ntm_group_rows(const uint8_t *rows, int64_t n, int64_t width, int64_t *codes, int64_t *first) {
    uint64_t cap = 16;
    while (cap < (uint64_t)n * 2) cap <<= 1;
    int64_t *slots = malloc(cap * sizeof(int64_t));
    if (!slots) return -1;
    memset(slots, 0xff, cap * sizeof(int64_t)); /* -1: empty */
    int64_t groups = 0;
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *row = rows + i * width;
        uint64_t s = hash_row(row, width) & (cap - 1);
        for (;;) {
            int64_t g = slots[s];
            if (g < 0) {
                slots[s] = groups;
                first[groups] = i;
                codes[i] = groups++;
                break;
            }
            if (memcmp(rows + first[g] * width, row, (size_t)width) == 0) {
                codes[i] = g;
                break;
            }
            s = (s + 1) & (cap - 1);
        }
    }
    free(slots);
    return groups;
}

/* mins[g] = min(mins[g], lows[i]) and maxs[g] = max(maxs[g], highs[i]) for g = idx[i], as
 * numpy's np.minimum.at / np.maximum.at do (a NaN wins, as there). */
void ntm_minmax_at(const int64_t *idx, const double *lows, const double *highs, int64_t n, double *mins,
                   double *maxs) {
    for (int64_t i = 0; i < n; i++) {
        int64_t g = idx[i];
        double lo = lows[i], hi = highs[i];
        if (lo < mins[g] || lo != lo) mins[g] = lo;
        if (hi > maxs[g] || hi != hi) maxs[g] = hi;
    }
}
