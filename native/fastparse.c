/* The fast path of headers.parse_batch in C: Ethernet (or cooked) frames with up to two VLAN
 * tags carrying IPv4, IPv6 without extension headers, ARP, or a plain EtherType. Compiled at
 * first use by native.py; the numpy fast path in headers.py is the reference, and a test keeps
 * the two byte-for-byte identical. Frames it leaves (done[i] = 0) go to the scalar parser.
 *
 * Writes PACKET_DTYPE records (86 bytes, little-endian, packed) except the direction, which the
 * caller fills in. Only header fields are read; no payload byte is ever copied.
 * Offsets: ts 0, wire_len 8, cap_len 12, cls 16, ipver 17, proto 18, ethertype 20, src 22, dst 38,
 * sport 54, dport 58, tcp_flags 62, icmp_type 64, icmp_code 66, arp_op 68, hw_src 70, vlan 76,
 * ip_id 78, frag 82, malformed 84, direction 85. */
#include <stdint.h>
#include <string.h>

#define REC 86
#define MALFORMED 84
#define COOKED_BASE 0x10000
enum { TCP, UDP, ICMP, ICMPV6, OTHER_IP, NON_IP };

static unsigned be16(const uint8_t *p) { return ((unsigned)p[0] << 8) | p[1]; }
static void put16(uint8_t *p, int v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, int64_t v) {
    uint32_t u = (uint32_t)v;
    p[0] = (uint8_t)u; p[1] = (uint8_t)(u >> 8); p[2] = (uint8_t)(u >> 16); p[3] = (uint8_t)(u >> 24);
}
static int is_vlan(unsigned et) {
    return et == 0x8100 || et == 0x88A8 || et == 0x9100 || et == 0x9200 || et == 0x9300;
}
static int is_slow(unsigned et) { /* PPPoE session, MPLS and VLAN types take the scalar path */
    return et == 0x8864 || et == 0x8847 || et == 0x8848 || is_vlan(et);
}
static int class_of(int proto) {
    return proto == 6 ? TCP : proto == 17 ? UDP : proto == 1 ? ICMP : proto == 58 ? ICMPV6 : OTHER_IP;
}

/* ports, TCP flags, ICMP type/code and malformed, as headers._transport_columns */
static void transport(uint8_t *r, const uint8_t *buf, int64_t l4, int64_t pend, int proto, int first) {
    int64_t avail = pend - l4;
    int tcp = first && proto == 6, udp = first && proto == 17, icmp = first && (proto == 1 || proto == 58);
    int sport = -1, dport = -1, flags = 0, itype = -1, icode = -1;
    if ((tcp || udp) && avail >= 4) {
        sport = (int)be16(buf + l4);
        dport = (int)be16(buf + l4 + 2);
    }
    if (tcp && avail >= 14) flags = buf[l4 + 13] | ((buf[l4 + 12] & 1) << 8);
    if (icmp && avail >= 2) {
        itype = buf[l4];
        icode = buf[l4 + 1];
    }
    put32(r + 54, sport);
    put32(r + 58, dport);
    put16(r + 62, flags);
    put16(r + 64, itype);
    put16(r + 66, icode);
    r[MALFORMED] = (tcp && avail < 20) || (udp && avail < 8) || (icmp && avail < 4);
}

static void v4_addr(uint8_t *dst, const uint8_t *src) {
    memset(dst, 0, 10);
    dst[10] = dst[11] = 0xFF;
    memcpy(dst + 12, src, 4);
}

static void non_ip(uint8_t *r) {
    r[16] = NON_IP;
    put16(r + 18, -1);
    put32(r + 54, -1);
    put32(r + 58, -1);
    put16(r + 64, -1);
    put16(r + 66, -1);
}

