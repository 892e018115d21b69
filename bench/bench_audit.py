"""Benchmark: time the privacy audit + QA gate on a 512×512×300 phantom series.

    .venv/bin/python bench/bench_audit.py [--repeats N] [--matrix 512] [--slices 300]
    .venv/bin/python bench/bench_audit.py --table   # detection table on phantom variants

Target (issue 6): ≤ 3 s per series on 2 cores for one audit (original and defaced renders
from three yaws, detection, embedding, mask checks, decision). Prints the best and median
wall time over the repeats and a breakdown of the parts; the model load (once per process)
is timed separately.

``--table`` instead audits the anatomical engine (each ``bone`` setting) and the phantom's
ground-truth facemask on phantom variants (seeds, head poses, gantry tilt, eye shield, tube)
and prints a Markdown table: detection on the original and defaced renders (views with a
HOG score above the gate threshold, of three) and the frontal embedding distance.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import numpy as np

from inference.audit.detect import _hog, _mmod, _resnet, _shape5
from inference.audit.report import (
    AuditOptions,
    audit,
    gate,
    intracranial_mask,
    probe_original,
)
from inference.engines.anatomical import AnatomicalEngine, AnatomicalOptions
from inference.phantom.generate import PhantomOptions, generate_phantom
from inference.replace import replace_masked

VARIANTS: list[tuple[str, dict[str, object]]] = [
    *[(f"seed {s}", dict[str, object](seed=s)) for s in range(4)],
    ("yaw +15°", {"yaw": 15.0}),
    ("yaw −15°", {"yaw": -15.0}),
    ("pitch +10°", {"pitch": 10.0}),
    ("roll +10°", {"roll": 10.0}),
    ("gantry tilt 20°", {"tilt": 20.0}),
    ("yaw 15° pitch −10° tilt 20°", {"yaw": 15.0, "pitch": -10.0, "tilt": 20.0}),
    ("lead-glass eye shield", {"eye_shield": "leadglass"}),
    ("endotracheal tube", {"tube": True}),
]


def table(matrix: int, slice_thickness: float) -> None:
    """Markdown table of the audit on the phantom variants (see module docstring)."""
    opts = AuditOptions()
    thr = opts.detect_threshold
    masks = ["ground truth", "anatomical keep", "anatomical smooth", "anatomical remove"]
    print(f"phantoms {matrix}² × {slice_thickness} mm, fov head; gate threshold {thr}")
    print("| variant | original (views, best) | " + " | ".join(masks) + " |")
    print("|---" * (2 + len(masks)) + "|")
    totals = dict.fromkeys(["original", *masks], 0)
    for label, kw in VARIANTS:
        ph = generate_phantom(
            PhantomOptions(matrix=matrix, slice_thickness=slice_thickness, fov="head", **kw)  # type: ignore[arg-type]
        )
        original = probe_original(ph.hu, ph.geometry, opts)
        brain = intracranial_mask(ph.hu, ph.geometry)
        n_orig = sum(s is not None and s > thr for s in original.scores)
        totals["original"] += n_orig > 0
        cells = [f"{n_orig}/3, {max(s for s in original.scores if s is not None):.2f}"]
        for name in masks:
            if name == "ground truth":
                mask = ph.facemask
            else:
                bone: Any = name.split()[1]
                engine = AnatomicalEngine(AnatomicalOptions(bone=bone))
                mask = engine.mask(ph.hu.copy(), ph.geometry)
            r = audit(
                ph.hu,
                replace_masked(ph.hu, mask),
                ph.geometry,
                mask,
                opts,
                original=original,
                brain=brain,
            )
            n = sum(v.score_defaced is not None and v.score_defaced > thr for v in r.views)
            totals[name] += n > 0
            best = max(
                (v.score_defaced for v in r.views if v.score_defaced is not None), default=None
            )
            front = next(v for v in r.views if v.yaw_deg == 0.0)
            dist = "–" if front.distance is None else f"{front.distance:.2f}"
            shown = "–" if best is None else f"{best:.2f}"
            cells.append(f"{n}/3, {shown}, d={dist}, {gate(r, opts).verdict}")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    k = len(VARIANTS)
    print(
        f"| **series with a face detected** | {totals['original']}/{k} | "
        + " | ".join(f"{totals[m]}/{k}" for m in masks)
        + " |"
    )


def _timed(fn, *a, **kw):  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--matrix", type=int, default=512)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--table", action="store_true", help="detection table on phantom variants")
    ap.add_argument("--cnn", action="store_true", help="also run dlib's CNN face detector")
    args = ap.parse_args()
    if args.table:
        table(matrix=128, slice_thickness=2.0)
        return

    print(f"cores available: {len(os.sched_getaffinity(0))}")
    ph, dt = _timed(
        generate_phantom,
        PhantomOptions(seed=0, matrix=args.matrix, n_slices=args.slices, slice_thickness=1.0),
    )
    hu = ph.hu
    print(f"phantom {hu.shape} {hu.dtype} generated in {dt:.1f} s")
    defaced = hu.copy()
    defaced[ph.facemask] = -1000.0
    _, dt = _timed(lambda: (_hog(), _shape5(), _resnet(), _mmod()))
    print(f"model load (once per process): {dt:.2f} s")

    opts = AuditOptions(cnn_detector=args.cnn)
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
