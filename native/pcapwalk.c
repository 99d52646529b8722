/* The one sequential step of reading a classic pcap file: following the record lengths.
 * Compiled at first use by native.py (cc -O2 -shared); capture_sources.py has the same loop in
 * Python as the fallback and the reference (a test keeps the two identical).
 *
 * From byte offset `off`, record the offsets of up to `size` record headers in `starts`.
 * Stops early at a captured length above `limit` (*bad = 1) or when the next header would not fit.
 * Returns how many offsets were written; *end is the offset after the last record taken. */
#include <stdint.h>
#include <string.h>

static uint32_t rd32(const uint8_t *p, int big_endian) {
    if (big_endian)
        return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
    return ((uint32_t)p[3] << 24) | ((uint32_t)p[2] << 16) | ((uint32_t)p[1] << 8) | p[0];
}

int64_t ntm_pcap_walk(const uint8_t *buf, int64_t total, int64_t off, int64_t size, int big_endian,
                      int64_t limit, int maybe_swapped, int64_t *starts, int64_t *end, int *bad) {
    int64_t n = 0;
    *bad = 0;
    while (n < size && off <= total - 16) {
        int64_t caplen = rd32(buf + off + 8, big_endian);
        if (maybe_swapped) {
            int64_t wire = rd32(buf + off + 12, big_endian);
            if (wire < caplen) caplen = wire;
        }
        if (caplen > limit) {
            *bad = 1;
            break;
        }
        starts[n++] = off;
        off += 16 + caplen;
    }
    *end = off;
    return n;
}

/* The packets of one TPACKET_V3 ring block: each tpacket3_hdr starts with tp_next_offset (host
 * order), relative to itself. Writes `num` offsets from `first`; returns how many it wrote, fewer
 * when a link would leave [0, limit - 4] (a corrupt block, which the caller reports). */
int64_t ntm_block_walk(const uint8_t *ring, int64_t first, int64_t num, int64_t limit, int64_t *offs) {
    int64_t off = first;
    for (int64_t i = 0; i < num; i++) {
        if (off < 0 || off > limit - 4) return i;
        offs[i] = off;
        uint32_t next;
        memcpy(&next, ring + off, 4);
        off += next;
    }
    return num;
}

/* The four 32-bit fields of each record header (ts seconds, ts fraction, captured and original
 * length) at the offsets `starts`, into out[4 * i ...], in host order. */
void ntm_pcap_heads(const uint8_t *buf, const int64_t *starts, int64_t n, int big_endian, uint32_t *out) {
    for (int64_t i = 0; i < n; i++)
        for (int k = 0; k < 4; k++) out[4 * i + k] = rd32(buf + starts[i] + 4 * k, big_endian);
}
