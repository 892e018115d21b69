/* The data phase of a C-STORE in C (gateway.store_lane): read the P-DATA-TF PDUs of one
 * message's data set from the association's socket and write their fragments to a file.
 *
 * Why: per 512 KiB instance, reading and splitting six PDUs in Python, one DUL loop turn
 * each, took a third of the gateway's time per instance (bench/bench_ingest.py). Called
 * through ctypes, which releases the GIL. Plain C, no Python API: the gateway falls back
 * to its Python lane when this library was not built (no compiler).
 */
#include <errno.h>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

enum {
    PDATA_CLOSED = -1,    /* the peer closed the connection or the socket failed */
    PDATA_TIMEOUT = -2,   /* nothing arrived within the network timeout */
    PDATA_NOT_PDATA = -3, /* another PDU type (release, abort, ...) in the middle of the data */
    PDATA_TOO_LONG = -4,  /* a PDU longer than the buffer (our maximum PDU length) */
    PDATA_MALFORMED = -5, /* PDV lengths that do not add up */
    PDATA_OUT_OF_PLACE = -6, /* a command fragment or another context: not this data set */
    PDATA_WRITE = -7,     /* writing the file failed (errno says why); the data set was read */
};

static int read_full(int fd, unsigned char *buf, size_t n, int timeout_ms) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = recv(fd, buf + got, n - got, 0);
        if (r > 0) {
            got += (size_t)r;
        } else if (r == 0) {
            return PDATA_CLOSED;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) { /* a socket with a timeout */
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

static int write_all(int fd, struct iovec *iov, int n) {
    while (n > 0) {
        ssize_t w = writev(fd, iov, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return PDATA_WRITE;
        }
        while (n > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (char *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return 0;
}

static uint32_t be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

#define MAX_PDVS 256

/* Read P-DATA-TF PDUs (PS3.8 9.3.5) whose PDVs are data fragments of presentation context
 * `context_id`, up to and including the last fragment, and append the fragments to `out_fd`.
 * `buf` holds one PDU body (`cap` bytes: the maximum PDU length this side accepts).
 * Returns the data set's length, or one of the negative PDATA_ codes. */
long long pdata_receive(int sock, int out_fd, int context_id, unsigned char *buf, size_t cap,
                        int timeout_ms) {
    long long total = 0;
    int write_error = 0;
    for (;;) {
        unsigned char header[6];
        int rc = read_full(sock, header, sizeof header, timeout_ms);
        if (rc) return rc;
        if (header[0] != 0x04) return PDATA_NOT_PDATA;
        uint32_t length = be32(header + 2);
        if (length > cap) return PDATA_TOO_LONG;
        rc = read_full(sock, buf, length, timeout_ms);
        if (rc) return rc;
        struct iovec iov[MAX_PDVS];
        int n = 0, last = 0;
        size_t offset = 0;
        while (offset < length) {
            if (last || n == MAX_PDVS || offset + 6 > length) return PDATA_MALFORMED;
            uint32_t item = be32(buf + offset);
            if (item < 2 || item > length - offset - 4) return PDATA_MALFORMED;
            int control = buf[offset + 5];
            if (buf[offset + 4] != context_id || (control & 1)) return PDATA_OUT_OF_PLACE;
            iov[n].iov_base = buf + offset + 6;
            iov[n].iov_len = item - 2;
            total += item - 2;
            n++;
            offset += 4 + item;
            last = control & 2;
        }
        if (!write_error && write_all(out_fd, iov, n)) write_error = errno;
        if (last) {
            if (write_error) { /* the whole data set was read: the peer can be answered */
                errno = write_error;
                return PDATA_WRITE;
            }
            return total;
        }
    }
}