/* One frame; returns 1 when the record is complete. r is zeroed and has ts and lengths. */
static int parse_one(uint8_t *r, const uint8_t *buf, int64_t off, int64_t cap, int64_t lt) {
    int64_t end = off + cap, net;
    int eth = lt == 1 && cap >= 14, cooked = lt >= COOKED_BASE;
    unsigned et;
    if (!eth && !cooked) return 0;
    net = cooked ? off : off + 14;
    et = cooked ? (unsigned)(lt - COOKED_BASE) : be16(buf + off + 12);
    for (int k = 0; k < 2; k++) {
        if (is_vlan(et) && net + 4 <= end) {
            if (k == 0) put16(r + 76, (int)(be16(buf + net) & 0x0FFF)); /* the outermost tag's VID */
            et = be16(buf + net + 2);
            net += 4;
        }
    }
    if (!(et > 1500) || is_slow(et)) return 0;
    if (et == 0x0800) {
        if (net + 20 > end) return 0;
        int vh = buf[net];
        int64_t ihl = (int64_t)(vh & 0x0F) * 4;
        if (vh >> 4 != 4 || ihl < 20 || net + ihl > end) return 0;
        int proto = buf[net + 9];
        int64_t total = be16(buf + net + 2);
        unsigned frag = be16(buf + net + 6);
        int first = (frag & 0x1FFF) == 0;
        put32(r + 78, be16(buf + net + 4));  /* IPv4 Identification */
        put16(r + 82, (int)(frag & 0x3FFF)); /* MF and the offset */
        int64_t pend = total >= ihl ? (end < net + total ? end : net + total) : end;
        r[16] = (uint8_t)class_of(proto);
        r[17] = 4;
        put16(r + 18, proto);
        v4_addr(r + 22, buf + net + 12);
        v4_addr(r + 38, buf + net + 16);
        transport(r, buf, net + ihl, pend, proto, first);
    } else if (et == 0x86DD) {
        if (net + 40 > end) return 0;
        int nh = buf[net + 6];
        if (buf[net] >> 4 != 6 || nh == 0 || nh == 43 || nh == 44 || nh == 60) return 0;
        int64_t plen = be16(buf + net + 4);
        int64_t pend = plen > 0 ? (end < net + 40 + plen ? end : net + 40 + plen) : end;
        if (pend < net + 40) pend = net + 40;
        r[16] = (uint8_t)class_of(nh);
        r[17] = 6;
        put16(r + 18, nh);
        memcpy(r + 22, buf + net + 8, 16);
        memcpy(r + 38, buf + net + 24, 16);
        transport(r, buf, net + 40, pend, nh, 1);
    } else if (et == 0x0806) {
        if (net + 8 > end || buf[net + 4] != 6) return 0;
        int ipv4 = be16(buf + net + 2) == 0x0800 && buf[net + 5] == 4;
        int whole = ipv4 && net + 28 <= end;
        non_ip(r);
        put16(r + 68, (int)be16(buf + net + 6));
        r[MALFORMED] = ipv4 && !whole;
        if (whole) {
            v4_addr(r + 22, buf + net + 14);
            v4_addr(r + 38, buf + net + 24);
            memcpy(r + 70, buf + net + 8, 6);
        } else if (lt == 1) {
            memcpy(r + 70, buf + off + 6, 6);
        }
        put16(r + 20, (int)et);
        return 1;
    } else {
        non_ip(r);
    }
    put16(r + 20, (int)et);
    if (eth) memcpy(r + 70, buf + off + 6, 6);
    return 1;
}

void ntm_parse_fast(const uint8_t *buf, int64_t n, const int64_t *off, const int64_t *cap, const int64_t *wire,
                    const double *ts, const int64_t *lt, uint8_t *out, uint8_t *done) {
    for (int64_t i = 0; i < n; i++) {
        uint8_t *r = out + i * REC;
        /* The frames are hundreds of bytes apart: ask for a later frame's headers ahead of time. */
        if (i + 8 < n) {
            __builtin_prefetch(buf + off[i + 8]);
            __builtin_prefetch(buf + off[i + 8] + 40);
        }
        memset(r, 0, REC);
        memcpy(r, &ts[i], 8);
        put32(r + 8, wire[i]);
        put32(r + 12, cap[i]);
        done[i] = (uint8_t)parse_one(r, buf, off[i], cap[i], lt[i]);
        if (!done[i]) { /* the scalar parser writes this record; leave it blank but for the times */
            memset(r + 16, 0, REC - 16);
        }
    }
}
