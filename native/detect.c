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

/* Prefetching the table slot of the key PF rows ahead: the lookups of a batch are independent, and
 * each is a cache miss in tables of megabytes, so the misses then overlap instead of queueing. A
 * prefetch never faults; every address below is inside its table (the index is masked). */
#define PF 8
static inline void pf(const void *p) { __builtin_prefetch(p); }
static inline void hs_prefetch(const hset *s, uint64_t k) { pf(&s->index[spot(k) & (uint64_t)s->mask]); }

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
        m->keys = NULL, m->vals = NULL;
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

/* Sort n uint64 ascending: LSD radix on 8-bit digits (16-bit for long arrays), skipping the digits every
 * value shares (packed (bucket, row) values use few of them), insertion sort for short arrays: a
 * library sort's callback per comparison cost more than the tables it fed. Returns -1 without memory. */
static int sort_u64(uint64_t *a, int64_t n) {
    if (n < 48) {
        for (int64_t i = 1; i < n; i++) {
            uint64_t x = a[i];
            int64_t j = i;
            while (j > 0 && a[j - 1] > x) a[j] = a[j - 1], j--;
            a[j] = x;
        }
        return 0;
    }
    int width = n < 16384 ? 8 : 16;
    int64_t buckets = (int64_t)1 << width;
    uint64_t digit = (uint64_t)buckets - 1;
    uint64_t *tmp = malloc((size_t)n * sizeof(uint64_t));
    int64_t *count = malloc((size_t)buckets * sizeof(int64_t));
    if (!tmp || !count) {
        free(tmp), free(count);
        return -1;
    }
    uint64_t *src = a, *dst = tmp;
    for (int d = 0; d < 64; d += width) {
        memset(count, 0, (size_t)buckets * sizeof(int64_t));
        for (int64_t i = 0; i < n; i++) count[(src[i] >> d) & digit]++;
        if (count[(src[0] >> d) & digit] == n) continue; /* one digit for all: nothing to move */
        int64_t sum = 0;
        for (int64_t k = 0; k < buckets; k++) {
            int64_t c = count[k];
            count[k] = sum;
            sum += c;
        }
        for (int64_t i = 0; i < n; i++) dst[count[(src[i] >> d) & digit]++] = src[i];
        uint64_t *t = src;
        src = dst, dst = t;
    }
    if (src != a) memcpy(a, src, (size_t)n * sizeof(uint64_t));
    free(tmp), free(count);
    return 0;
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
        if (p + PF < m) hs_prefetch(&u->seen, it[order[p + PF]]);
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
            if (j + PF < fresh) hs_prefetch(&u->count, k[order[j + PF]]);
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

/* _Unique.add, first half: n rows (key, item, ts). Updates the single slots and gathers the rows
 * (key, item, ts, row) that go to the exact tables into gk, gi, gt, gr (room for 2n), and the keys
 * promoted now, ascending, into fresh (room for n; *nfresh says how many). Returns how many rows
 * were gathered, or -1 when out of memory. Nothing grows here: Python then makes room in multi,
 * seen and count for what ntm_unique_commit adds. */
int64_t ntm_unique_gather(ustate *u, const uint64_t *keys, const uint64_t *items, const double *ts, int64_t n,
                          uint64_t *gk, uint64_t *gi, double *gt, int64_t *gr, uint64_t *fresh, int64_t *nfresh_out) {
    *nfresh_out = 0;
    if (n <= 0) return 0;
    uint8_t *flag = malloc((size_t)n); /* bit 0: exact (a promoted key), bit 1: wrote its slot */
    int64_t result = -1, nexact = 0, nfresh = 0, m = 0;
    smap fset = {0};
    if (!flag) return -1;
    /* As numpy does it: every row compared with the slots as they were, then the writes in row
     * order (the last one of a slot stays), then the promotions against the written slots. */
    for (int64_t i = 0; i < n; i++) {
        if (i + PF < n) {
            hs_prefetch(&u->multi, keys[i + PF]);
            pf(&u->one_key[keys[i + PF] & u->one_mask]);
        }
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
        if (sort_u64(fresh, nfresh) < 0) goto done;
        int64_t w = 0;
        for (int64_t j = 0; j < nfresh; j++)
            if (!w || fresh[w - 1] != fresh[j]) fresh[w++] = fresh[j];
        nfresh = w;
        if (sm_init(&fset, nfresh) < 0) goto done;
        for (int64_t j = 0; j < nfresh; j++) { /* fresh key -> its first row (n until found) */
            uint64_t s = sm_slot(&fset, fresh[j]);
            fset.keys[s] = fresh[j];
            fset.vals[s] = n;
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
        }
    } else if (nexact) {
        for (int64_t i = 0; i < n; i++)
            if (flag[i] & 1) {
                gk[m] = keys[i], gi[m] = items[i], gt[m] = ts[i], gr[m] = i;
                m++;
            }
    }
    result = m;
    *nfresh_out = nfresh;
done:
    if (fset.keys) sm_free(&fset);
    free(flag);
    return result;
}

/* _Unique.add, second half: the promoted keys join multi, then the gathered rows are counted (_exact).
 * Returns the number of grown keys written to out_key/out_row (room for m), or -1 without memory. */
int64_t ntm_unique_commit(ustate *u, const uint64_t *fresh, int64_t nfresh, const uint64_t *gk, const uint64_t *gi,
                          const double *gt, const int64_t *gr, int64_t m, uint64_t *out_key, int64_t *out_row) {
    for (int64_t j = 0; j < nfresh; j++) hs_add(&u->multi, fresh[j]);
    return m ? unique_exact(u, gk, gi, gt, gr, m, out_key, out_row) : 0;
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
        if (i + PF < n) {
            hs_prefetch(known, keys[i + PF]);
            hs_prefetch(reported, keys[i + PF]);
            pf(&here.vals[spot(keys[i + PF]) & here.mask]);
        }
        uint64_t s = sm_slot(&here, keys[i]);
        if (here.vals[s] >= 0) continue;
        here.keys[s] = keys[i];
        here.vals[s] = 1;
        if (hs_find(known, keys[i]) < 0 && hs_find(reported, keys[i]) < 0) out[m++] = rows[i];
    }
    sm_free(&here);
    return m;
}

