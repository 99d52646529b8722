/* Exact grouping of equal fixed-width byte rows with an open-addressing hash table.
 * Compiled at first use by native.py; headers.group_rows has the same contract in numpy/pandas
 * as the fallback and the reference (a test keeps the two identical).
 *
 * codes[i] is the group of row i, groups numbered in order of first appearance; first[g] is the
 * first row of group g. Returns the number of groups, or -1 when the table cannot be allocated. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define REC 86 /* bytes per packed PACKET_DTYPE record (analysis/headers.py) */

/* Two independent multiply chains, so wide keys (42, 44 bytes) do not wait on one long chain.
 * Always inlined, so the loops below are compiled once per common key width (see WIDTHS): with a
 * constant width the byte copies become plain loads instead of calls to memcpy. */
#define INLINE static inline __attribute__((always_inline))

INLINE uint64_t hash_row(const uint8_t *p, int64_t width) {
    uint64_t a = 0x9E3779B97F4A7C15ULL ^ (uint64_t)width, b = 0xC2B2AE3D27D4EB4FULL;
    int64_t i = 0;
    for (; i + 16 <= width; i += 16) {
        uint64_t w0, w1;
        memcpy(&w0, p + i, 8);
        memcpy(&w1, p + i + 8, 8);
        a = (a ^ w0) * 0xFF51AFD7ED558CCDULL;
        b = (b ^ w1) * 0xC4CEB9FE1A85EC53ULL;
        a ^= a >> 29;
        b ^= b >> 31;
    }
    if (i + 8 <= width) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        a = (a ^ w) * 0xFF51AFD7ED558CCDULL;
        a ^= a >> 29;
        i += 8;
    }
    if (i < width) {
        uint64_t w = 0;
        memcpy(&w, p + i, (size_t)(width - i));
        b = (b ^ w) * 0xC4CEB9FE1A85EC53ULL;
        b ^= b >> 31;
    }
    uint64_t h = a ^ (b * 0x9E3779B97F4A7C15ULL);
    h ^= h >> 33;
    h *= 0xFF51AFD7ED558CCDULL;
    h ^= h >> 33;
    return h;
}

INLINE int rows_equal(const uint8_t *x, const uint8_t *y, int64_t width) {
    int64_t i = 0;
    for (; i + 8 <= width; i += 8) {
        uint64_t u, v;
        memcpy(&u, x + i, 8);
        memcpy(&v, y + i, 8);
        if (u != v) return 0;
    }
    for (; i < width; i++)
        if (x[i] != y[i]) return 0;
    return 1;
}

/* A slot holds the row's group + 1 in its low 32 bits (0: empty) and the hash's top 32 bits
 * above, so most probes of other keys are rejected without reading their row. */
#define SLOT(tag, g) (((uint64_t)(tag) << 32) | (uint64_t)((g) + 1))
#define SLOT_GROUP(v) ((int64_t)((v) & 0xFFFFFFFFULL) - 1)
#define MAX_ROWS 0xFFFFFFF0LL

/* The hash of the row PF rows ahead is computed early and its slot prefetched: each probe of these
 * tables of megabytes is a cache miss, and independent rows' misses then overlap. The hashes wait in
 * a ring of PF; a prefetch never faults (and every address is inside the table: the index is masked). */
#define PF 8
#define PF_AHEAD(rows, i, n, width, cap, ring, slots) \
    do { \
        if ((i) + PF < (n)) { \
            uint64_t ahead = hash_row((rows) + ((i) + PF) * (width), (width)); \
            (ring)[((i) + PF) % PF] = ahead; \
            __builtin_prefetch(&(slots)[ahead & ((cap) - 1)]); \
        } \
    } while (0)

static inline void pf_start(const uint8_t *rows, int64_t n, int64_t width, uint64_t cap, uint64_t *ring,
                            const uint64_t *slots) {
    for (int64_t i = 0; i < n && i < PF; i++) {
        ring[i] = hash_row(rows + i * width, width);
        __builtin_prefetch(&slots[ring[i] & (cap - 1)]);
    }
}

static uint64_t *new_table(int64_t rows, uint64_t *cap) {
    uint64_t c = 16;
    while (c < (uint64_t)rows * 2) c <<= 1;
    *cap = c;
    return calloc(c, sizeof(uint64_t)); /* fresh pages from the kernel need no memset */
}

