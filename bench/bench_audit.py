"""Benchmark: time the privacy audit + QA gate on a 512×512×300 phantom series.

    .venv/bin/python bench/bench_audit.py [--repeats N] [--matrix 512] [--slices 300]

Target (issue 6): ≤ 3 s per series on 2 cores for one audit (original and defaced renders
from three yaws, detection, embedding, mask checks, decision). Prints the best and median
wall time over the repeats and a breakdown of the parts; the model load (once per process)
is timed separately.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from inference.audit.detect import _hog, _resnet, _shape5
from inference.audit.report import (
    AuditOptions,
    audit,
    gate,
    intracranial_mask,
    probe_original,
)
from inference.phantom.generate import PhantomOptions, generate_phantom


def _timed(fn, *a, **kw):  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--matrix", type=int, default=512)
    ap.add_argument("--slices", type=int, default=300)
    args = ap.parse_args()

    print(f"cores available: {len(os.sched_getaffinity(0))}")
    ph, dt = _timed(
        generate_phantom,
        PhantomOptions(seed=0, matrix=args.matrix, n_slices=args.slices, slice_thickness=1.0),
    )
    hu = ph.hu
    print(f"phantom {hu.shape} {hu.dtype} generated in {dt:.1f} s")
    defaced = hu.copy()
    defaced[ph.facemask] = -1000.0
    _, dt = _timed(lambda: (_hog(), _shape5(), _resnet()))
    print(f"model load (once per process): {dt:.2f} s")

    opts = AuditOptions()
    totals, cpu = [], []
    for i in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        report = audit(hu, defaced, ph.geometry, ph.facemask, opts)
        decision = gate(report, opts)
        totals.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        print(f"run {i + 1}: {totals[-1]:.2f} s wall, {cpu[-1]:.2f} s CPU → {decision.verdict}")

    original, t_orig = _timed(probe_original, hu, ph.geometry, opts)
    brain, t_brain = _timed(intracranial_mask, hu, ph.geometry)
    _, t_def = _timed(
        audit, hu, defaced, ph.geometry, ph.facemask, opts, original=original, brain=brain
    )
    _, t_changed = _timed(lambda: np.count_nonzero(hu != defaced))
    print(
        f"breakdown: original renders+detect {t_orig:.2f} s, intracranial {t_brain:.2f} s, "
        f"defaced audit given those {t_def:.2f} s (of which changed-voxel count {t_changed:.2f} s)"
    )
    print(
        f"audit+gate per series: best {min(totals):.2f} s, median {statistics.median(totals):.2f} s"
        f" wall, best {min(cpu):.2f} s CPU (target ≤ 3 s); each escalation step adds"
        f" ≈ {t_def:.2f} s; load average {os.getloadavg()[0]:.1f} on the machine"
    )
    print("report:", report.to_json())


if __name__ == "__main__":
    main()