/* Whether each key is in the set (1) or not (0). */
void ntm_hset_has(const hset *s, const uint64_t *keys, int64_t n, uint8_t *out) {
    for (int64_t i = 0; i < n; i++) out[i] = hs_find(s, keys[i]) >= 0;
}

/* Add keys (absent ones; Python made room) to a set, in order. */
void ntm_hset_add(hset *s, const uint64_t *keys, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (hs_find(s, keys[i]) < 0) hs_add(s, keys[i]);
}

/* -- set-associative tables of WAYS slots per bucket (_Pending, _Recent, _PairSet) ------------- */

#define WAYS 4

/* Rows sel[0:m) sorted by (bucket, row) as Python's one sort of (bucket << shift | row); returns the
 * packed values (caller frees) or NULL. */
static int64_t *by_bucket(const int64_t *bucket, const int64_t *sel, int64_t m, int shift) {
    int64_t *packed = malloc((size_t)(m ? m : 1) * sizeof(int64_t));
    if (!packed) return NULL;
    for (int64_t j = 0; j < m; j++) packed[j] = (bucket[sel[j]] << shift) | sel[j];
    if (sort_u64((uint64_t *)packed, m) < 0) { /* packed values are >= 0: the same order */
        free(packed);
        return NULL;
    }
    return packed;
}

static int bit_length(int64_t n) {
    int b = 0;
    while (n > 0) b++, n >>= 1;
    return b;
}

/* Stable argsort of WAYS doubles (numpy's order: NaN last). */
static void argsort4(const double *v, int *order) {
    for (int i = 0; i < WAYS; i++) order[i] = i;
    for (int i = 1; i < WAYS; i++) {
        int x = order[i], j = i;
        while (j > 0 && ts_less(v[x], v[order[j - 1]])) order[j] = order[j - 1], j--;
        order[j] = x;
    }
}

#define REC_H(base, r) (*(uint64_t *)((base) + (r) * rec + off_h))
#define REC_TS(base, r) (*(double *)((base) + (r) * rec + off_ts))

/* _Pending.add: probes (n packed records of `rec` bytes, hash at off_h, time at off_ts) into slots
 * (buckets x WAYS records). The probes pushed out go to out: first the older probes they replaced, in
 * (bucket, rank) order, then the surplus newcomers of full buckets; returns how many, or -1. */
