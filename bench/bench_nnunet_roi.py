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
from pathlib import Path

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

        t = time.perf_counter()
        region = engine.region(hu, g)
        t_region = time.perf_counter() - t
        crop = tuple(s.stop - s.start for s in region)
        t = time.perf_counter()
        face = engine.predict(hu, g, region)
        t_pred_roi = time.perf_counter() - t
        t = time.perf_counter()
        postprocess(face, hu, spacing)
        t_post_roi = time.perf_counter() - t
        t_roi = t_region + t_pred_roi + t_post_roi
        frac = ph.facemask[region].sum() / max(1, ph.facemask.sum())
        print(
            f"roi : crop {crop} = {np.prod(crop) / hu.size:.1%} of the voxels, "
            f"{n_patches(crop, spec.patch_size)} patches, ground-truth face inside {frac:.1%}"
        )
        print(
            f"roi : face_region {t_region:.1f} s + predict {t_pred_roi:.1f} s + post "
            f"{t_post_roi:.1f} s = {t_roi:.1f} s"
        )
        if args.skip_full:
            return 0
        t = time.perf_counter()
        face_full = engine.predict(hu, g)
        t_pred_full = time.perf_counter() - t
        t = time.perf_counter()
        postprocess(face_full, hu, spacing)
        t_full = t_pred_full + time.perf_counter() - t
        print(
            f"full: {n_patches(hu.shape, spec.patch_size)} patches, predict {t_pred_full:.1f} s"
            f" + post = {t_full:.1f} s"
        )
        agree = (face[region] == face_full[region]).mean()
        print(
            f"ratio full/roi = {t_full / t_roi:.1f}x   (voxel agreement inside the crop "
            f"{agree:.3%})"
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"peak RSS {peak:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
