"""Benchmark: nnU-Net engine wall time, ROI crop vs full volume, on a phantom.

Builds the test model (tests/support/nnunet_model.py) with a realistic-ish 3d_fullres patch
and target spacing equal to the phantom's (so nnU-Net does not resample), generates a
head-and-neck phantom (default 512×512×300, 0.49×0.49×1 mm) and times

* full: ``engine.predict(hu, geometry)`` — nnU-Net's sliding window over the whole volume;
* roi:  ``engine.region(...)`` (the anatomical engine's ``face_region`` + growth to one
  patch) + ``engine.predict(hu, geometry, region)``.

Both are followed by the same post-processing. The test model is not a face model (it
labels soft tissue), so the ROI-growth rounds of ``mask()`` — which would chase the whole
head — are not part of the ROI timing; with a real face model they only run when the face
reaches the crop border. Run: ``.venv/bin/python bench/bench_nnunet_roi.py [--help]``.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.engines.nnunet import NnUNetEngine, NnUNetOptions, physical_spacing, postprocess
from inference.phantom import PhantomOptions, generate_phantom
from tests.support.nnunet_model import TinyModelSpec, build_model_folder


def n_patches(shape: tuple[int, ...], patch: tuple[int, ...], step: float = 0.5) -> int:
    """Sliding-window tiles nnU-Net uses (compute_steps_for_sliding_window)."""
    n = 1
    for s, p in zip(shape, patch, strict=True):
        n *= 1 if s <= p else math.ceil((s - p) / (p * step)) + 1
    return n


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """Result, wall seconds, CPU seconds (all threads: robust on a shared machine)."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--matrix", type=int, default=512)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--thickness", type=float, default=1.0)
    ap.add_argument("--patch", type=int, nargs=3, default=(64, 128, 128))
    ap.add_argument("--features", type=int, nargs="+", default=(8, 16, 32, 64, 128))
    ap.add_argument("--margin", type=float, default=15.0, help="face_region margin, mm")
    ap.add_argument("--skip-full", action="store_true", help="only time the ROI")
    args = ap.parse_args()

    t = time.perf_counter()
    ph = generate_phantom(
        PhantomOptions(matrix=args.matrix, n_slices=args.slices, slice_thickness=args.thickness)
    )
    hu, g = ph.hu, ph.geometry
    print(
        f"phantom {hu.shape} spacing {np.round(g.spacing, 3).tolist()} mm "
        f"({time.perf_counter() - t:.1f} s)"
    )

    spacing = physical_spacing(g)
    spec = TinyModelSpec(
        patch_size=tuple(args.patch),  # type: ignore[arg-type]
        # SAL order of an axial series = (slice, row, column): no resampling by nnU-Net
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        features=tuple(args.features),
        train_steps=10,
        train_patch=(32, 32, 32),
    )
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model_folder(Path(tmp), spec)
        engine = NnUNetEngine(model, NnUNetOptions(roi_margin_mm=args.margin))
        print(
            f"model: PlainConvUNet features {list(spec.features)}, patch {list(spec.patch_size)}"
            f", device {engine.device}, tta {engine.tta}"
        )

        region, w_reg, c_reg = timed(lambda: engine.region(hu, g))
        crop = tuple(s.stop - s.start for s in region)
        face, w_pred, c_pred = timed(lambda: engine.predict(hu, g, region))
        _, w_post, c_post = timed(lambda: postprocess(face, hu, spacing))
        w_roi, c_roi = w_reg + w_pred + w_post, c_reg + c_pred + c_post
        frac = ph.facemask[region].sum() / max(1, ph.facemask.sum())
        print(
            f"roi : crop {crop} = {np.prod(crop) / hu.size:.1%} of the voxels, "
            f"{n_patches(crop, spec.patch_size)} patches, ground-truth face inside {frac:.1%}"
        )
        print(
            f"roi : face_region {w_reg:.1f} s + predict {w_pred:.1f} s + post {w_post:.1f} s"
            f" = {w_roi:.1f} s wall, {c_roi:.1f} s CPU"
        )
        if args.skip_full:
            return 0
        face_full, w_pf, c_pf = timed(lambda: engine.predict(hu, g))
        _, w_post2, c_post2 = timed(lambda: postprocess(face_full, hu, spacing))
        w_full, c_full = w_pf + w_post2, c_pf + c_post2
        print(
            f"full: {n_patches(hu.shape, spec.patch_size)} patches, predict {w_pf:.1f} s"
            f" + post {w_post2:.1f} s = {w_full:.1f} s wall, {c_full:.1f} s CPU"
        )
        agree = (face[region] == face_full[region]).mean()
        print(
            f"ratio full/roi = {w_full / w_roi:.1f}x wall, {c_full / c_roi:.1f}x CPU "
            f"(voxel agreement inside the crop {agree:.3%})"
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"peak RSS {peak:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