int64_t ntm_pending_add(uint8_t *slots, int64_t rec, int64_t off_h, int64_t off_ts, uint64_t mask,
                        const uint8_t *probes, int64_t n, uint8_t *out) {
    if (rec > 128) return -1; /* a bucket's cells are copied into 128-byte buffers */
    int64_t *bucket = malloc((size_t)(n ? n : 1) * sizeof(int64_t)), *sel = malloc((size_t)(n ? n : 1) * sizeof(int64_t));
    if (!bucket || !sel) {
        free(bucket);
        free(sel);
        return -1;
    }
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        if (i + PF < n) pf(slots + (int64_t)(REC_H(probes, i + PF) & mask) * WAYS * rec + off_h);
        uint64_t h = REC_H(probes, i);
        int64_t b = (int64_t)(h & mask);
        bucket[i] = b;
        int present = 0;
        for (int w = 0; w < WAYS; w++) present |= REC_H(slots, b * WAYS + w) == h;
        if (!present) sel[m++] = i;
    }
    int shift = bit_length(n) > 1 ? bit_length(n) : 1;
    int64_t *packed = by_bucket(bucket, sel, m, shift);
    int64_t nout = 0, nover = 0;
    int64_t *over = malloc((size_t)(m ? m : 1) * sizeof(int64_t));
    if (!packed || !over) {
        free(bucket), free(sel), free(packed), free(over);
        return -1;
    }
    int64_t lowmask = ((int64_t)1 << shift) - 1;
    int64_t j = 0;
    while (j < m) {
        int64_t b = packed[j] >> shift, end = j;
        while (end < m && (packed[end] >> shift) == b) end++;
        /* The bucket as it was: its ways from the emptiest and oldest on. */
        uint8_t cells[WAYS][128]; /* rec <= 128: checked by the caller */
        double age[WAYS];
        int order[WAYS];
        for (int w = 0; w < WAYS; w++) {
            memcpy(cells[w], slots + (b * WAYS + w) * rec, (size_t)rec);
            uint64_t h;
            double t;
            memcpy(&h, cells[w] + off_h, 8);
            memcpy(&t, cells[w] + off_ts, 8);
            age[w] = h == 0 ? -INFINITY : t;
        }
        argsort4(age, order);
        int rank = 0;
        uint64_t prev = 0;
        for (int64_t k = j; k < end; k++) {
            int64_t row = packed[k] & lowmask;
            uint64_t h = REC_H(probes, row);
            if (k > j && h == prev) continue; /* the same probe twice in a row of the bucket: one slot */
            /* numpy compares with the previous row of the sorted list, duplicate or not */
            prev = h;
            if (rank >= WAYS) {
                over[nover++] = row;
            } else {
                int w = order[rank];
                uint64_t oh;
                memcpy(&oh, cells[w] + off_h, 8);
                if (oh != 0) memcpy(out + (nout++) * rec, cells[w], (size_t)rec);
                memcpy(slots + (b * WAYS + w) * rec, probes + row * rec, (size_t)rec);
            }
            rank++;
        }
        j = end;
    }
    for (int64_t k = 0; k < nover; k++) memcpy(out + (nout++) * rec, probes + over[k] * rec, (size_t)rec);
    free(bucket), free(sel), free(packed), free(over);
    return nout;
}

/* _Pending.contains / answer: which keys are pending; with remove, empty their slots afterwards
 * (every key looked up first, as numpy does). */
void ntm_pending_answer(uint8_t *slots, int64_t rec, int64_t off_h, uint64_t mask, const uint64_t *keys,
                        int64_t n, uint8_t *hit, int remove, int64_t *where) {
    for (int64_t i = 0; i < n; i++) {
        if (i + PF < n) pf(slots + (int64_t)(keys[i + PF] & mask) * WAYS * rec + off_h);
        int64_t b = (int64_t)(keys[i] & mask);
        hit[i] = 0;
        where[i] = -1;
        for (int w = 0; w < WAYS; w++)
            if (REC_H(slots, b * WAYS + w) == keys[i]) {
                hit[i] = 1;
                where[i] = b * WAYS + w;
                break;
            }
    }
    if (remove)
        for (int64_t i = 0; i < n; i++)
            if (hit[i]) REC_H(slots, where[i]) = 0;
}

