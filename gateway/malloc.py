"""glibc malloc settings for the receiving process.

Each received instance allocates and frees a few buffers of 128 KiB–1 MiB (PDU bodies, the
dataset, the Part 10 bytes). With glibc's defaults those sizes sit at the mmap / heap-trim
thresholds, so the freed memory goes back to the kernel and the next instance faults every
page in again: measured ≈ 480 minor page faults and ≈ 0.5 ms of system time per 512 KiB
instance, ~40 % of the receive cost (bench/bench_ingest.py). Serving allocations below
``MMAP_THRESHOLD`` from the heap and keeping up to ``TRIM_THRESHOLD`` of free heap removes
that; bigger blocks (volumes, masks) are still mmapped and returned at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 16 * 1024 * 1024
TRIM_THRESHOLD = 64 * 1024 * 1024


def tune_for_ingest() -> bool:
    """Apply the thresholds; False (and nothing changed) where libc is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS: no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    log.debug("malloc thresholds for ingest %s", "set" if ok else "not set")
    return ok
