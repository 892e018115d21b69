"""Generate a phantom: options → scanner geometry → anatomy in head coordinates → resampled HU.

The anatomy is painted once on an axis-aligned grid in head coordinates (1–2 mm, anti-aliased
signed distances) and then sampled trilinearly onto the scanner grid through one affine map
(global scale, yaw/pitch/roll, gantry tilt, slice thickness, matrix), so every orientation is
the same anatomy seen through a different sampling grid. The head holder belongs to the
scanner, not the head, so it is drawn in patient coordinates after resampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage

from inference.geometry import Geometry, mask_extent
from inference.phantom import anatomy as A
from inference.phantom.canvas import INTRACRANIAL, Canvas

FOV_MM = 250.0
#: Head-coordinate bounds of everything the phantom models (x, y, z ranges, mm).
MODEL_LO = np.array([-92.0, -142.0, -262.0])
MODEL_HI = np.array([92.0, 112.0, 137.0])
#: Scanned z range in patient coordinates (superior end, inferior end per FOV), mm.
Z_TOP = 142.0
Z_BOTTOM = {"head": -135.0, "head_neck": -235.0}
MAX_SLICES = 600
HU_HOLDER, HU_TABLE = 200.0, 300.0
_FACEMASK_BIT = np.uint8(16)


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


@dataclass(frozen=True)
class PhantomOptions:
    """What to synthesise; validated on construction (ValueError names the bad option)."""

    seed: int = 0
    fov: Literal["head", "head_neck"] = "head_neck"
    yaw: float = 0.0  # degrees; + turns the nose to the patient's left
    pitch: float = 0.0  # degrees; + tips the chin down
    roll: float = 0.0  # degrees; + tilts the vertex to the patient's left
    tilt: float = 0.0  # gantry tilt, degrees
    slice_thickness: float = 1.0  # mm
    matrix: int = 256
    n_slices: int | None = None
    pixel_spacing: float | None = None
    noise: float = 10.0  # HU standard deviation
    eye_shield: Literal[None, "metal", "leadglass"] = None
    tube: bool = False
    head_holder: bool = False
    phi: bool = False

    def __post_init__(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"phantom option {msg}")

        if not _is_int(self.seed) or self.seed < 0:
            raise bad(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.fov not in ("head", "head_neck"):
            raise bad(f"fov must be 'head' or 'head_neck', got {self.fov!r}")
        for name in ("yaw", "pitch", "roll"):
            if not -20.0 <= float(getattr(self, name)) <= 20.0:
                raise bad(f"{name} must be within ±20 degrees, got {getattr(self, name)}")
        if not -30.0 <= self.tilt <= 30.0:
            raise bad(f"tilt must be within ±30 degrees, got {self.tilt}")
        if not 0.5 <= self.slice_thickness <= 5.0:
            raise bad(f"slice_thickness must be 0.5–5 mm, got {self.slice_thickness}")
        if not _is_int(self.matrix) or not 32 <= self.matrix <= 512:
            raise bad(f"matrix must be an integer 32–512, got {self.matrix!r}")
        if self.n_slices is not None and (
            not _is_int(self.n_slices) or not 8 <= self.n_slices <= MAX_SLICES
        ):
            raise bad(f"n_slices must be an integer 8–{MAX_SLICES}, got {self.n_slices!r}")
        if self.pixel_spacing is not None and not 0.2 <= self.pixel_spacing <= 2.0:
            raise bad(f"pixel_spacing must be 0.2–2.0 mm, got {self.pixel_spacing}")
        if not 0.0 <= self.noise <= 200.0:
            raise bad(f"noise must be 0–200 HU, got {self.noise}")
        if self.eye_shield not in (None, "metal", "leadglass"):
            raise bad(f"eye_shield must be None, 'metal' or 'leadglass', got {self.eye_shield!r}")


@dataclass
class Phantom:
    """A synthetic CTA volume with its ground truth (all arrays indexed [slice, row, col])."""

    hu: np.ndarray  # float32 HU
    facemask: np.ndarray  # bool: ground-truth face voxels
    intracranial: np.ndarray  # bool: brain, CSF, intracranial vessels (never to change)
    geometry: Geometry
    header: Dataset | None  # PHI template when options.phi
    planted_phi: list[str]
    #: Named anatomical points in patient coordinates (LPS mm), e.g. "nose_tip".
    landmarks: dict[str, np.ndarray] = field(default_factory=dict)
    options: PhantomOptions = field(default_factory=PhantomOptions)
    #: 3x3 linear map head coordinates (anatomy.py) → patient LPS mm (rotation × scale).
    head_to_patient: np.ndarray = field(default_factory=lambda: np.eye(3))


def rotation(options: PhantomOptions) -> np.ndarray:
    """Head → patient rotation: yaw about +z, then pitch about +x, then roll about +y."""
    y, p, r = np.radians([options.yaw, options.pitch, options.roll])
    rz = np.array([[np.cos(y), -np.sin(y), 0], [np.sin(y), np.cos(y), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    ry = np.array([[np.cos(r), 0, np.sin(r)], [0, 1, 0], [-np.sin(r), 0, np.cos(r)]])
    return rz @ rx @ ry


def scanner_geometry(options: PhantomOptions) -> Geometry:
    """Axial slices from inferior to superior; tilted image planes when ``tilt`` ≠ 0."""
    m = options.matrix
    ps = options.pixel_spacing if options.pixel_spacing is not None else FOV_MM / m
    t = np.radians(options.tilt)
    row_dir = np.array([1.0, 0.0, 0.0])  # along a row (DICOM row direction)
    col_dir = np.array([0.0, np.cos(t), -np.sin(t)])  # down a column
    normal = np.cross(row_dir, col_dir)
    # Table feed along +z, long enough that planes are `slice_thickness` apart.
    step = np.array([0.0, 0.0, options.slice_thickness / abs(normal[2])])
    if options.n_slices is not None:
        n = options.n_slices
    else:
        n = int(np.ceil((Z_TOP - Z_BOTTOM[options.fov]) / step[2])) + 1
        n = min(n, MAX_SLICES)
    z0 = Z_TOP - (n - 1) * step[2]
    centre = np.array([0.0, -10.0, z0])
    origin = centre - (m - 1) / 2.0 * ps * (row_dir + col_dir)
    affine = np.eye(4)
    affine[:3, 0] = step
    affine[:3, 1] = col_dir * ps
    affine[:3, 2] = row_dir * ps
    affine[:3, 3] = origin
    return Geometry(affine=affine, shape=(n, m, m))


def _canvas_for(geometry: Geometry, to_head: np.ndarray, res: float) -> Canvas:
    """The smallest head-coordinate box (within the model) that the scanner grid can sample."""
    k, r, c = (np.array(geometry.shape) - 1).tolist()
    corners = np.array([[a, b, d] for a in (0, k) for b in (0, r) for d in (0, c)], float)
    head = geometry.index_to_patient(corners) @ to_head.T
    lo = np.maximum(head.min(axis=0) - 3 * res, MODEL_LO)
    hi = np.minimum(head.max(axis=0) + 3 * res, MODEL_HI)
    hi = np.maximum(hi, lo + res)
    return Canvas.covering(lo, hi, res)


def _paint(c: Canvas, options: PhantomOptions, v: A.Variation) -> np.ndarray:
    A.build_envelope(c, v, tube=options.tube)
    A.paint_soft_tissue(c, v)
    A.paint_skull(c)
    A.paint_neck(c)
    A.paint_eyes(c)
    A.paint_vessels(c)
    if options.eye_shield is not None:
        A.paint_eye_shield(c, options.eye_shield)
    if options.tube:
        A.paint_tube(c)
    return A.facemask(c)


def _add_head_holder(hu: np.ndarray, geometry: Geometry, back_y: float) -> None:
    """A cradle under the occiput (4 mm air gap) and the table below it, in scanner space."""
    axis_y = back_y + 4.0 - 90.0
    a = geometry.affine
    r = np.arange(hu.shape[1], dtype=float)[:, None]
    c = np.arange(hu.shape[2], dtype=float)[None, :]
    x_rc = a[0, 3] + a[0, 1] * r + a[0, 2] * c
    y_rc = a[1, 3] + a[1, 1] * r + a[1, 2] * c
    for k in range(hu.shape[0]):
        x, y = x_rc + a[0, 0] * k, y_rc + a[1, 0] * k
        rad = np.hypot(x, y - axis_y)
        cradle = (rad >= 90.0) & (rad <= 96.0) & (y > axis_y + 40.0)
        table = (y >= back_y + 14.0) & (y <= back_y + 26.0) & (np.abs(x) < 200.0)
        sl = hu[k]
        air = sl < -900.0
        sl[cradle & air] = HU_HOLDER
        sl[table & air] = HU_TABLE


def _resample(
    src: np.ndarray,
    occupied: np.ndarray,
    lin: np.ndarray,
    off: np.ndarray,
    shape: tuple[int, int, int],
    order: int,
    cval: float,
) -> np.ndarray:
    """Sample ``src`` at ``lin @ index + off`` for every output index, only over the output
    box that can see ``occupied`` source voxels (the rest is ``cval``): the head fills about
    half of a 250 mm field of view, so this halves the cost."""
    out = np.full(shape, cval, dtype=src.dtype)
    extent = mask_extent(occupied)
    if extent is None:
        return out
    lo = (extent[0] - 1).astype(float)
    hi = extent[1].astype(float)
    corners = np.array(
        [[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])]
    )
    idx = np.linalg.solve(lin, (corners - off).T).T  # source → output index
    o0 = np.clip(np.floor(idx.min(axis=0)).astype(int) - 1, 0, np.array(shape))
    o1 = np.clip(np.ceil(idx.max(axis=0)).astype(int) + 2, 0, np.array(shape))
    if np.any(o1 <= o0):
        return out
    sub = tuple(int(b - a) for a, b in zip(o0, o1, strict=True))
    # A diagonal map (no rotation, no tilt) takes scipy's much faster zoom/shift path.
    diagonal = np.allclose(lin, np.diag(np.diag(lin)), atol=1e-9)
    matrix = np.diag(lin).copy() if diagonal else lin
    out[o0[0] : o1[0], o0[1] : o1[1], o0[2] : o1[2]] = ndimage.affine_transform(
        src,
        matrix,
        off + lin @ o0,
        output_shape=sub,
        output=src.dtype,
        order=order,
        mode="constant",
        cval=cval,
        prefilter=False,
    )
    return out


def generate_phantom(options: PhantomOptions) -> Phantom:
    """Synthesise the volume and its ground truth; same options (and seed) → same arrays."""
    rng = np.random.default_rng(options.seed)
    variation = A.Variation.from_rng(rng)
    scale = float(1.0 + 0.04 * rng.uniform(-1.0, 1.0))
    geometry = scanner_geometry(options)
    rot = rotation(options)
    to_head = rot.T / scale  # patient → head coordinates (linear part)
    res = float(np.clip(0.9 * min(geometry.spacing[1], geometry.slice_spacing), 1.0, 2.0))
    canvas = _canvas_for(geometry, to_head, res)
    face = _paint(canvas, options, variation)

    # Scanner index (k, r, c) → canvas index (z, y, x): one affine map for every voxel.
    perm = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], float)
    lin = perm @ (to_head @ geometry.affine[:3, :3]) / res
    off = perm @ ((to_head @ geometry.affine[:3, 3]) - canvas.lo) / res
    hu = _resample(canvas.hu, canvas.hu > A.HU_AIR + 1.0, lin, off, geometry.shape, 1, A.HU_AIR)
    labels = canvas.labels & INTRACRANIAL
    labels[face] |= _FACEMASK_BIT
    lab = _resample(labels, labels != 0, lin, off, geometry.shape, 0, 0)
    facemask = (lab & _FACEMASK_BIT) != 0
    intracranial = (lab & INTRACRANIAL) != 0
    del labels, lab

    marks = {name: rot @ (scale * point) for name, point in A.landmarks(variation).items()}
    if options.head_holder:
        inside = np.argwhere(canvas.skin[::2, ::2, ::2] < 0) * 2
        pts = canvas.lo + canvas.res * inside[:, ::-1]
        back_y = float((pts @ (scale * rot).T)[:, 1].max())
        _add_head_holder(hu, geometry, back_y)
    if options.noise > 0:
        for k in range(hu.shape[0]):
            hu[k] += rng.standard_normal(hu.shape[1:], dtype=np.float32) * np.float32(options.noise)
    header, planted = _header(options)
    return Phantom(
        hu=hu,
        facemask=facemask,
        intracranial=intracranial,
        geometry=geometry,
        header=header,
        planted_phi=planted,
        landmarks=marks,
        options=options,
        head_to_patient=scale * rot,
    )


def _header(options: PhantomOptions) -> tuple[Dataset | None, list[str]]:
    """The PHI template when asked for, else a plain header that names no one."""
    if options.phi:
        from inference.phi_header import phi_header

        return phi_header(options.seed)
    ds = Dataset()
    ds.PatientName = "Phantom^Head"
    ds.PatientID = f"PHANTOM{options.seed:06d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = "20000101"
    ds.StudyTime = "120000"
    ds.SeriesDate = "20000101"
    ds.SeriesTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.StudyDescription = "Synthetic head and neck CTA phantom"
    ds.SeriesDescription = f"defacegate phantom seed {options.seed}"
    ds.Manufacturer = "defacegate"
    ds.ManufacturerModelName = "phantom"
    ds.BodyPartExamined = "HEAD"
    ds.PatientPosition = "HFS"
    ds.ContrastBolusAgent = "Iodinated contrast"
    return ds, []