/* _Recent.add: keys with times ts and values into (buckets x WAYS) tables; a key present updates its
 * slot (the last row wins), newcomers take their bucket's slots from the oldest on (after those
 * updates), at most WAYS per bucket. Returns 0, or -1 when out of memory. */
int64_t ntm_recent_add(uint64_t *tkeys, double *tts, int64_t *tval, uint64_t mask, const uint64_t *keys,
                       const double *ts, const int64_t *val, int64_t n) {
    int64_t *bucket = malloc((size_t)(n ? n : 1) * sizeof(int64_t)), *sel = malloc((size_t)(n ? n : 1) * sizeof(int64_t));
    int64_t *way = malloc((size_t)(n ? n : 1) * sizeof(int64_t));
    if (!bucket || !sel || !way) {
        free(bucket), free(sel), free(way);
        return -1;
    }
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        if (i + PF < n) pf(&tkeys[(keys[i + PF] & mask) * WAYS]);
        int64_t b = (int64_t)(keys[i] & mask);
        bucket[i] = b;
        way[i] = -1;
        for (int w = 0; w < WAYS; w++)
            if (tkeys[b * WAYS + w] == keys[i]) {
                way[i] = b * WAYS + w;
                break;
            }
        if (way[i] < 0) sel[m++] = i;
    }
    for (int64_t i = 0; i < n; i++)
        if (way[i] >= 0) tts[way[i]] = ts[i], tval[way[i]] = val[i];
    int shift = bit_length(n) > 1 ? bit_length(n) : 1;
    int64_t *packed = by_bucket(bucket, sel, m, shift);
    if (!packed) {
        free(bucket), free(sel), free(way);
        return -1;
    }
    int64_t lowmask = ((int64_t)1 << shift) - 1;
    int64_t j = 0;
    while (j < m) {
        int64_t b = packed[j] >> shift, end = j;
        while (end < m && (packed[end] >> shift) == b) end++;
        int amin = 0; /* np.argmin: the first smallest, or the first NaN */
        for (int w = 0; w < WAYS; w++) {
            double v = tts[b * WAYS + w], best = tts[b * WAYS + amin];
            if (isnan(best)) break;
            if (isnan(v) || v < best) amin = w;
        }
        for (int64_t k = j; k < end && k - j < WAYS; k++) {
            int64_t row = packed[k] & lowmask, s = b * WAYS + (amin + (k - j)) % WAYS;
            tkeys[s] = keys[row], tts[s] = ts[row], tval[s] = val[row];
        }
        j = end;
    }
    free(bucket), free(sel), free(way), free(packed);
    return 0;
}

/* _Recent.contains (remove 0) and pop (remove 1): hit[i] when keys[i] was added at or after `since`;
 * its value to value[i] (-1 if not); pop then forgets the hits (all looked up first). */
void ntm_recent_find(uint64_t *tkeys, double *tts, const int64_t *tval, uint64_t mask, const uint64_t *keys,
                     int64_t n, double since, int remove, uint8_t *hit, int64_t *value) {
    for (int64_t i = 0; i < n; i++) { /* value[i] holds the slot until every key is looked up */
        if (i + PF < n) pf(&tkeys[(keys[i + PF] & mask) * WAYS]);
        int64_t b = (int64_t)(keys[i] & mask), s = -1;
        for (int w = 0; w < WAYS; w++)
            if (tkeys[b * WAYS + w] == keys[i]) {
                s = b * WAYS + w;
                break;
            }
        hit[i] = s >= 0 && tts[s] >= since;
        value[i] = hit[i] ? s : -1;
    }
    for (int64_t i = 0; i < n; i++) {
        int64_t s = value[i];
        value[i] = s >= 0 ? tval[s] : -1;
        if (remove && s >= 0) tkeys[s] = 0, tts[s] = -INFINITY; /* a repeated key empties the same slot */
    }
}

/* _PairSet.add: the (destination, source) pair hashes of one second into (buckets x WAYS) slots
 * stamped with their second. counted[i] for the rows whose pair is new this second and now stored
 * (one row per pair: the pairs are told apart by their top 64 - max(bits of n, 16) bits, as
 * _first_rows does); returns 1 when some new pair found no slot, 0 when all did, -1 without memory. */
