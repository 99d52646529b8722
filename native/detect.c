/* The detectors' per-batch table steps (analysis/detect.py) in one pass each, in place on tables
 * whose arrays Python owns (numpy), so the state pickles with the detectors. Compiled at first use by
 * native/__init__.py. Each step has a numpy/Python twin in analysis/detect.py that is the reference:
 * the same inputs give the same state and the same results (tests/test_detect_native.py).
 *
 * A set (hset) is a dense array of 64-bit keys in insertion order plus an open-addressing index of
 * positions (-1: empty) of at least twice the dense capacity; Python grows both before a call so
 * that every insertion of the call fits (ntm_hset_reindex rebuilds the index after a move). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    uint64_t *keys;
    int64_t *index;
    int64_t mask; /* index size - 1 */
    int64_t n;
} hset;

static inline uint64_t spot(uint64_t k) {
    /* The keys are splitmix64 hashes already; one more mix keeps slots apart from the detectors'
     * own `key & mask` tables, which use the low bits. */
    k ^= k >> 31;
    k *= 0x9E3779B97F4A7C15ULL;
    return k ^ (k >> 29);
}

static inline int64_t hs_find(const hset *s, uint64_t k) {
    uint64_t i = spot(k) & (uint64_t)s->mask;
    for (;;) {
        int64_t at = s->index[i];
        if (at < 0) return -1;
        if (s->keys[at] == k) return at;
        i = (i + 1) & (uint64_t)s->mask;
    }
}

static inline int64_t hs_add(hset *s, uint64_t k) { /* k must be absent; returns its position */
    uint64_t i = spot(k) & (uint64_t)s->mask;
    while (s->index[i] >= 0) i = (i + 1) & (uint64_t)s->mask;
    s->keys[s->n] = k;
    s->index[i] = s->n;
    return s->n++;
}

static void hs_clear(hset *s) {
    memset(s->index, 0xFF, (size_t)(s->mask + 1) * sizeof(int64_t));
    s->n = 0;
}

/* Rebuild the index of the dense keys[0:n) (after Python grew or reordered them). */
void ntm_hset_reindex(hset *s) {
    int64_t n = s->n;
    memset(s->index, 0xFF, (size_t)(s->mask + 1) * sizeof(int64_t));
    s->n = 0;
    for (int64_t j = 0; j < n; j++) {
        uint64_t i = spot(s->keys[j]) & (uint64_t)s->mask;
        while (s->index[i] >= 0) i = (i + 1) & (uint64_t)s->mask;
        s->index[i] = j;
    }
    s->n = n;
}

/* The position of k in the set, or -1. */
int64_t ntm_hset_find(const hset *s, uint64_t k) { return hs_find(s, k); }

/* A scratch map of 64-bit keys to int64 values, sized for n keys, freed by the caller. */
typedef struct {
    uint64_t *keys;
    int64_t *vals; /* -1: empty */
    uint64_t mask;
} smap;

static int sm_init(smap *m, int64_t n) {
    uint64_t size = 16;
    while (size < (uint64_t)n * 2) size <<= 1;
    m->mask = size - 1;
    m->keys = malloc(size * sizeof(uint64_t));
    m->vals = malloc(size * sizeof(int64_t));
    if (!m->keys || !m->vals) {
        free(m->keys);
        free(m->vals);
        return -1;
    }
    memset(m->vals, 0xFF, size * sizeof(int64_t));
    return 0;
}

static void sm_free(smap *m) {
    free(m->keys);
    free(m->vals);
}

/* The slot of k: vals[slot] < 0 when k is absent (then the slot is where it goes). */
static inline uint64_t sm_slot(const smap *m, uint64_t k) {
    uint64_t i = spot(k) & m->mask;
    while (m->vals[i] >= 0 && m->keys[i] != k) i = (i + 1) & m->mask;
    return i;
}

/* -- _Unique: distinct items per key within an epoch (analysis/detect.py _Unique.add / _exact) ---- */

typedef struct {
    uint64_t *one_key, *one_item;
    double *one_ts;
    uint64_t one_mask;
    hset multi, seen, count;
    int64_t *cnt;
    double *first;
    int64_t seen_max; /* 4 x cap: beyond it `seen` is emptied and lossy set */
    int64_t lossy;
} ustate;

/* numpy's order for a stable argsort of float64: NaN last. */
static inline int ts_less(double a, double b) { return a < b || (isnan(b) && !isnan(a)); }

