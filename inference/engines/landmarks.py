"""Cheap face localisation on a coarse grid: body, bone, eye globes, chin and a face frame.

Everything here runs on ~2 mm grids so it costs well under a second on a 512×512×300 CT:

1. :func:`block_reduce` averages (and max-pools) the full-resolution volume into blocks of
   about 2 mm in its own index space (max-pooling keeps thin cortical bone bright).
2. The blocks are resampled into a *patient-aligned* isotropic grid (axes superior, anterior,
   left, from the affine), so gantry tilt and oblique acquisitions are handled once.
3. Body = largest tissue component after a small erosion (drops table, head holder, eye shields
   and tubes that only touch the skin through thin bridges), regrown inside the tissue.
4. Eye globes are the most reliable facial landmark in CT: two water-density spheres of
   ~24 mm in orbital fat, 45–85 mm apart, with an open (bone-free) path to the air in front.
   A scale-normalised Laplacian-of-Gaussian of a "water-likeness" map finds blob candidates;
   the best left/right pair that passes those tests gives the left-right axis and the face
   centre. The scanner's superior direction (from the affine) is the prior for the vertical;
   the chin (lowest anterior midline point of the mandible) refines head pitch.

The face frame is ``(s, a, l)`` = (superior, anterior, left) mm relative to the midpoint of
the eye globes; it is what the anatomical engine and :func:`face_region` build on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from inference.errors import FacemaskError
from inference.geometry import ANTERIOR, LEFT, SUPERIOR, Geometry

#: Voxel size of the face grid (and block size of the reduction), mm.
WORK_MM = 2.0
#: Voxel size of the patient-aligned grid the landmarks are searched on, mm.
PVIEW_MM = 3.0
#: Below this (block mean) a voxel is air.
AIR_HU = -500.0
#: At or above this (block mean) a voxel is bone (issue 3: "stopped by bone (≥ ~250 HU)").
BONE_HU = 250.0
#: Block maximum that marks thin cortical bone which averaging would dilute.
BONE_MAX_HU = 600.0
#: ... but only where the block mean shows some of it (not a neighbour's edge), HU.
THIN_BONE_MEAN_HU = 100.0
#: Eye-globe (vitreous) density and tolerance, HU.
GLOBE_HU, GLOBE_TOL_HU = 15.0, 35.0
#: Distance between the two globe centres (adult range with margin), mm.
GLOBE_PAIR_MM = (45.0, 85.0)
#: Depth of a globe centre below the surface of the head, mm.
GLOBE_DEPTH_MM = (4.0, 28.0)
#: Length of the bone-free path a globe must have towards the air in front, mm.
GLOBE_OPEN_MM = 36.0
#: A globe centre lies at least this far inside the field of view, mm (radius ~12 mm).
GLOBE_EDGE_MM = 15.0
#: The orbital roof lies within this distance above a globe centre, mm.
ORBIT_ROOF_MM = 28.0
#: Where the chin is searched, face frame (s, a, |l|) mm relative to the eye midpoint.
CHIN_WINDOW = ((-160.0, -55.0), (-50.0, 45.0), 25.0)
#: Eye-midpoint-to-menton distance used when the chin is outside the field of view, mm.
DEFAULT_CHIN_MM = 125.0
#: Menton lies this far anterior to the globe centres in an upright adult head (bony nasion
#: ~15 mm in front of the globe centres, pogonion below nasion, menton ~5–10 mm behind it), mm.
CHIN_FORWARD_MM = 7.0
#: Largest correction of the scanner's vertical that the chin may impose, degrees.
MAX_PITCH_DEG = 35.0


@dataclass(frozen=True)
class Grid:
    """A regular grid: index (i, j, k) ↦ LPS ``affine @ (i, j, k, 1)``."""

    affine: np.ndarray
    shape: tuple[int, int, int]

    def to_patient(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=float)
        return idx @ self.affine[:3, :3].T + self.affine[:3, 3]

    def to_index(self, xyz: np.ndarray) -> np.ndarray:
        inv = np.linalg.inv(self.affine)
        return np.asarray(xyz, dtype=float) @ inv[:3, :3].T + inv[:3, 3]


@dataclass(frozen=True)
class FaceLandmarks:
    """Landmarks in LPS mm and the face frame they define."""

    #: 3×3, columns = unit vectors superior, anterior, left of the *head* (not the scanner).
    axes: np.ndarray
    #: (2, 3) globe centres, patient right then left.
    eyes: np.ndarray
    #: Midpoint of the globes: origin of the face frame.
    centre: np.ndarray
    #: Lowest anterior midline point of the mandible, or None when outside the volume.
    menton: np.ndarray | None

    def to_face(self, xyz: np.ndarray) -> np.ndarray:
        """LPS (..., 3) → face frame (s, a, l) mm."""
        return (np.asarray(xyz, dtype=float) - self.centre) @ self.axes

    def to_patient(self, sal: np.ndarray) -> np.ndarray:
        """Face frame (..., 3) → LPS mm."""
        return np.asarray(sal, dtype=float) @ self.axes.T + self.centre

    @property
    def chin_s(self) -> float:
        """Face-frame height of the menton (or the anthropometric default)."""
        if self.menton is None:
            return -DEFAULT_CHIN_MM
        return float(self.to_face(self.menton)[0])


@dataclass(frozen=True)
class Coarse:
    """Block-reduced volume in the source index space (block mean and block max)."""

    mean: np.ndarray  # float32
    peak: np.ndarray  # float32
    grid: Grid


@dataclass(frozen=True)
class PatientView:
    """The coarse volume on a patient-aligned grid (axes superior, anterior, left)."""

    grid: Grid
    mean: np.ndarray  # float32
    body: np.ndarray  # bool
    filled: np.ndarray  # bool: body with internal air and orifices filled
    bone: np.ndarray  # bool
    valid: np.ndarray  # bool: inside the source field of view


def block_reduce(hu: np.ndarray, geometry: Geometry, target_mm: float = WORK_MM) -> Coarse:
    """Block mean and block max of ``hu`` in blocks of about ``target_mm`` (index space).

    Works slab by slab in float32 so no full-size float64 temporary is ever made.
    """
    if hu.ndim != 3 or hu.shape != geometry.shape:
        raise ValueError(f"volume shape {hu.shape} does not match geometry {geometry.shape}")
    f = np.maximum(1, np.rint(target_mm / geometry.spacing)).astype(int)
    n = -(-np.asarray(hu.shape) // f)
    mean = np.empty(tuple(n), np.float32)
    peak = np.empty(tuple(n), np.float32)
    for i in range(n[0]):
        slab = np.asarray(hu[i * f[0] : (i + 1) * f[0]], dtype=np.float32)
        pad = [(0, f[0] - slab.shape[0]), (0, n[1] * f[1] - slab.shape[1])]
        pad.append((0, n[2] * f[2] - slab.shape[2]))
        if any(p[1] for p in pad):
            slab = np.pad(slab, pad, mode="edge")
        # Strided adds/maxima (one pass per offset) are much faster than a multi-axis
        # reduction over a 5-D view; they never write into the caller's array.
        acc = slab[0].copy()
        top = slab[0].copy()
        for j in range(1, f[0]):
            acc += slab[j]
            np.maximum(top, slab[j], out=top)
        rows = [acc[j :: f[1]] for j in range(f[1])]
        rows_max = [top[j :: f[1]] for j in range(f[1])]
        acc, top = rows[0].copy(), rows_max[0].copy()
        for r, rm in zip(rows[1:], rows_max[1:], strict=True):
            acc += r
            np.maximum(top, rm, out=top)
        cols = [acc[:, j :: f[2]] for j in range(f[2])]
        cols_max = [top[:, j :: f[2]] for j in range(f[2])]
        acc, top = cols[0].copy(), cols_max[0].copy()
        for c, cm in zip(cols[1:], cols_max[1:], strict=True):
            acc += c
            np.maximum(top, cm, out=top)
        mean[i] = acc * np.float32(1.0 / f.prod())
        peak[i] = top
    # Padding outside the reconstruction circle (-2000, -3024) reads as air.
    np.maximum(mean, -1024.0, out=mean)
    a = geometry.affine
    affine = a.copy()
    affine[:3, :3] = a[:3, :3] * f
    affine[:3, 3] = a[:3, :3] @ ((f - 1) / 2.0) + a[:3, 3]
    return Coarse(mean, peak, Grid(affine, (int(n[0]), int(n[1]), int(n[2]))))


def frame_grid(
    axes: np.ndarray, lo: np.ndarray, hi: np.ndarray, origin: np.ndarray, step: float = WORK_MM
) -> Grid:
    """Grid with unit ``axes`` (columns) spanning frame coordinates ``lo``…``hi`` (mm)
    about ``origin`` (LPS), at ``step`` mm."""
    shape = tuple(int(x) for x in np.ceil((np.asarray(hi) - lo) / step) + 1)
    affine = np.eye(4)
    affine[:3, :3] = axes * step
    affine[:3, 3] = origin + axes @ np.asarray(lo, dtype=float)
    return Grid(affine, shape)  # type: ignore[arg-type]


def resample(
    vol: np.ndarray,
    src: Grid,
    dst: Grid,
    *,
    order: int = 1,
    cval: float = 0.0,
    mode: str = "constant",
) -> np.ndarray:
    """Sample ``vol`` (on ``src``) at the voxels of ``dst`` (float32; outside ``src``:
    ``cval``, or the nearest value with ``mode="nearest"`` — then track the field of view
    with :func:`valid_region`, so a volume's edge never looks like air)."""
    m = np.linalg.inv(src.affine) @ dst.affine
    return ndimage.affine_transform(
        np.asarray(vol, dtype=np.float32),
        m[:3, :3],
        offset=m[:3, 3],
        output_shape=dst.shape,
        order=order,
        mode=mode,
        cval=cval,
        prefilter=False,
        output=np.float32,
    )


def valid_region(src: Grid, dst: Grid) -> np.ndarray:
    """Voxels of ``dst`` that lie inside the field of view of ``src``."""
    m = np.linalg.inv(src.affine) @ dst.affine
    idx = np.indices(dst.shape, dtype=np.float32).reshape(3, -1)
    s = m[:3, :3].astype(np.float32) @ idx + m[:3, 3:4].astype(np.float32)
    lim = np.asarray(src.shape, dtype=np.float32)[:, None] - 0.5
    ok = np.all((s >= -0.5) & (s <= lim), axis=0)
    return ok.reshape(dst.shape)


def close_mm(mask: np.ndarray, radius_mm: float, step: float) -> np.ndarray:
    """Morphological closing by a ball of ``radius_mm`` through two distance transforms
    (cost independent of the radius); the volume border counts as outside."""
    grown = ndimage.distance_transform_edt(~np.pad(mask, 1), sampling=step) <= radius_mm
    closed = ndimage.distance_transform_edt(grown, sampling=step) > radius_mm
    return closed[1:-1, 1:-1, 1:-1] | mask


def body_masks(mean: np.ndarray, valid: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """(body, filled): the head/neck as the largest tissue component, and the same with
    internal air (sinuses, airway, nostrils, a closed mouth) filled.

    An erosion of ~4 mm first cuts thin bridges to the table, head holder, eye shield or
    tube; the core is then regrown ~10 mm inside the tissue, which restores ears and skin
    folds but only a stub of anything across a bridge.
    """
    tissue = valid & (mean > AIR_HU)
    core = ndimage.binary_erosion(tissue, iterations=max(1, round(4.0 / step)))
    lab, n = ndimage.label(core)
    if n == 0:
        raise FacemaskError("no body found in the volume (no tissue above -500 HU)")
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    body = ndimage.binary_dilation(
        lab == int(np.argmax(sizes)), iterations=max(2, round(10.0 / step)), mask=tissue
    )
    # Close orifices (nostrils, lips, ear folds) and fill internal air, slice by slice along
    # the first axis (superior) plus in 3-D.
    filled = ndimage.binary_fill_holes(close_mm(body, 6.0, step))
    for i in range(filled.shape[0]):
        filled[i] = ndimage.binary_fill_holes(filled[i])
    return body, filled


def first_label(labels: np.ndarray, axis: int, forward: bool) -> np.ndarray:
    """For every voxel, the first non-zero label met along ``axis`` (itself included), going
    towards increasing (``forward``) or decreasing index; 0 where none."""
    lab = np.moveaxis(labels, axis, 0)
    if forward:
        lab = lab[::-1]
    n = lab.shape[0]
    ar = np.arange(n, dtype=np.int16).reshape((n,) + (1,) * (lab.ndim - 1))
    idx = np.where(lab != 0, ar, np.int16(-1))
    np.maximum.accumulate(idx, axis=0, out=idx)
    out = np.take_along_axis(lab, np.maximum(idx, 0), axis=0)
    out[idx < 0] = 0
    if forward:
        out = out[::-1]
    return np.moveaxis(out, 0, axis)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _globe_candidates(p: PatientView) -> tuple[np.ndarray, np.ndarray]:
    """Blob candidates for eye globes on the patient grid: (index positions, responses)."""
    w = np.exp(-(((p.mean - GLOBE_HU) / GLOBE_TOL_HU) ** 2)).astype(np.float32)
    w[~p.body | p.bone] = 0.0
    sigma = 12.0 / np.sqrt(3.0) / PVIEW_MM
    resp = -ndimage.gaussian_laplace(w, sigma=sigma) * np.float32(sigma**2)
    depth = ndimage.distance_transform_edt(p.filled) * PVIEW_MM
    ok = (depth >= GLOBE_DEPTH_MM[0]) & (depth <= GLOBE_DEPTH_MM[1]) & (w > 0.3)
    # A globe lies wholly inside the field of view (blobs where the FOV cuts the neck do not).
    ok &= (
        ndimage.distance_transform_edt(np.pad(p.valid, 1))[1:-1, 1:-1, 1:-1] * PVIEW_MM
        >= GLOBE_EDGE_MM
    )
    resp = np.where(ok, resp, 0.0).astype(np.float32)
    peaks = ndimage.maximum_filter(resp, size=2 * round(5.0 / PVIEW_MM) + 1)
    cand = np.argwhere((resp == peaks) & (resp > 0.08))
    vals = resp[tuple(cand.T)]
    order = np.argsort(vals)[::-1][:16]
    return cand[order], vals[order]


def _open_in_front(
    p: np.ndarray,
    anterior: np.ndarray,
    superior: np.ndarray,
    grid: Grid,
    filled: np.ndarray,
    bone: np.ndarray,
) -> bool:
    """True if some ray from ``p`` (index) within ±25° of ``anterior`` reaches air outside
    the head before any bone (eye globes do; brain blobs behind the skull do not)."""
    left = np.cross(superior, anterior)
    steps = np.arange(1, int(GLOBE_OPEN_MM / (PVIEW_MM / 2)) + 1) * (PVIEW_MM / 2)
    inv = np.linalg.inv(grid.affine)[:3, :3]
    for yaw in (0.0, -25.0, 25.0):
        for pitch in (0.0, -20.0, 20.0):
            y, t = np.radians(yaw), np.radians(pitch)
            d = _unit(np.cos(y) * np.cos(t) * anterior + np.sin(y) * left + np.sin(t) * superior)
            pts = p + (steps[:, None] * d) @ inv.T
            ijk = np.rint(pts).astype(int)
            inside = np.all((ijk >= 0) & (ijk < np.asarray(filled.shape)), axis=1)
            ijk = ijk[inside]
            if len(ijk) == 0:
                continue
            b = bone[tuple(ijk.T)]
            out = ~filled[tuple(ijk.T)]
            first_out = np.argmax(out) if out.any() else None
            if first_out is not None and not b[:first_out].any():
                return True
    return False


def _roof_above(p: np.ndarray, grid: Grid, bone: np.ndarray) -> bool:
    """True if bone (the orbital roof) lies within ORBIT_ROOF_MM above ``p`` (index) along
    some direction within ±25° of the scanner's superior."""
    inv = np.linalg.inv(grid.affine)[:3, :3]
    steps = np.arange(1, int(ORBIT_ROOF_MM / (PVIEW_MM / 2)) + 1) * (PVIEW_MM / 2)
    for tilt in (0.0, -25.0, 25.0):
        for axis in (ANTERIOR, LEFT):
            t = np.radians(tilt)
            d = np.cos(t) * SUPERIOR + np.sin(t) * axis
            ijk = np.rint(p + (steps[:, None] * d) @ inv.T).astype(int)
            ijk = ijk[np.all((ijk >= 0) & (ijk < np.asarray(bone.shape)), axis=1)]
            if len(ijk) and bone[tuple(ijk.T)].any():
                return True
    return False


def find_eyes(p: PatientView) -> tuple[np.ndarray, np.ndarray]:
    """(right, left) eye-globe centres, LPS mm; FacemaskError when no plausible pair."""
    cand, vals = _globe_candidates(p)
    pts = p.grid.to_patient(cand) if len(cand) else np.zeros((0, 3))
    open_ = [
        _open_in_front(cand[i], ANTERIOR, SUPERIOR, p.grid, p.filled, p.bone)
        and _roof_above(cand[i], p.grid, p.bone)
        for i in range(len(cand))
    ]
    best: tuple[float, int, int] | None = None
    for i in range(len(cand)):
        if not open_[i]:
            continue
        for j in range(i + 1, len(cand)):
            if not open_[j]:
                continue
            v = pts[j] - pts[i]
            dist = float(np.linalg.norm(v))
            if not GLOBE_PAIR_MM[0] <= dist <= GLOBE_PAIR_MM[1]:
                continue
            if abs(v @ LEFT) / dist < np.cos(np.radians(40.0)):
                continue
            score = float(vals[i] + vals[j] - abs(vals[i] - vals[j]))
            if best is None or score > best[0]:
                best = (score, i, j)
    if best is None:
        raise FacemaskError(
            "eye globes not found: the volume may not contain a face, or the face is cropped"
        )
    a, b = pts[best[1]], pts[best[2]]
    return (a, b) if a @ LEFT < b @ LEFT else (b, a)


def find_chin(p: PatientView, axes: np.ndarray, centre: np.ndarray) -> np.ndarray | None:
    """Menton (LPS): lowest midline point of the anterior part of the largest bone
    component in the chin window below the eyes, or None if no mandible is in the volume."""
    idx = np.argwhere(p.bone)
    if len(idx) == 0:
        return None
    sal = (p.grid.to_patient(idx) - centre) @ axes
    (s0, s1), (a0, a1), lmax = CHIN_WINDOW
    win = (sal[:, 0] >= s0) & (sal[:, 0] <= s1) & (sal[:, 1] >= a0) & (sal[:, 1] <= a1)
    win &= np.abs(sal[:, 2]) <= lmax
    if win.sum() < 10:
        return None
    lab, _ = ndimage.label(p.bone, structure=np.ones((3, 3, 3), bool))
    ids = lab[tuple(idx[win].T)]
    comp = np.bincount(ids).argmax()
    sel = win & (lab[tuple(idx.T)] == comp)
    pts = sal[sel]
    pts = pts[pts[:, 1] >= pts[:, 1].max() - 25.0]
    mid = pts[np.abs(pts[:, 2]) <= 15.0]
    if len(mid) == 0:
        return None
    low = mid[mid[:, 0] <= mid[:, 0].min() + PVIEW_MM].mean(axis=0)
    if low[0] > s0 + 0.0 and low[0] > -70.0:
        # The lowest bone near the midline is the maxilla: the mandible is not in the volume.
        return None
    return centre + axes @ low


def patient_view(c: Coarse, geometry: Geometry) -> PatientView:
    """Resample the coarse volume into a patient-aligned grid over the whole field of view
    and segment body and bone there."""
    paxes = np.stack([SUPERIOR, ANTERIOR, LEFT], axis=1)
    n = geometry.shape
    corners = np.array(
        [
            [i, j, k]
            for i in (-0.5, n[0] - 0.5)
            for j in (-0.5, n[1] - 0.5)
            for k in (-0.5, n[2] - 0.5)
        ]
    )
    frame = geometry.index_to_patient(corners) @ paxes
    grid = frame_grid(paxes, frame.min(0), frame.max(0), np.zeros(3), PVIEW_MM)
    mean = resample(c.mean, c.grid, grid, mode="nearest")
    peak = resample(c.peak, c.grid, grid, mode="nearest")
    valid = valid_region(c.grid, grid)
    body, filled = body_masks(mean, valid, PVIEW_MM)
    bone = body & ((mean >= BONE_HU) | ((peak >= BONE_MAX_HU) & (mean >= THIN_BONE_MEAN_HU)))
    return PatientView(grid, mean, body, filled, bone, valid)


def locate(hu: np.ndarray, geometry: Geometry) -> tuple[FaceLandmarks, Coarse, PatientView]:
    """Find the face: landmarks plus the coarse volumes they were found on."""
    c = block_reduce(hu, geometry)
    p = patient_view(c, geometry)
    right, left = find_eyes(p)
    centre = (right + left) / 2.0
    lr = _unit(left - right)
    sup = _unit(SUPERIOR - (SUPERIOR @ lr) * lr)
    axes = np.stack([sup, np.cross(lr, sup), lr], axis=1)
    menton = find_chin(p, axes, centre)
    if menton is not None:
        v = centre - menton
        v = v - (v @ lr) * lr
        t = np.arcsin(np.clip(CHIN_FORWARD_MM / np.linalg.norm(v), -1.0, 1.0))
        u = _unit(v)
        v = np.cos(t) * u + np.sin(t) * np.cross(lr, u)
        if np.degrees(np.arccos(np.clip(v @ sup, -1, 1))) <= MAX_PITCH_DEG:
            axes = np.stack([v, np.cross(lr, v), lr], axis=1)
    return FaceLandmarks(axes, np.stack([right, left]), centre, menton), c, p