int64_t ntm_pairs_add(uint64_t *tkeys, int64_t *stamp, uint64_t mask, const uint64_t *pairs, int64_t n,
                      int64_t second, uint8_t *counted) {
    memset(counted, 0, (size_t)n);
    if (n <= 0) return 0;
    int bits = bit_length(n) > 16 ? bit_length(n) : 16;
    smap tops; /* top bits -> the first row with them */
    int64_t *fresh = malloc((size_t)n * sizeof(int64_t)); /* first rows of the pairs new to the table */
    uint64_t *order = malloc((size_t)n * sizeof(uint64_t));
    if (!fresh || !order || sm_init(&tops, n) < 0) {
        free(fresh), free(order);
        return -1;
    }
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        if (i + PF < n) {
            pf(&tkeys[(pairs[i + PF] & mask) * WAYS]);
            pf(&tops.vals[spot(pairs[i + PF] >> bits) & tops.mask]);
        }
        uint64_t s = sm_slot(&tops, pairs[i] >> bits);
        if (tops.vals[s] >= 0) continue;
        tops.keys[s] = pairs[i] >> bits, tops.vals[s] = i;
        uint64_t p = pairs[i];
        int64_t b = (int64_t)(p & mask);
        int present = 0;
        for (int w = 0; w < WAYS; w++) present |= tkeys[b * WAYS + w] == p && stamp[b * WAYS + w] == second;
        if (!present) fresh[m++] = i;
    }
    /* _PairSet ranks the newcomers of a bucket by their pair's top bits (its one sort puts the distinct
     * pairs in that order): sort (bucket, position in fresh), then each bucket's short run by top. */
    int shift = bit_length(m) > 1 ? bit_length(m) : 1;
    for (int64_t j = 0; j < m; j++) order[j] = ((pairs[fresh[j]] & mask) << shift) | (uint64_t)j;
    if (sort_u64(order, m) < 0) {
        free(fresh), free(order), sm_free(&tops);
        return -1;
    }
    uint64_t low = ((uint64_t)1 << shift) - 1;
    int missed = 0;
    for (int64_t j = 0; j < m;) {
        uint64_t b = order[j] >> shift;
        int64_t end = j;
        while (end < m && (order[end] >> shift) == b) end++;
        for (int64_t k = j + 1; k < end; k++) { /* insertion sort of the run by top bits */
            uint64_t x = order[k];
            int64_t q = k;
            while (q > j && (pairs[fresh[order[q - 1] & low]] >> bits) > (pairs[fresh[x & low]] >> bits))
                order[q] = order[q - 1], q--;
            order[q] = x;
        }
        int free_ways[WAYS], nfree = 0; /* the ways of earlier seconds, in order */
        for (int w = 0; w < WAYS; w++)
            if (stamp[b * WAYS + w] != second) free_ways[nfree++] = w;
        for (int64_t k = j; k < end; k++) {
            int64_t row = fresh[order[k] & low], rank = k - j;
            if (rank >= nfree) {
                missed = 1;
                continue;
            }
            int64_t s = (int64_t)b * WAYS + free_ways[rank];
            tkeys[s] = pairs[row], stamp[s] = second;
            counted[row] = 1;
        }
        j = end;
    }
    free(fresh), free(order), sm_free(&tops);
    return missed;
}

/* _Second.add's packet counts: per destination hash of dst, packets += its rows; destinations new
 * to the set join it (with their count) in ascending hash order while the set holds fewer than cap;
 * then, when counted is given, sources += the counted rows of each destination in the set.
 * Python made room for n more keys. Returns 0, or -1 without memory. */
int64_t ntm_second_add(hset *s, int64_t *packets, int64_t *sources, int64_t cap, const uint64_t *dst, int64_t n,
                       const uint8_t *counted) {
    uint64_t *fresh = malloc((size_t)(n ? n : 1) * sizeof(uint64_t));
    if (!fresh) return -1;
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        if (i + PF < n) hs_prefetch(s, dst[i + PF]);
        int64_t at = hs_find(s, dst[i]);
        if (at >= 0) packets[at]++;
        else fresh[m++] = dst[i];
    }
    if (sort_u64(fresh, m) < 0) {
        free(fresh);
        return -1;
    }
    for (int64_t j = 0; j < m;) {
        int64_t e = j;
        while (e < m && fresh[e] == fresh[j]) e++;
        if (s->n < cap) {
            int64_t at = hs_add(s, fresh[j]);
            packets[at] = e - j;
            sources[at] = 0;
        }
        j = e;
    }
    if (counted)
        for (int64_t i = 0; i < n; i++)
            if (counted[i]) {
                if (i + PF < n) hs_prefetch(s, dst[i + PF]);
                int64_t at = hs_find(s, dst[i]);
                if (at >= 0) sources[at]++;
            }
    free(fresh);
    return 0;
}