static void merge_sort(int64_t *idx, int64_t *tmp, int64_t n, const double *ts) {
    if (n < 2) return;
    int64_t h = n / 2;
    merge_sort(idx, tmp, h, ts);
    merge_sort(idx + h, tmp, n - h, ts);
    if (!ts_less(ts[idx[h]], ts[idx[h - 1]])) return; /* already in order */
    memcpy(tmp, idx, (size_t)h * sizeof(int64_t));
    int64_t a = 0, b = h, o = 0;
    while (a < h && b < n) idx[o++] = ts_less(ts[idx[b]], ts[tmp[a]]) ? idx[b++] : tmp[a++];
    while (a < h) idx[o++] = tmp[a++];
}

static int cmp_u64(const void *x, const void *y) {
    uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;
    return a < b ? -1 : a > b;
}

/* _exact over m gathered rows (key, item, ts, row): count the items new to their key, in time order.
 * Writes the grown keys (in order of first growth) with the row of their last growth; returns how
 * many, or -1 when out of memory. */
static int64_t unique_exact(ustate *u, const uint64_t *k, const uint64_t *it, const double *t, const int64_t *r,
                            int64_t m, uint64_t *out_key, int64_t *out_row) {
    int64_t *order = malloc((size_t)m * sizeof(int64_t)), *tmp = malloc((size_t)(m / 2 + 1) * sizeof(int64_t));
    smap last, grown;
    if (!order || !tmp || sm_init(&last, m) < 0) {
        free(order);
        free(tmp);
        return -1;
    }
    if (sm_init(&grown, m) < 0) {
        sm_free(&last);
        free(order);
        free(tmp);
        return -1;
    }
    for (int64_t p = 0; p < m; p++) order[p] = p;
    merge_sort(order, tmp, m, t);
    /* Each item's last position in time order, then the positions that hold an item's last
     * occurrence and whose item is not yet seen: those grow their key. */
    for (int64_t p = 0; p < m; p++) {
        uint64_t s = sm_slot(&last, it[order[p]]);
        last.keys[s] = it[order[p]];
        last.vals[s] = p;
    }
    int64_t fresh = 0;
    for (int64_t p = 0; p < m; p++) {
        uint64_t item = it[order[p]];
        if (last.vals[sm_slot(&last, item)] == p && hs_find(&u->seen, item) < 0) order[fresh++] = order[p];
        /* order[0:fresh) now holds the new items' rows in time order (fresh <= p: no overwrite ahead) */
    }
    int64_t out = 0;
    if (fresh) {
        if (u->seen.n + fresh > u->seen_max) {
            hs_clear(&u->seen);
            u->lossy = 1;
        }
        for (int64_t j = 0; j < fresh; j++) hs_add(&u->seen, it[order[j]]);
        for (int64_t j = 0; j < fresh; j++) {
            int64_t g = order[j];
            uint64_t key = k[g];
            int64_t at = hs_find(&u->count, key);
            if (at < 0) {
                at = hs_add(&u->count, key);
                u->cnt[at] = 1;
                u->first[at] = t[g];
            } else {
                u->cnt[at]++;
            }
            uint64_t s = sm_slot(&grown, key);
            if (grown.vals[s] < 0) {
                grown.keys[s] = key;
                grown.vals[s] = out;
                out_key[out++] = key;
            }
            out_row[grown.vals[s]] = r[g];
        }
    }
    sm_free(&last);
    sm_free(&grown);
    free(order);
    free(tmp);
    return out;
}

/* _Unique.add: n rows (key, item, ts). Returns the number of grown keys written to out_key/out_row
 * (room for 2n), or -1 when out of memory. Python has made room for n more keys in multi and 2n
 * more in seen and count. */