INLINE int64_t group_rows(const uint8_t *rows, int64_t n, int64_t width, int64_t *codes, int64_t *first) {
    uint64_t cap;
    uint64_t *slots = new_table(n, &cap);
    if (!slots) return -1;
    int64_t groups = 0;
    uint64_t ring[PF];
    pf_start(rows, n, width, cap, ring, slots);
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *row = rows + i * width;
        uint64_t h = ring[i % PF];
        PF_AHEAD(rows, i, n, width, cap, ring, slots);
        uint32_t tag = (uint32_t)(h >> 32);
        uint64_t s = h & (cap - 1);
        for (;;) {
            uint64_t v = slots[s];
            if (v == 0) {
                slots[s] = SLOT(tag, groups);
                first[groups] = i;
                codes[i] = groups++;
                break;
            }
            int64_t g = SLOT_GROUP(v);
            if ((uint32_t)(v >> 32) == tag && rows_equal(rows + first[g] * width, row, width)) {
                codes[i] = g;
                break;
            }
            s = (s + 1) & (cap - 1);
        }
    }
    free(slots);
    return groups;
}

/* The key widths of the callers: addresses 16, (address, second) 24, (source, address, second) 40,
 * conversations 42, flows 44. Other widths take the general path. */
#define WIDTHS(CALL) \
    switch (width) { \
    case 16: return CALL(16); \
    case 24: return CALL(24); \
    case 40: return CALL(40); \
    case 42: return CALL(42); \
    case 44: return CALL(44); \
    default: return CALL(width); \
    }

int64_t ntm_group_rows(const uint8_t *rows, int64_t n, int64_t width, int64_t *codes, int64_t *first) {
    if (n > MAX_ROWS) return -1;
#define GROUP(w) group_rows(rows, n, w, codes, first)
    WIDTHS(GROUP)
#undef GROUP
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

/* Conversation keys (packet_processor._conversation_keys) from packed PACKET_DTYPE records: the
 * two ends in canonical order (smaller address first, then smaller port), so both directions of a
 * conversation get one key: a(16) b(16) a_port b_port (big-endian int32) protocol (big-endian int16). */
static void put_be32(uint8_t *p, int32_t v) {
    uint32_t u = (uint32_t)v;
    p[0] = (uint8_t)(u >> 24); p[1] = (uint8_t)(u >> 16); p[2] = (uint8_t)(u >> 8); p[3] = (uint8_t)u;
}

void ntm_conv_keys(const uint8_t *recs, int64_t n, uint8_t *out) {
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *r = recs + i * REC;
        uint8_t *k = out + i * 42;
        int32_t sport, dport;
        int16_t proto;
        memcpy(&sport, r + 54, 4);
        memcpy(&dport, r + 58, 4);
        memcpy(&proto, r + 18, 2);
        int c = memcmp(r + 22, r + 38, 16);
        int swap = c > 0 || (c == 0 && sport > dport);
        memcpy(k, swap ? r + 38 : r + 22, 16);
        memcpy(k + 16, swap ? r + 22 : r + 38, 16);
        put_be32(k + 32, swap ? dport : sport);
        put_be32(k + 36, swap ? sport : dport);
        k[40] = (uint8_t)((uint16_t)proto >> 8);
        k[41] = (uint8_t)proto;
    }
}

/* Flow keys (anomaly._distinct) from packed PACKET_DTYPE records: src(16) dst(16) sport dport
 * (int32, little-endian) tcp_flags (uint16) class (uint8) ICMP type (uint8). ports: 0 both as they
 * are; 1 both the lower of the two (a UDP service); 2 only the port a TCP probe is keyed on, the
 * destination port, or the source port for a RST or an ACK (an answer), the other set to 0.
 * With idx, the n keys are those of records idx[0..n). */
