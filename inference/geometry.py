"""Voxel ⇄ patient geometry of a volume, in DICOM patient coordinates (LPS, mm).

Volumes are numpy arrays indexed ``[slice, row, column]`` (k, r, c). The affine maps
``(k, r, c, 1)`` to ``(x, y, z, 1)`` in LPS. Its columns are the physical step per index:
column 0 is the vector between consecutive slice origins (which is *not* parallel to the
slice normal for a gantry-tilted series), column 1 the step between rows (DICOM column
direction × row spacing), column 2 the step between columns (DICOM row direction × column
spacing). PS3.3 C.7.6.2.1.1 defines ImagePositionPatient / ImageOrientationPatient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Unit vectors of the patient coordinate system (LPS): +x left, +y posterior, +z superior.
LEFT = np.array([1.0, 0.0, 0.0])
POSTERIOR = np.array([0.0, 1.0, 0.0])
SUPERIOR = np.array([0.0, 0.0, 1.0])
ANTERIOR = -POSTERIOR


@dataclass(frozen=True)
class Geometry:
    """Affine geometry of a (k, r, c) volume; immutable and validated on construction."""

    affine: np.ndarray
    shape: tuple[int, int, int]
    #: Per-slice origins (N, 3) when slice spacing is irregular; None when regular.
    slice_origins: np.ndarray | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        a = np.asarray(self.affine, dtype=float)
        if a.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {a.shape}")
        if abs(np.linalg.det(a[:3, :3])) < 1e-9:
            raise ValueError("affine is singular")
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be 3 positive ints, got {self.shape}")
        object.__setattr__(self, "affine", a)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    @classmethod
    def from_dicom(
        cls,
        *,
        image_position: np.ndarray,
        image_orientation: np.ndarray,
        pixel_spacing: tuple[float, float],
        slice_step: np.ndarray,
        shape: tuple[int, int, int],
        slice_origins: np.ndarray | None = None,
    ) -> Geometry:
        """Build from DICOM attributes of the first slice plus the slice-to-slice step vector.

        ``pixel_spacing`` is DICOM PixelSpacing: (row spacing, column spacing).
        """
        iop = np.asarray(image_orientation, dtype=float)
        row_dir, col_dir = iop[:3], iop[3:]
        affine = np.eye(4)
        affine[:3, 0] = np.asarray(slice_step, dtype=float)
        affine[:3, 1] = col_dir * float(pixel_spacing[0])
        affine[:3, 2] = row_dir * float(pixel_spacing[1])
        affine[:3, 3] = np.asarray(image_position, dtype=float)
        return cls(affine=affine, shape=shape, slice_origins=slice_origins)

    @property
    def origin(self) -> np.ndarray:
        """Patient position (LPS mm) of voxel (0, 0, 0)."""
        return self.affine[:3, 3].copy()

    @property
    def spacing(self) -> np.ndarray:
        """Physical length of one index step along (k, r, c), mm."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the unit vectors of the (k, r, c) axes in LPS."""
        return self.affine[:3, :3] / self.spacing

    @property
    def slice_normal(self) -> np.ndarray:
        """Unit normal of the image plane (row direction × column direction)."""
        n = np.cross(self.direction[:, 2], self.direction[:, 1])
        return n / np.linalg.norm(n)

    @property
    def slice_spacing(self) -> float:
        """Distance between slice planes along the normal (not the step vector length)."""
        return float(abs(self.affine[:3, 0] @ self.slice_normal))

    @property
    def tilt_degrees(self) -> float:
        """Angle between the slice step vector and the slice normal (gantry tilt)."""
        step = self.affine[:3, 0] / self.spacing[0]
        return float(np.degrees(np.arccos(min(1.0, abs(step @ self.slice_normal)))))

    def index_to_patient(self, idx: np.ndarray) -> np.ndarray:
        """Map (..., 3) index coordinates (k, r, c) to LPS mm."""
        idx = np.asarray(idx, dtype=float)
        return idx @ self.affine[:3, :3].T + self.affine[:3, 3]

    def patient_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """Map (..., 3) LPS mm to fractional index coordinates (k, r, c)."""
        inv = np.linalg.inv(self.affine)
        xyz = np.asarray(xyz, dtype=float)
        return xyz @ inv[:3, :3].T + inv[:3, 3]

    def axis_towards(self, direction: np.ndarray) -> tuple[int, int]:
        """Array axis most aligned with a patient direction, and the sign (+1/-1) along it."""
        cos = self.direction.T @ (np.asarray(direction, float) / np.linalg.norm(direction))
        axis = int(np.argmax(np.abs(cos)))
        return axis, int(np.sign(cos[axis]))


def mask_extent(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Bounding box of a boolean mask: per axis the first index holding a True voxel and one
    past the last (from per-axis projections, without listing coordinates); None if empty."""
    hits = [
        np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
        for ax in range(mask.ndim)
    ]
    if any(h.size == 0 for h in hits):
        return None
    return np.array([int(h[0]) for h in hits]), np.array([int(h[-1]) + 1 for h in hits])
