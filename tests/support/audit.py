"""Fixtures of the privacy-audit tests: an analytic head that any affine can sample.

The head is defined in patient coordinates (LPS mm), so sampling it through a rotated or
gantry-tilted affine gives the same anatomy in a different voxel grid: what the renderer
must see through. It has skin, a nose, a skull and a brain (for the mask-plausibility
checks) but no detectable face; face-detection tests use photographs and the phantom.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.spatial.transform import Rotation

from inference.geometry import Geometry

SOFT_HU, BONE_HU, BRAIN_HU = 40.0, 1000.0, 30.0
SKIN_R = np.array([72.0, 92.0, 105.0])  # skin ellipsoid semi-axes (x, y, z), mm
SKULL_R = SKIN_R - 8.0  # outer table
BRAIN_R = SKULL_R - 6.0  # inner table
NOSE_C, NOSE_R = np.array([0.0, -92.0, -5.0]), np.array([11.0, 16.0, 24.0])


def _ellipsoid_sdf(p: np.ndarray, c: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Approximate signed distance (mm, < 0 inside) to an axis-aligned ellipsoid."""
    q = (p - c) / r
    return (np.linalg.norm(q, axis=-1) - 1.0) * r.min()


def _cover(sdf: np.ndarray, voxel_mm: float) -> np.ndarray:
    """Partial-volume coverage (0..1) of a surface, as a scanner's blur would give."""
    return np.clip(0.5 - sdf / voxel_mm, 0.0, 1.0)


def affine_for(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0),
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0),
    tilt_deg: float = 0.0,
) -> np.ndarray:
    """Affine of an axial-like acquisition centred on the head, optionally rotated
    (extrinsic x, y, z Euler angles, degrees) and gantry-tilted (slices shear along y)."""
    rot = Rotation.from_euler("xyz", rotation_deg, degrees=True).as_matrix()
    # Axial: k → superior (+z), r → posterior (+y), c → left (+x).
    k_dir, r_dir, c_dir = rot @ [0, 0, 1.0], rot @ [0, 1.0, 0], rot @ [1.0, 0, 0]
    step = k_dir * spacing[0] + r_dir * spacing[0] * np.tan(np.radians(tilt_deg))
    a = np.eye(4)
    a[:3, 0], a[:3, 1], a[:3, 2] = step, r_dir * spacing[1], c_dir * spacing[2]
    centre = a[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    a[:3, 3] = -centre + np.array([0.0, 0.0, -10.0])
    return a


def analytic_head(
    shape: tuple[int, int, int] = (120, 120, 100),
    affine: np.ndarray | None = None,
) -> tuple[np.ndarray, Geometry]:
    """(hu int16, geometry) of the analytic head sampled through ``affine``."""
    a = affine_for(shape) if affine is None else affine
    g = Geometry(affine=a, shape=shape)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    p = g.index_to_patient(idx.reshape(-1, 3)).reshape(*shape, 3)
    vox = float(np.cbrt(abs(np.linalg.det(a[:3, :3]))))
    skin = np.minimum(_ellipsoid_sdf(p, np.zeros(3), SKIN_R), _ellipsoid_sdf(p, NOSE_C, NOSE_R))
    hu = -1000.0 + (SOFT_HU + 1000.0) * _cover(skin, vox)
    skull = _cover(_ellipsoid_sdf(p, np.zeros(3), SKULL_R), vox)
    brain = _cover(_ellipsoid_sdf(p, np.zeros(3), BRAIN_R), vox)
    hu += (BONE_HU - SOFT_HU) * (skull - brain) + (BRAIN_HU - SOFT_HU) * brain
    return np.rint(hu).astype(np.int16), g


def patient_points(geometry: Geometry) -> np.ndarray:
    """(k, r, c, 3) LPS coordinates of every voxel."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in geometry.shape], indexing="ij"), axis=-1)
    return geometry.index_to_patient(idx.reshape(-1, 3)).reshape(*geometry.shape, 3)


def face_mask(hu: np.ndarray, geometry: Geometry, depth_mm: float = 0.0) -> np.ndarray:
    """A plausible facemask of the analytic head: soft tissue in front of the skull in the
    face region (anterior, between chin and brow); ``depth_mm`` > 0 reaches that far past
    the skull into the head (an implausible mask)."""
    p = patient_points(geometry)
    in_front = _ellipsoid_sdf(p, np.zeros(3), SKULL_R) > -depth_mm
    face = (p[..., 1] < -40.0) & (p[..., 2] > -80.0) & (p[..., 2] < 60.0)
    return in_front & face & (hu > -500)


class FixedMaskEngine:
    """A :class:`inference.engines.FacemaskEngine` that returns a given mask: lets a test
    choose what each escalation level produces while the audit itself runs for real."""

    name = "fixed"

    def __init__(self, mask: np.ndarray) -> None:
        self._mask = mask

    def mask(self, hu: np.ndarray, geometry: Geometry) -> np.ndarray:
        if hu.shape != self._mask.shape:
            raise ValueError("mask and volume shapes differ")
        return self._mask.copy()


def staged_engines(masks: dict[str, np.ndarray]) -> Callable[[str], FixedMaskEngine]:
    """Engine factory for :func:`inference.audit.report.audited_mask`: bone → fixed mask."""

    def factory(bone: str) -> FixedMaskEngine:
        return FixedMaskEngine(masks[bone])

    return factory