/* Values of a set's keys: col[position] for each key present, else 0. */
void ntm_hset_values(const hset *s, const int64_t *col, const uint64_t *keys, int64_t n, int64_t *out) {
    for (int64_t i = 0; i < n; i++) {
        int64_t at = hs_find(s, keys[i]);
        out[i] = at < 0 ? 0 : col[at];
    }
}

/* Empty a set in time proportional to its keys when they are few (a new second or epoch must not
 * cost the whole index): each key's run of the index, from its home slot to the next empty one, is
 * emptied, which covers every key whose home lies in it. */
void ntm_hset_clear(hset *s) {
    if (s->n * 8 > s->mask) {
        hs_clear(s);
        return;
    }
    for (int64_t j = 0; j < s->n; j++) {
        uint64_t i = spot(s->keys[j]) & (uint64_t)s->mask;
        while (s->index[i] >= 0) {
            s->index[i] = -1;
            i = (i + 1) & (uint64_t)s->mask;
        }
    }
    s->n = 0;
}

/* _earlier: for each key, some ref has the same top (64 - bits) bits at an earlier row. */
int64_t ntm_earlier(const uint64_t *keys, const int64_t *key_rows, int64_t n, const uint64_t *refs,
                    const int64_t *ref_rows, int64_t m, int bits, uint8_t *out) {
    smap first; /* top bits -> the earliest row */
    if (sm_init(&first, m) < 0) return -1;
    for (int64_t j = 0; j < m; j++) {
        uint64_t top = refs[j] >> bits, s = sm_slot(&first, top);
        if (first.vals[s] < 0 || ref_rows[j] < first.vals[s]) first.keys[s] = top, first.vals[s] = ref_rows[j];
    }
    for (int64_t i = 0; i < n; i++) {
        int64_t row = first.vals[sm_slot(&first, keys[i] >> bits)];
        out[i] = row >= 0 && row < key_rows[i];
    }
    sm_free(&first);
    return 0;
}

/* The distinct keys among dst whose packets this second reached `threshold`, ascending. */
int64_t ntm_second_hot(const hset *s, const int64_t *packets, const uint64_t *dst, int64_t n, int64_t threshold,
                       uint64_t *out) {
    smap seen;
    if (sm_init(&seen, n) < 0) return -1;
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t at = hs_find(s, dst[i]);
        if (at < 0 || packets[at] < threshold) continue;
        uint64_t slot = sm_slot(&seen, dst[i]);
        if (seen.vals[slot] >= 0) continue;
        seen.keys[slot] = dst[i], seen.vals[slot] = 1;
        out[m++] = dst[i];
    }
    sm_free(&seen);
    return sort_u64(out, m) < 0 ? -1 : m;
}

/* Counter.update over hashes: cnt[key] += 1 per occurrence, new keys appended in order of first
 * occurrence (Python made room for n more). */
void ntm_hset_count(hset *s, int64_t *cnt, const uint64_t *keys, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        if (i + PF < n) hs_prefetch(s, keys[i + PF]);
        int64_t at = hs_find(s, keys[i]);
        if (at < 0) {
            at = hs_add(s, keys[i]);
            cnt[at] = 0;
        }
        cnt[at]++;
    }
}

/* np.isin(a, b) for uint64 hashes: one hash pass. */
int64_t ntm_isin(const uint64_t *a, int64_t n, const uint64_t *b, int64_t m, uint8_t *out) {
    smap set;
    if (sm_init(&set, m) < 0) return -1;
    for (int64_t j = 0; j < m; j++) {
        uint64_t s = sm_slot(&set, b[j]);
        set.keys[s] = b[j], set.vals[s] = 1;
    }
    for (int64_t i = 0; i < n; i++) out[i] = set.vals[sm_slot(&set, a[i])] >= 0;
    sm_free(&set);
    return 0;
}