void ntm_flow_keys(const uint8_t *recs, int64_t n, int ports, const int64_t *idx, uint8_t *out) {
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *r = recs + (idx ? idx[i] : i) * REC;
        uint8_t *k = out + i * 44;
        int32_t sport, dport;
        uint16_t flags;
        memcpy(&sport, r + 54, 4);
        memcpy(&dport, r + 58, 4);
        memcpy(&flags, r + 62, 2);
        if (ports == 1) sport = dport = sport < dport ? sport : dport;
        if (ports == 2) {
            if (flags & (0x04 | 0x10)) dport = 0;
            else sport = 0;
        }
        memcpy(k, r + 22, 32);   /* src, dst */
        memcpy(k + 32, &sport, 4);
        memcpy(k + 36, &dport, 4);
        memcpy(k + 40, r + 62, 2); /* tcp_flags */
        k[42] = r[16];             /* class */
        k[43] = r[64];             /* ICMP type, low byte */
    }
}

/* One batch counted into a top table (packet_processor.TopTable.merged): the m old rows (distinct
 * keys) keep their places and the batch's new keys follow in order of first appearance; each key
 * adds one packet of wire[i] bytes and, with times, its ts to the row's first/last seen (a NaN
 * wins, as in ntm_minmax_at). out_* have room for m + n rows. Returns the rows written, or -1
 * when the hash table cannot be allocated. */
INLINE int64_t top_merge(const uint8_t *old_keys, const int64_t *old_vals, const double *old_times, int64_t m,
                      const uint8_t *keys, const int64_t *wire, const double *ts, int64_t n, int64_t width,
                      uint8_t *out_keys, int64_t *out_vals, double *out_times) {
    uint64_t cap;
    uint64_t *slots = new_table(m + n, &cap);
    if (!slots) return -1;
    memcpy(out_keys, old_keys, (size_t)(m * width));
    memcpy(out_vals, old_vals, (size_t)m * 2 * sizeof(int64_t));
    if (out_times) memcpy(out_times, old_times, (size_t)m * 2 * sizeof(double));
    for (int64_t g = 0; g < m; g++) { /* old keys are distinct: find a free slot, no comparison */
        uint64_t h = hash_row(out_keys + g * width, width);
        uint64_t s = h & (cap - 1);
        while (slots[s]) s = (s + 1) & (cap - 1);
        slots[s] = SLOT((uint32_t)(h >> 32), g);
    }
    int64_t rows = m;
    uint64_t ring[PF];
    pf_start(keys, n, width, cap, ring, slots);
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *key = keys + i * width;
        uint64_t h = ring[i % PF];
        PF_AHEAD(keys, i, n, width, cap, ring, slots);
        uint32_t tag = (uint32_t)(h >> 32);
        uint64_t s = h & (cap - 1);
        int64_t g;
        for (;;) {
            uint64_t v = slots[s];
            if (v == 0) {
                g = rows++;
                slots[s] = SLOT(tag, g);
                memcpy(out_keys + g * width, key, (size_t)width);
                out_vals[2 * g] = out_vals[2 * g + 1] = 0;
                if (out_times) {
                    out_times[2 * g] = 1.0 / 0.0;
                    out_times[2 * g + 1] = -1.0 / 0.0;
                }
                break;
            }
            g = SLOT_GROUP(v);
            if ((uint32_t)(v >> 32) == tag && rows_equal(out_keys + g * width, key, width)) break;
            s = (s + 1) & (cap - 1);
        }
        out_vals[2 * g] += 1;
        out_vals[2 * g + 1] += wire[i];
        if (out_times) {
            double t = ts[i];
            if (t < out_times[2 * g] || t != t) out_times[2 * g] = t;
            if (t > out_times[2 * g + 1] || t != t) out_times[2 * g + 1] = t;
        }
    }
    free(slots);
    return rows;
}

int64_t ntm_top_merge(const uint8_t *old_keys, const int64_t *old_vals, const double *old_times, int64_t m,
                      const uint8_t *keys, const int64_t *wire, const double *ts, int64_t n, int64_t width,
                      uint8_t *out_keys, int64_t *out_vals, double *out_times) {
    if (m + n > MAX_ROWS) return -1;
#define MERGE(w) top_merge(old_keys, old_vals, old_times, m, keys, wire, ts, n, w, out_keys, out_vals, out_times)
    WIDTHS(MERGE)
#undef MERGE
}

/* LocalMatcher.kinds (analysis/headers.py, the numpy reference) over n 16-byte address keys read at
 * `stride` bytes apart (a field of packed records is read in place, no copy): 0 NONE, 1 OURS (one of
 * the na addresses as (hi, lo) pairs, or inside one of the nn networks as (hi, lo, hi mask, lo mask)),
 * 2 GROUP (multicast or broadcast); the all-zero key is NONE. Keys are big-endian halves. */
