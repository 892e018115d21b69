"""Header de-identification speed (issue 4: ≥ 1,000 instances/s, single process).

512×512 CT instances with the planted-PHI header, read from bytes as the gateway does (pydicom
raw elements, pixel data untouched by this stage). Prints instances per second.
"""

from __future__ import annotations

import io
import os
import time

import numpy as np
from pydicom import dcmread

from anonymizer import Profile, deidentify
from inference.dicomgen import make_ct_series
from inference.geometry import Geometry
from inference.phi_header import phi_header

N_SLICES = 50
ROUNDS = 20


def main() -> None:
    header, _ = phi_header(1)
    shape = (N_SLICES, 512, 512)
    geometry = Geometry(np.diag([0.5, 0.5, 1.0, 1.0]), shape)
    series = make_ct_series(np.zeros(shape, np.float32), geometry, header=header)
    blobs = []
    for ds in series:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        blobs.append(buf.getvalue())
    profile = Profile(key=b"benchmark-key-0123456789abcdef")
    for label, source in (
        ("read from file (raw elements)", lambda: [dcmread(io.BytesIO(b)) for b in blobs]),
        ("in-memory datasets", lambda: series),
    ):
        total, seconds, cpu = 0, 0.0, 0.0
        for _ in range(ROUNDS):
            datasets = source()
            start, start_cpu = time.perf_counter(), time.process_time()
            for ds in datasets:
                deidentify(ds, profile, facemask_applied=True)
            seconds += time.perf_counter() - start
            cpu += time.process_time() - start_cpu
            total += len(datasets)
        print(
            f"deidentify, {label}: {total / seconds:,.0f} instances/s wall-clock, "
            f"{total / cpu:,.0f} instances/s of CPU time ({total} instances)"
        )
    # On a shared machine wall-clock rates fall with the load; the CPU-time rate does less.
    print(f"load average (1 min) during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
