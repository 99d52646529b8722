/* Paced UDP sender for benchmarks/live_capture.py: compiled at run time with the system's cc.
 * usage: udp_sender PORT RATE_PPS SECONDS PAYLOAD_BYTES CPU [SOURCES [PORTS]]
 * Sends to 127.0.0.1:PORT only, at RATE packets/s for SECONDS, and prints the number sent. With SOURCES
 * (enrich_cost.py --sources), that many sockets, each bound to its own address 127.1.X.Y (loopback only),
 * take turns sending batches: SOURCES talkers and conversations instead of one. With PORTS > 1
 * (enrich_cost.py --ports), the datagrams go to 127.0.0.1:PORT .. PORT+PORTS-1 in turn, one port after
 * another: a scan-like flood of short flows to ports nobody listens on. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 32

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc < 6 || argc > 8) {
        fprintf(stderr, "usage: %s PORT RATE SECONDS PAYLOAD CPU [SOURCES [PORTS]]\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[1]);
    double rate = atof(argv[2]), seconds = atof(argv[3]);
    int payload = atoi(argv[4]), cpu = atoi(argv[5]);
    int sources = argc >= 7 ? atoi(argv[6]) : 0;  /* 0: one socket, the kernel's source address */
    int ports = argc == 8 ? atoi(argv[7]) : 1;
    if (sources < 0 || sources > 65000) { fprintf(stderr, "SOURCES: 0..65000\n"); return 2; }
    if (ports < 1 || port + ports - 1 > 65535) { fprintf(stderr, "PORTS: 1.., PORT+PORTS-1 <= 65535\n"); return 2; }
    int n_fds = sources ? sources : 1;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof(set), &set);

    int *fds = calloc(n_fds, sizeof(int));
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &dst.sin_addr);
    for (int i = 0; i < n_fds; i++) {
        fds[i] = socket(AF_INET, SOCK_DGRAM, 0);
        if (fds[i] < 0) { perror("socket (ulimit -n?)"); return 1; }
        if (sources) {
            struct sockaddr_in src = {.sin_family = AF_INET, .sin_port = 0};
            src.sin_addr.s_addr = htonl((127u << 24) | (1u << 16) | (unsigned)(i + 1));  /* 127.1.0.1 upwards */
            if (bind(fds[i], (struct sockaddr *)&src, sizeof(src)) < 0) { perror("bind"); return 1; }
        }
        if (ports == 1 && connect(fds[i], (struct sockaddr *)&dst, sizeof(dst)) < 0) { perror("connect"); return 1; }
    }

    static char buf[2048];
    memset(buf, 'p', sizeof(buf));
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    struct sockaddr_in to[BATCH];
    memset(msgs, 0, sizeof(msgs));
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = buf;
        iov[i].iov_len = payload;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        if (ports > 1) {  /* unconnected sockets: each datagram names its port */
            to[i] = dst;
            msgs[i].msg_hdr.msg_name = &to[i];
            msgs[i].msg_hdr.msg_namelen = sizeof(to[i]);
        }
    }
    long long next_port = 0;
    long long sent = 0, target_total = (long long)(rate * seconds);
    int turn = 0;
    double start = now();
    while (sent < target_total) {
        double t = now() - start;
        long long due = (long long)(rate * t);
        if (due > target_total) due = target_total;
        if (due - sent <= 0) {
            if (t > seconds + 1.0) break;
            /* Sleep when the next batch is far off (low rates, long soaks: the core stays free);
             * busy-wait when it is close, for precise pacing at high rates. */
            double wait = (sent + BATCH) / rate - t;
            if (wait > 200e-6) {
                struct timespec nap = {0, (long)((wait - 100e-6) * 1e9)};
                nanosleep(&nap, NULL);
            }
            continue;
        }
        int n = due - sent > BATCH ? BATCH : (int)(due - sent);
        if (ports > 1)
            for (int i = 0; i < n; i++) to[i].sin_port = htons((uint16_t)(port + (next_port + i) % ports));
        int r = sendmmsg(fds[turn], msgs, n, 0);
        if (ports > 1 && r > 0) next_port += r;
        if (r > 0) sent += r;
        turn = (turn + 1) % n_fds;
    }
    printf("%lld\n", sent);
    return 0;
}
