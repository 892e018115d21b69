/* The data phase of a C-STORE in C (gateway.store_lane): read the P-DATA-TF PDUs of one
 * message's data set from the association's socket and write their fragments to a file.
 *
 * Why: per 512 KiB instance, reading and splitting six PDUs in Python, one DUL loop turn
 * each, took a third of the gateway's time per instance (bench/bench_ingest.py). Called
 * through ctypes, which releases the GIL. Plain C, no Python API: the gateway falls back
 * to its Python lane when this library was not built (no compiler).
 */
#define _GNU_SOURCE /* sync_file_range */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <unistd.h>

enum {
    PDATA_CLOSED = -1,       /* the peer closed the connection or the socket failed */
    PDATA_TIMEOUT = -2,      /* nothing arrived within the network timeout */
    PDATA_NOT_PDATA = -3,    /* another PDU type (release, abort, ...) in the middle of the data */
    PDATA_MALFORMED = -5,    /* PDU and PDV lengths that do not add up */
    PDATA_OUT_OF_PLACE = -6, /* a command fragment or another context: not this data set */
    PDATA_WRITE = -7,        /* writing the file failed (errno says why); the data set was read */
};

/* Read exactly n bytes. Every wait is a poll() bounded by the network timeout, whatever the
 * socket's own blocking mode: no read of a stalled peer blocks for longer than that. */
static int read_full(int fd, unsigned char *buf, size_t n, int timeout_ms) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = recv(fd, buf + got, n - got, MSG_DONTWAIT);
        if (r > 0) {
            got += (size_t)r;
        } else if (r == 0) {
            return PDATA_CLOSED;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            struct pollfd p = {fd, POLLIN, 0};
            int k = poll(&p, 1, timeout_ms);
            if (k == 0) return PDATA_TIMEOUT;
            if (k < 0 && errno != EINTR) return PDATA_CLOSED;
        } else if (errno != EINTR) {
            return PDATA_CLOSED;
        }
    }
    return 0;
}

static int write_all(int fd, const unsigned char *buf, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, buf, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        buf += w;
        n -= (size_t)w;
    }
    return 0;
}

static uint32_t be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* Read P-DATA-TF PDUs (PS3.8 9.3.5) whose PDVs are data fragments of presentation context
 * `context_id`, up to and including the last fragment, and append the fragments to `out_fd`.
 * Fragments are copied through `buf` (`cap` bytes) in chunks, so a PDU of any length is read.
 *
 * On 0 or PDATA_WRITE, `*length` is the data set's length and `*rest` the bytes of the last
 * PDU after its last fragment, still unread on the socket (further PDVs: the caller reads
 * them as the rest of that PDU). After any other code the association is unusable.
 *
 * With `writeback`, the file's writeback is started once the data set is complete
 * (sync_file_range WRITE, no wait): the device writes while the caller checks the data set,
 * and the fdatasync before the answer waits for less. Advisory: its failure is left to that
 * fdatasync, which reports every write error. */
int pdata_receive(int sock, int out_fd, int context_id, unsigned char *buf, size_t cap,
                  int timeout_ms, int writeback, long long *length, uint32_t *rest) {
    long long total = 0;
    int write_error = 0;
    *length = 0;
    *rest = 0;
    for (;;) {
        /* The PDU header and its first PDV header: a P-DATA-TF holds at least one PDV. */
        unsigned char header[12];
        int rc = read_full(sock, header, 6, timeout_ms);
        if (rc) return rc;
        if (header[0] != 0x04) return PDATA_NOT_PDATA;
        uint32_t remaining = be32(header + 2);
        if (remaining < 6) return PDATA_MALFORMED;
        unsigned char *pdv = header + 6;
        rc = read_full(sock, pdv, 6, timeout_ms);
        for (;;) {
            if (rc) return rc;
            remaining -= 6;
            uint32_t item = be32(pdv);
            if (item < 2 || item - 2 > remaining) return PDATA_MALFORMED;
            if (pdv[4] != context_id || (pdv[5] & 1)) return PDATA_OUT_OF_PLACE;
            size_t n = item - 2;
            remaining -= (uint32_t)n;
            while (n > 0) {
                size_t chunk = n < cap ? n : cap;
                rc = read_full(sock, buf, chunk, timeout_ms);
                if (rc) return rc;
                if (!write_error && write_all(out_fd, buf, chunk)) write_error = errno;
                total += (long long)chunk;
                n -= chunk;
            }
            if (pdv[5] & 2) { /* the last fragment */
                *length = total;
                *rest = remaining;
                if (write_error) { /* the whole data set was read: the peer can be answered */
                    errno = write_error;
                    return PDATA_WRITE;
                }
                if (writeback) sync_file_range(out_fd, 0, 0, SYNC_FILE_RANGE_WRITE);
                return 0;
            }
            if (remaining == 0) break; /* the next PDU */
            if (remaining < 6) return PDATA_MALFORMED;
            rc = read_full(sock, pdv, 6, timeout_ms);
        }
    }
}