static inline uint64_t be64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | p[i];
    return v;
}

void ntm_addr_kinds(const uint8_t *keys, int64_t stride, int64_t n, const uint64_t *addrs, int64_t na,
                    const uint64_t *nets, int64_t nn, int64_t *out) {
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *k = keys + i * stride;
        uint64_t hi = be64(k), lo = be64(k + 8);
        int64_t kind = 0;
        int ours = 0;
        for (int64_t a = 0; a < na && !ours; a++) ours = addrs[2 * a] == hi && addrs[2 * a + 1] == lo;
        int v4 = hi == 0 && (lo >> 32) == 0xFFFF;
        int group = v4 ? ((lo >> 24) & 0xFF) >= 224 : (hi >> 56) == 0xFF;
        if (ours) {
            kind = 1;
        } else if (group) {
            kind = 2;
        } else {
            for (int64_t j = 0; j < nn; j++) {
                const uint64_t *m = nets + 4 * j;
                if ((hi & m[2]) == m[0] && (lo & m[3]) == m[1]) {
                    kind = 1;
                    break;
                }
            }
        }
        out[i] = (hi == 0 && lo == 0) ? 0 : kind;
    }
}

/* Per-process attribution's grouping (enrich/attribution.py: conversation_hashes, then np.unique with its
 * counts and byte sums, the reference): for each record of class tcp or udp, the conversation's 64-bit id
 * (both directions alike: the sum of the two ends' hashes, the class mixed in), and per id, in order of
 * first appearance: the first record, its packets and wire bytes. One pass with a hash table instead of a
 * sort (the sort was most of the stage's time). Returns the number of conversations, -1 when the table
 * cannot be allocated. */
static const uint64_t CK0 = 0x9E3779B97F4A7C15ULL, CK1 = 0xC2B2AE3D27D4EB4FULL, CK2 = 0x165667B19E3779F9ULL,
                      CK3 = 0x27D4EB2F165667C5ULL;

INLINE uint64_t end_hash(const uint8_t *addr, const uint8_t *port) {
    uint64_t u0, u1;
    int32_t p;
    memcpy(&u0, addr, 8);
    memcpy(&u1, addr + 8, 8);
    memcpy(&p, port, 4);
    return (u0 * CK0) ^ (u1 * CK1) ^ ((uint64_t)(int64_t)p * CK2);
}

int64_t ntm_conv_tally(const uint8_t *recs, int64_t n, int64_t tcp, int64_t udp, uint64_t *ids, int64_t *first,
                       int64_t *packets, int64_t *bytes) {
    if (n > MAX_ROWS) return -1;
    uint64_t cap;
    uint64_t *slots = new_table(n, &cap);
    if (!slots) return -1;
    int64_t groups = 0;
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *r = recs + i * REC;
        if (r[16] != tcp && r[16] != udp) continue;
        uint64_t id = (end_hash(r + 22, r + 54) + end_hash(r + 38, r + 58)) ^ ((uint64_t)r[16] * CK3);
        /* The id's varying bits may all sit high (addresses differing in their last bytes only move the
         * top 16 bits of a product): the full finaliser spreads them over the slot index. */
        uint64_t h = id ^ (id >> 33);
        h *= 0xFF51AFD7ED558CCDULL;
        h ^= h >> 33;
        h *= 0xC4CEB9FE1A85EC53ULL;
        h ^= h >> 33;
        uint32_t tag = (uint32_t)(h >> 32);
        uint64_t s = h & (cap - 1);
        uint32_t len;
        memcpy(&len, r + 8, 4);
        for (;;) {
            uint64_t v = slots[s];
            if (v == 0) {
                slots[s] = SLOT(tag, groups);
                ids[groups] = id;
                first[groups] = i;
                packets[groups] = 1;
                bytes[groups++] = len;
                break;
            }
            int64_t g = SLOT_GROUP(v);
            if ((uint32_t)(v >> 32) == tag && ids[g] == id) {
                packets[g]++;
                bytes[g] += len;
                break;
            }
            s = (s + 1) & (cap - 1);
        }
    }
    free(slots);
    return groups;
}
