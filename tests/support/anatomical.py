"""Fixtures of the anatomical-engine tests: cached phantoms, scores and head-frame helpers.

Phantoms are generated once per option set and process (``lru_cache``): the quality tests
run several engine configurations on the same head. Matrices are small (192²) and slices
2 mm where the point of a test is not resolution, so the whole module stays within ~3 min
on two cores.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from inference.geometry import Geometry
from inference.phantom import Phantom, PhantomOptions, generate_phantom

#: Matrix of the quality-test phantoms (pixel ~1.3 mm).
MATRIX = 192

#: Phantom variants the quality requirements name (issue 3): rotations ±20°, gantry tilt,
#: eye shields, tube, head-only and head-and-neck fields of view, 0.5–5 mm slices; plus a
#: head holder and low-dose noise.
VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "yaw+20": {"yaw": 20.0, "slice_thickness": 2.0},
    "yaw-20": {"yaw": -20.0, "slice_thickness": 2.0},
    "pitch+20": {"pitch": 20.0, "slice_thickness": 2.0},
    "pitch-20": {"pitch": -20.0, "slice_thickness": 2.0},
    "roll+20": {"roll": 20.0, "slice_thickness": 2.0},
    "roll-20": {"roll": -20.0, "slice_thickness": 2.0},
    "combined": {"seed": 3, "yaw": -15.0, "pitch": 10.0, "roll": -10.0, "slice_thickness": 2.0},
    "tilt20": {"tilt": 20.0, "slice_thickness": 2.0},
    "shield-metal": {"eye_shield": "metal", "slice_thickness": 2.0},
    "shield-leadglass": {"eye_shield": "leadglass", "slice_thickness": 2.0},
    "tube": {"tube": True, "slice_thickness": 2.0},
    "head-holder": {"head_holder": True, "slice_thickness": 2.0},
    "head-fov": {"fov": "head", "slice_thickness": 2.0},
    "slices-0.5mm": {"fov": "head", "slice_thickness": 0.5},
    "slices-5mm": {"slice_thickness": 5.0},
    "noise-40HU": {"noise": 40.0, "slice_thickness": 2.0},
}


@lru_cache(maxsize=8)
def phantom(**options: object) -> Phantom:
    """A phantom at the test matrix (cached; callers must not modify its arrays)."""
    p = generate_phantom(PhantomOptions(matrix=MATRIX, **options))  # type: ignore[arg-type]
    p.hu.setflags(write=False)
    return p


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Sørensen–Dice overlap of two boolean masks."""
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def head_axes(p: Phantom) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(left, anterior, superior) unit vectors of the phantom's *head* in LPS."""
    r = p.head_to_patient / np.linalg.norm(p.head_to_patient[:, 0])
    return r[:, 0], -r[:, 1], r[:, 2]


def voxels_near(geometry: Geometry, point: np.ndarray, radius_mm: float) -> np.ndarray:
    """Index coordinates (N, 3) of the voxels within ``radius_mm`` of a patient point."""
    c = geometry.patient_to_index(point)
    half = np.ceil(radius_mm / geometry.spacing).astype(int) + 1
    lo = np.maximum(np.floor(c).astype(int) - half, 0)
    hi = np.minimum(np.ceil(c).astype(int) + half + 1, geometry.shape)
    grid = np.stack(
        np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij"), -1
    ).reshape(-1, 3)
    d = np.linalg.norm(geometry.index_to_patient(grid) - point, axis=1)
    return grid[d <= radius_mm]


def head_coordinates(p: Phantom, idx: np.ndarray) -> np.ndarray:
    """Head-frame (left, anterior, superior) mm of index coordinates, relative to the
    midpoint of the pupils."""
    left, ant, sup = head_axes(p)
    centre = (p.landmarks["pupil_left"] + p.landmarks["pupil_right"]) / 2.0
    xyz = p.geometry.index_to_patient(idx) - centre
    return np.stack([xyz @ left, xyz @ ant, xyz @ sup], axis=-1)


def with_dental_streaks(p: Phantom, n_slices: int = 5, amplitude: float = 800.0) -> np.ndarray:
    """The phantom's volume with metal-like streaks radiating from the incisors: alternating
    bright and dark bands (±``amplitude`` HU, decaying over ~60 mm) across ``n_slices``
    axial slices at the mouth, added to the body only (as beam hardening does)."""
    hu = p.hu.copy()
    g = p.geometry
    centre = g.patient_to_index(p.landmarks["stomion"] + np.array([0.0, 25.0, 0.0]))
    r, c = np.mgrid[0 : hu.shape[1], 0 : hu.shape[2]]
    ang = np.arctan2(r - centre[1], c - centre[2])
    rad = np.hypot(r - centre[1], c - centre[2]) * g.spacing[1]
    streak = (np.cos(24 * ang) * amplitude * np.exp(-rad / 60.0) * (rad > 5.0)).astype(np.float32)
    k0 = round(centre[0])
    for k in range(k0 - n_slices // 2, k0 + n_slices // 2 + 1):
        hu[k] = np.where(hu[k] > -500.0, hu[k] + streak, hu[k])
    return hu