int64_t ntm_unique_add(ustate *u, const uint64_t *keys, const uint64_t *items, const double *ts, int64_t n,
                       uint64_t *out_key, int64_t *out_row) {
    if (n <= 0) return 0;
    uint8_t *flag = malloc((size_t)n); /* bit 0: exact (a promoted key), bit 1: wrote its slot */
    uint64_t *gk = malloc((size_t)n * 2 * sizeof(uint64_t)), *gi = malloc((size_t)n * 2 * sizeof(uint64_t));
    double *gt = malloc((size_t)n * 2 * sizeof(double));
    int64_t *gr = malloc((size_t)n * 2 * sizeof(int64_t));
    uint64_t *fresh = malloc((size_t)n * sizeof(uint64_t));
    int64_t result = -1, nexact = 0, nfresh = 0, m = 0;
    smap fset = {0};
    if (!flag || !gk || !gi || !gt || !gr || !fresh) goto done;
    /* As numpy does it: every row compared with the slots as they were, then the writes in row
     * order (the last one of a slot stays), then the promotions against the written slots. */
    for (int64_t i = 0; i < n; i++) {
        uint64_t s = keys[i] & u->one_mask;
        int exact = hs_find(&u->multi, keys[i]) >= 0;
        nexact += exact;
        flag[i] = (uint8_t)(exact | ((!exact && u->one_key[s] != keys[i]) << 1));
    }
    for (int64_t i = 0; i < n; i++) {
        if (flag[i] & 2) {
            uint64_t s = keys[i] & u->one_mask;
            u->one_key[s] = keys[i];
            u->one_item[s] = items[i];
            u->one_ts[s] = ts[i];
        }
    }
    for (int64_t i = 0; i < n; i++) {
        uint64_t s = keys[i] & u->one_mask;
        if (!(flag[i] & 1) && u->one_key[s] == keys[i] && u->one_item[s] != items[i]) fresh[nfresh++] = keys[i];
    }
    if (nfresh) {
        qsort(fresh, (size_t)nfresh, sizeof(uint64_t), cmp_u64);
        int64_t w = 0;
        for (int64_t j = 0; j < nfresh; j++)
            if (!w || fresh[w - 1] != fresh[j]) fresh[w++] = fresh[j];
        nfresh = w;
        if (sm_init(&fset, nfresh) < 0) goto done;
        for (int64_t j = 0; j < nfresh; j++) { /* fresh key -> its first row (-1 until found) */
            uint64_t s = sm_slot(&fset, fresh[j]);
            fset.keys[s] = fresh[j];
            fset.vals[s] = n; /* present, no row yet */
        }
        for (int64_t i = 0; i < n; i++) {
            int in_fresh = 0;
            if (!(flag[i] & 1)) {
                uint64_t s = sm_slot(&fset, keys[i]);
                if (fset.vals[s] >= 0) {
                    in_fresh = 1;
                    if (fset.vals[s] == n) fset.vals[s] = i;
                }
            }
            if ((flag[i] & 1) || in_fresh) {
                gk[m] = keys[i], gi[m] = items[i], gt[m] = ts[i], gr[m] = i;
                m++;
            }
        }
        for (int64_t j = 0; j < nfresh; j++) { /* each promoted key brings the item its slot held */
            uint64_t s = fresh[j] & u->one_mask;
            gk[m] = fresh[j], gi[m] = u->one_item[s], gt[m] = u->one_ts[s];
            gr[m] = fset.vals[sm_slot(&fset, fresh[j])];
            m++;
            u->one_key[s] = 0;
            hs_add(&u->multi, fresh[j]);
        }
    } else if (nexact) {
        for (int64_t i = 0; i < n; i++)
            if (flag[i] & 1) {
                gk[m] = keys[i], gi[m] = items[i], gt[m] = ts[i], gr[m] = i;
                m++;
            }
    }
    result = m ? unique_exact(u, gk, gi, gt, gr, m, out_key, out_row) : 0;
done:
    if (nfresh && fset.keys) sm_free(&fset);
    free(flag);
    free(gk);
    free(gi);
    free(gt);
    free(gr);
    free(fresh);
    return result;
}

/* count and first of each key (0 and NaN for keys not counted). */
void ntm_unique_lookup(const ustate *u, const uint64_t *keys, int64_t n, int64_t *count, double *first) {
    for (int64_t i = 0; i < n; i++) {
        int64_t at = hs_find(&u->count, keys[i]);
        count[i] = at < 0 ? 0 : u->cnt[at];
        first[i] = at < 0 ? NAN : u->first[at];
    }
}

/* -- new hosts (analysis/detect.py Detectors._new_hosts) ------------------------------------- */

/* keys[i] is the address hash of row rows[i] (ascending rows). The rows of the addresses new to
 * known and reported, one (the first) per address, go to out in row order; returns how many. */
int64_t ntm_new_hosts(const hset *known, const hset *reported, const uint64_t *keys, const int64_t *rows,
                      int64_t n, int64_t *out) {
    smap here;
    if (sm_init(&here, n) < 0) return -1;
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        uint64_t s = sm_slot(&here, keys[i]);
        if (here.vals[s] >= 0) continue;
        here.keys[s] = keys[i];
        here.vals[s] = 1;
        if (hs_find(known, keys[i]) < 0 && hs_find(reported, keys[i]) < 0) out[m++] = rows[i];
    }
    sm_free(&here);
    return m;
}

/* Add keys (absent ones; Python made room) to a set, in order. */
void ntm_hset_add(hset *s, const uint64_t *keys, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (hs_find(s, keys[i]) < 0) hs_add(s, keys[i]);
}
