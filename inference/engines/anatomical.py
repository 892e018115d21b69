"""Anatomical facemask engine: classical, anatomy-driven, CPU only, no weights (the default).

In the spirit of CTA-DEFACE's mask (not a rectangular prism): facial soft tissue from above
the supraorbital ridge to below the chin, across the face including cheeks and the masseter
region, is removed from the skin inwards to ``depth_mm`` and stopped by bone, plus everything
anterior to the facial bones (nose, lips, eyelids). Objects outside the skin in the region
(eye shields, glasses, tubes) are removed too and never act as bone.

Method, on ~2 mm grids (full resolution is only touched to upsample the result):

1. :mod:`inference.engines.landmarks` finds the eye globes and the chin and builds the *face
   frame* (superior, anterior, left of the head itself, so yaw/pitch/roll and gantry tilt
   are handled).
2. The volume is resampled into a face-aligned grid. There:

   * **protected** = voxels from which every axis-aligned ray meets bone (or the edge of the
     field of view) before the air around the head: the cranial cavity (brain, intracranial
     vessels) and closed sinuses. Dilated by one voxel, it is subtracted from everything.
   * **depth**: geodesic reach from the outside air through non-bone voxels (so bone stops
     it), limited by the Euclidean depth below the skin ``depth_mm`` ± a smooth random field
     (the cut surface is irregular, not a cast of the face).
   * **anterior**: everything in front of the *facial-bone front* — per column along the
     anterior axis the first bone within 35 mm of the skin, median-filtered and filled across
     gaps (open mouth, nostrils, dental streaks) — so thick soft tissue in front of bone goes
     whatever its depth.
   * **region**: above the chin minus a margin, below the supraorbital ridge plus a forehead
     margin, anterior to a coronal plane in front of the ears (behind them with
     ``include_ears``), each bound perturbed by a smooth random field.
3. These are combined as signed fields in mm, upsampled trilinearly to the original grid in
   slabs (sub-voxel, smooth surfaces) and refined with the full-resolution HU: voxels at or
   above 250 HU are kept where bone is kept (``bone="keep"``), while in front of the facial-bone
   front and in the ``smooth``/``remove`` zones they go too.

All arrays are float32/bool; peak memory is about the input plus a few hundred MB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from inference.engines.landmarks import (
    AIR_HU,
    BONE_HU,
    BONE_MAX_HU,
    THIN_BONE_MEAN_HU,
    WORK_MM,
    Coarse,
    FaceLandmarks,
    Grid,
    PatientView,
    close_mm,
    first_label,
    frame_grid,
    locate,
    resample,
    valid_region,
)
from inference.errors import FacemaskError
from inference.geometry import Geometry

# Region bounds in the face frame (mm, relative to the midpoint of the eye globes).
#: Top of the region: above the supraorbital ridge and the frontal sinus (~30 mm).
TOP_MM = 45.0
#: Bottom of the region below the (bony) menton: soft tissue there is ~7–10 mm thick.
BELOW_CHIN_MM = 10.0
#: The jaw line: only bone below this height (mm) belongs to it, and how far sideways it
#: is extended beyond the mandible (mm).
JAW_TOP_MM = -55.0
#: Tissue more than this below the mandible's lower border is neck, not face, mm.
BELOW_JAW_MM = 5.0
JAW_FILL_MM = 25.0
#: Posterior bound: in front of the temporo-mandibular joints (porion is ~70 mm behind the
#: globe centres), so the masseter region is included.
POSTERIOR_MM = 60.0
#: Lateral bound (medial to the ears; bizygomatic half-width is ~65–70 mm).
LATERAL_MM = 72.0
#: Posterior bound and height range (s) of the ear extension.
EARS_POSTERIOR_MM = 110.0
EARS_S_MM = (-70.0, 25.0)
#: How far behind the skin the facial-bone front is searched, mm.
FRONT_SEARCH_MM = 35.0
#: The "everything anterior to the facial bones" rule applies below this height, mm.
ANTERIOR_TOP_MM = -25.0
#: Radius of the closing that seals orifices before the skin depth is measured, mm.
CLOSE_MM = 8.0
#: Enclosed components at least this large are the cranial cavity (given a safety margin).
CRANIAL_MIN_MM3 = 50_000.0
#: Height above the globe centres from which the cranial cavity is regrown without limit.
ORBIT_TOP_MM = 12.0
#: Top of the mouth (teeth) level, where a gap in the bone front is an open mouth, mm.
MOUTH_TOP_MM = -50.0
#: A gap in the lower-face bone front blocks this far behind the interpolated front, mm.
GAP_BEHIND_MM = 6.0
#: Largest gap across which the bone front is filled in (open mouth, nostrils), mm.
FRONT_FILL_MM = 30.0
#: Amplitude (sd) of the smooth random perturbation of depth and region bounds, mm.
IRREGULAR_MM = 4.0
#: Range of the smooth random offset of the region bounds, mm (positive = outwards).
REGION_JITTER_MM = (-1.0, 4.0)
#: Correlation length of the perturbations, mm.
IRREGULAR_SCALE_MM = 14.0
#: Bone is only modified (smooth/remove) below this height: the skull vault is never touched.
BROW_MM = 15.0
#: Margin kept between modified bone and the protected (intracranial) set, mm.
BONE_SAFETY_MM = 6.0
#: Shell thickness range removed by ``bone="smooth"``, mm.
SMOOTH_SHELL_MM = (2.0, 7.0)
#: Enamel/dentine level used to find the front of the teeth, HU.
TOOTH_HU = 1500.0
#: Full-resolution slabs processed at a time when upsampling.
_SLAB = 16
_CLIP = 4.0


@dataclass(frozen=True)
class AnatomicalOptions:
    """How much of the face goes. Defaults: CTA-DEFACE parity (soft tissue only)."""

    bone: Literal["keep", "smooth", "remove"] = "keep"
    include_ears: bool = False
    depth_mm: float = 28.0
    #: Maximum thickness of a random band added at the cut surface (thickness per place
    #: uniform in [band/3, band]: 3.0 gives the 1–3 mm band); 0 = off.
    surface_band_mm: float = 0.0
    #: Seed of every random part (deterministic).
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bone not in ("keep", "smooth", "remove"):
            raise ValueError(f"bone must be keep, smooth or remove, got {self.bone!r}")
        if not 10.0 <= self.depth_mm <= 60.0:
            raise ValueError(f"depth_mm must be within 10–60 mm, got {self.depth_mm}")
        if not 0.0 <= self.surface_band_mm <= 6.0:
            raise ValueError(f"surface_band_mm must be within 0–6 mm, got {self.surface_band_mm}")


@dataclass(frozen=True)
class FaceFields:
    """The engine's result on the face grid, before upsampling (exposed for tests/QA)."""

    grid: Grid
    #: Signed field, mm: > 0 where voxels go (before the full-resolution bone rule).
    inside: np.ndarray
    #: True where bone (≥ 250 HU at full resolution) is kept even inside ``inside``.
    keep_bone: np.ndarray
    #: Cranial cavity and closed sinuses (never masked), dilated by one voxel.
    protected: np.ndarray
    landmarks: FaceLandmarks


class AnatomicalEngine:
    """Facemask from anatomy; satisfies :class:`inference.engines.FacemaskEngine`."""

    name = "anatomical"

    def __init__(self, options: AnatomicalOptions | None = None) -> None:
        self.options = options or AnatomicalOptions()

    def mask(self, hu: np.ndarray, geometry: Geometry) -> np.ndarray:
        """Boolean facemask of ``hu.shape``; FacemaskError when the face is not found."""
        lm, coarse, pview = locate(hu, geometry)
        fields = face_fields(lm, coarse, pview, self.options)
        return upsample_mask(fields, hu, geometry)


def face_region(
    hu: np.ndarray, geometry: Geometry, margin_mm: float = 15.0
) -> tuple[slice, slice, slice]:
    """Index-space box (k, r, c slices) around the face region plus ``margin_mm``.

    Cheap (landmarks on a 2 mm grid); used by the nnU-Net engine to crop its input.
    Raises FacemaskError when the face cannot be found.
    """
    lm, _, _ = locate(hu, geometry)
    lo = np.array([lm.chin_s - BELOW_CHIN_MM - 10.0, -POSTERIOR_MM - 10.0, -95.0]) - margin_mm
    hi = np.array([TOP_MM + 10.0, 80.0, 95.0]) + margin_mm
    corners = np.array(
        [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
    )
    idx = geometry.patient_to_index(lm.to_patient(corners))
    a = np.clip(np.floor(idx.min(0)), 0, np.asarray(hu.shape)).astype(int)
    b = np.clip(np.ceil(idx.max(0)) + 1, 0, np.asarray(hu.shape)).astype(int)
    if np.any(b <= a):
        raise FacemaskError("face region lies outside the volume")
    return slice(a[0], b[0]), slice(a[1], b[1]), slice(a[2], b[2])


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Smooth random field with zero mean and unit sd (correlation ~IRREGULAR_SCALE_MM)."""
    z = ndimage.gaussian_filter(
        rng.standard_normal(shape).astype(np.float32),
        IRREGULAR_SCALE_MM / WORK_MM / 2.0,
        mode="wrap",
    )
    return (z - z.mean()) / max(float(z.std()), 1e-6)


def _outward(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Smooth random offset of a region bound, mm, within REGION_JITTER_MM (mostly > 0)."""
    lo, hi = REGION_JITTER_MM
    return lo + (hi - lo) * (0.5 + 0.5 * np.tanh(_smooth_noise(rng, shape)))


def _bone_front(bone: np.ndarray, filled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per (s, l) column, index along a (axis 1) of the first bone within
    FRONT_SEARCH_MM of the skin, seen from the front; gaps (open mouth, nostrils, eyes)
    filled from neighbours up to FRONT_FILL_MM; median-filtered over 10 mm in s so that
    dental streak artefacts (bright bands a few mm thick) do not count; −1e3 where
    undefined. Also returns where the front was filled rather than measured."""
    na = bone.shape[1]
    ar = np.arange(na)[None, :, None]
    has_skin = np.asarray(filled.any(axis=1))
    skin = na - 1 - np.argmax(filled[:, ::-1, :], axis=1)
    near = bone & (ar >= (skin - FRONT_SEARCH_MM / WORK_MM)[:, None, :]) & has_skin[:, None, :]
    has = near.any(axis=1)
    front = (na - 1 - np.argmax(near[:, ::-1, :], axis=1)).astype(np.float32)
    if not has.any():
        return np.full(has.shape, -1e3, np.float32), np.zeros(has.shape, bool)
    dist, (ii, jj) = ndimage.distance_transform_edt(~has, return_indices=True)
    front = front[ii, jj]
    front = ndimage.median_filter(front, size=(5, 3))
    undefined = (dist * WORK_MM > FRONT_FILL_MM) | ~has_skin
    front[undefined] = -1e3
    return front, ~has & ~undefined


def _surface_bone(bone: np.ndarray, outside: np.ndarray) -> np.ndarray:
    """Bone-dense components lying on the skin (eye shields, glasses, jewellery): small
    and mostly within 4 mm of the outside air. They are foreign objects, never bone."""
    lab, n = ndimage.label(bone, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return np.zeros_like(bone)
    near = ndimage.binary_dilation(outside, iterations=2)
    ids = np.arange(1, n + 1)
    frac = np.asarray(ndimage.mean(near, lab, ids))
    size = np.bincount(lab.ravel(), minlength=n + 1)[1:] * WORK_MM**3
    bad = ids[(frac > 0.6) & (size < 15000.0)]
    return np.isin(lab, bad)


def _protected(
    bone: np.ndarray, escape: np.ndarray, valid: np.ndarray, s_mm: np.ndarray
) -> np.ndarray:
    """Voxels enclosed by bone: every axis ray meets bone (dilated by one voxel to close
    thin-bone gaps) or the edge of the field of view before reaching ``escape``."""
    barrier = ndimage.binary_dilation(bone)
    lab = np.zeros(bone.shape, np.uint8)
    lab[escape] = 2
    lab[~valid] = 1
    lab[barrier] = 1
    enclosed = ~barrier & valid
    for axis in range(3):
        for forward in (True, False):
            enclosed &= first_label(lab, axis, forward) != 2
    # The cranial cavity (large enclosed components) grows back over the barrier shell (the
    # tissue next to the inner table), then one more voxel but only into bone, so the skin
    # over thin bone stays maskable. Small pockets (sinuses, orbital fat behind the rims,
    # the oral cavity) stay protected as they are.
    # Narrow channels (optic canal, orbital fissures) are cut first so that the orbits do
    # not join the cranial cavity.
    core = ndimage.binary_erosion(enclosed, iterations=2)
    lab_e, n = ndimage.label(core)
    if n == 0:
        return core
    sizes = np.bincount(lab_e.ravel())[1:] * WORK_MM**3
    big = np.isin(lab_e, np.flatnonzero(sizes >= CRANIAL_MIN_MM3) + 1)
    # Regrow: a few voxels everywhere, fully above the orbits (the frontal poles reach far
    # forward in thin wedges between the orbital roofs and the frontal bone).
    above = np.broadcast_to(s_mm > ORBIT_TOP_MM, enclosed.shape)
    big = ndimage.binary_dilation(big, iterations=3, mask=enclosed) | ndimage.binary_propagation(
        big, mask=enclosed & above
    )
    near = ndimage.binary_dilation(big)
    return big | near | (ndimage.binary_dilation(near) & bone)


def face_fields(
    lm: FaceLandmarks,
    coarse: Coarse,
    pview: PatientView,
    opts: AnatomicalOptions,
    debug: dict[str, np.ndarray] | None = None,
) -> FaceFields:
    """Compute the facemask as signed fields on a face-aligned 2 mm grid."""
    chin = lm.chin_s
    post = EARS_POSTERIOR_MM if opts.include_ears else POSTERIOR_MM
    lo = np.array([chin - BELOW_CHIN_MM - 3 * IRREGULAR_MM - 10.0, -post - 50.0, -110.0])
    hi = np.array([TOP_MM + 3 * IRREGULAR_MM + 20.0, 90.0, 110.0])
    grid = frame_grid(lm.axes, lo, hi, lm.centre)
    mean = resample(coarse.mean, coarse.grid, grid, mode="nearest")
    peak = resample(coarse.peak, coarse.grid, grid, mode="nearest")
    valid = valid_region(coarse.grid, grid)
    body = (resample(pview.body, pview.grid, grid, mode="nearest") > 0.5) & valid
    filled = (resample(pview.filled, pview.grid, grid, mode="nearest") > 0.5) | body

    # Seal orifices (nostrils, mouth, ear folds) up to ~2 CLOSE_MM wide so that the airway
    # never counts as "outside": closing by distance transforms (cheap at any radius).
    sealed = close_mm(filled, CLOSE_MM, WORK_MM)
    for i in range(sealed.shape[0]):
        sealed[i] = ndimage.binary_fill_holes(sealed[i])
    outside = valid & ~sealed
    # Objects outside the skin: table, head holder, eye shields, glasses, tubes.
    foreign = outside & (mean > AIR_HU)
    bone = body & ((mean >= BONE_HU) | ((peak >= BONE_MAX_HU) & (mean >= THIN_BONE_MEAN_HU)))
    surf = _surface_bone(bone, outside)
    bone &= ~surf
    foreign |= surf
    seeds = outside | foreign
    s_mm = (lo[0] + WORK_MM * np.arange(grid.shape[0], dtype=np.float32))[:, None, None]
    protected = _protected(bone, seeds, valid, s_mm)

    rng = np.random.default_rng(opts.seed)
    ns, na, nl = grid.shape
    s = (lo[0] + WORK_MM * np.arange(ns, dtype=np.float32))[:, None, None]
    a = (lo[1] + WORK_MM * np.arange(na, dtype=np.float32))[None, :, None]
    lat = (lo[2] + WORK_MM * np.arange(nl, dtype=np.float32))[None, None, :]
    ai = np.arange(na, dtype=np.float32)[None, :, None]

    # Skin-inwards depth, stopped by bone (geodesic reach) and by the protected set.
    jitter = _smooth_noise(rng, (ns, nl))[:, None, :] * np.float32(IRREGULAR_MM)
    np.clip(jitter, -1.5 * IRREGULAR_MM, 1.5 * IRREGULAR_MM, out=jitter)
    allowed = valid & ~bone & ~protected
    reach = seeds.copy()
    n_iter = int(np.ceil((opts.depth_mm + 1.5 * IRREGULAR_MM + opts.surface_band_mm) / WORK_MM))
    st6 = ndimage.generate_binary_structure(3, 1)
    st18 = ndimage.generate_binary_structure(3, 2)
    for i in range(n_iter + 1):
        reach = ndimage.binary_dilation(reach, st18 if i % 2 else st6, mask=allowed)
    # Two layers into the coarse bone (max-pooling makes it ~2 mm fatter than the real
    # bone); at full resolution voxels >= 250 HU there are kept, the soft rest goes.
    reach |= ndimage.binary_dilation(reach, st6, iterations=2, mask=bone & ~protected)
    depth = ndimage.distance_transform_edt(~seeds, sampling=WORK_MM).astype(np.float32)
    # Nor behind bone seen from the front. Bone-dense specks in front of the (robust)
    # facial-bone front - dental streaks, calcifications - do not block.
    front, gap = _bone_front(bone, filled)
    # Only bone at least two voxels thick along the ray casts a shadow: a speck at the edge
    # of a rim (or a bright vessel) must not leave the tissue behind it.
    thick = bone.copy()
    thick[:, 1:, :] &= bone[:, :-1, :]
    solid = thick & (ai <= front[:, None, :] + 1.0)
    # In the lower face a gap in the bone front (open mouth between the teeth) blocks too,
    # so the tongue behind an open mouth is not taken for face.
    lower = (s <= MOUTH_TOP_MM) & (s >= chin + BELOW_CHIN_MM) & gap[:, None, :]
    solid |= lower & (ai == np.floor(front[:, None, :]) - GAP_BEHIND_MM / WORK_MM)
    behind = np.logical_or.accumulate(solid[:, ::-1, :], axis=1)[:, ::-1, :]
    reach &= ~behind | bone
    dfield = np.where(reach, opts.depth_mm + jitter - depth, -_CLIP).astype(np.float32)

    # Everything in front of the facial-bone front.
    afield = ((ai - front[:, None, :]) * WORK_MM - WORK_MM / 2).astype(np.float32)
    np.clip(afield, -_CLIP, _CLIP, out=afield)
    # Only in the lower face (cheeks, lips, chin), where soft tissue can be thicker than
    # depth_mm; higher up the first bone behind the skin may be the orbital apex or the
    # back of the nasal cavity.
    afield[s[:, 0, 0] > ANTERIOR_TOP_MM] = -_CLIP

    # Region bounds, each perturbed (mostly outwards: the bounds are anatomical minima).
    top = TOP_MM + _outward(rng, (na, nl))[None] - s
    bottom = s - (chin - BELOW_CHIN_MM - _outward(rng, (na, nl))[None])
    back = a - (-POSTERIOR_MM - _outward(rng, (ns, nl))[:, None, :])
    if opts.include_ears:
        ears = (s >= EARS_S_MM[0]) & (s <= EARS_S_MM[1])
        back = np.where(ears, a + EARS_POSTERIOR_MM, back)
    region = np.minimum(np.minimum(top, bottom), back)
    jaw = _jaw_bound(bone, lm, grid, lo)
    if jaw is not None:
        region = np.minimum(region, s - jaw[None])
    if not opts.include_ears:
        side = LATERAL_MM + _outward(rng, (ns, na))[:, :, None] - np.abs(lat)
        region = np.minimum(region, side)
    region = region.astype(np.float32)

    # Bone handling: which bone (>= 250 HU at full resolution) stays.
    # (columns without a defined front - no bone near the skin - keep their bone)
    undefined = front[:, None, :] < -1e2
    keep_bone = (ai <= front[:, None, :] + 1.0) | undefined
    keep_bone = np.broadcast_to(keep_bone, grid.shape).copy()
    bfield = np.full(grid.shape, -_CLIP, np.float32)
    if opts.bone != "keep":
        safe = ~ndimage.binary_dilation(protected, iterations=int(BONE_SAFETY_MM / WORK_MM))
        zone = bone & safe & (region > 0) & (s <= BROW_MM)
        if opts.bone == "remove":
            plane = _removal_plane(front, peak, bone, s, a, lo, chin)
            cut = zone & (a > plane)
        else:
            u = _smooth_noise(rng, (ns, nl))
            shell = SMOOTH_SHELL_MM[0] + (SMOOTH_SHELL_MM[1] - SMOOTH_SHELL_MM[0]) * (
                0.5 + 0.5 * np.tanh(u)
            )
            cut = zone & ~undefined & ((front[:, None, :] - ai) * WORK_MM < shell[:, None, :])
        keep_bone &= ~cut
        bfield[cut] = _CLIP

    np.clip(dfield, -_CLIP, _CLIP, out=dfield)
    inside = np.maximum(np.maximum(dfield, afield), bfield)
    if opts.surface_band_mm > 0:
        band = rng.uniform(opts.surface_band_mm / 3, opts.surface_band_mm, grid.shape)
        inside += ndimage.gaussian_filter(band.astype(np.float32), 0.7)
    if debug is not None:
        debug.update(
            top=top,
            bottom=bottom,
            back=back,
            region=region,
            dfield=dfield,
            afield=afield,
            reach=reach,
            bone=bone,
            behind=behind,
            depth=depth,
            seeds=seeds,
        )
    np.minimum(inside, np.clip(region, -_CLIP, _CLIP), out=inside)
    inside[protected] = -_CLIP
    inside[~valid] = -_CLIP
    return FaceFields(grid, inside, keep_bone, protected, lm)


def _jaw_bound(
    bone: np.ndarray, lm: FaceLandmarks, grid: Grid, lo: np.ndarray
) -> np.ndarray | None:
    """Per lateral position l, the height (mm) below which tissue is neck, not face: the
    lower border of the mandible (lowest bone of its component in front of the posterior
    bound) minus BELOW_JAW_MM, extended sideways up to JAW_FILL_MM. Shape (1, nl). None
    when the mandible is not in the volume."""
    if lm.menton is None:
        return None
    mi = np.rint(grid.to_index(lm.menton)).astype(int)
    if np.any(mi < 0) or np.any(mi >= np.asarray(grid.shape)):
        return None
    lab, _ = ndimage.label(bone, structure=np.ones((3, 3, 3), bool))
    box = lab[tuple(slice(max(i - 3, 0), i + 4) for i in mi)]
    ids = box[box > 0]
    if ids.size == 0:
        return None
    top = int(np.ceil((JAW_TOP_MM - lo[0]) / WORK_MM))
    back = max(0, int((-POSTERIOR_MM - lo[1]) / WORK_MM))
    jaw = (lab[:top, back:] == np.bincount(ids).argmax()).any(axis=1)  # (s, l)
    has = jaw.any(axis=0)
    if not has.any():
        return None
    low = lo[0] + WORK_MM * np.argmax(jaw, axis=0).astype(np.float32) - BELOW_JAW_MM
    dist, (ii,) = ndimage.distance_transform_edt(~has, return_indices=True)
    low = low[ii]
    low[dist * WORK_MM > JAW_FILL_MM] = -1e3
    return low[None, :]


def _removal_plane(
    front: np.ndarray,
    peak: np.ndarray,
    bone: np.ndarray,
    s: np.ndarray,
    a: np.ndarray,
    lo: np.ndarray,
    chin: float,
) -> np.ndarray:
    """Anterior-axis position (mm) per height s of the plane in front of which facial bone
    goes with ``bone="remove"``: the front of the lateral orbital rims above the nose, the
    front of the teeth at the mouth, blended linearly in between."""
    sv = s[:, 0, 0]
    lv = lo[2] + WORK_MM * np.arange(front.shape[1])
    rows = (sv >= -15.0) & (sv <= 10.0)
    cols = (np.abs(lv) >= 35.0) & (np.abs(lv) <= 55.0)
    f = front[np.ix_(rows, cols)]
    f = f[f > -1e2]
    orbit = lo[1] + WORK_MM * float(np.median(f)) if f.size else 0.0
    av = a[0, :, 0]
    teeth_rows = (sv >= chin + 15.0) & (sv <= -40.0)
    mid = np.abs(lv) <= 25.0
    t = (peak >= TOOTH_HU) & bone
    t = t[np.ix_(teeth_rows, np.ones(len(av), bool), mid)]
    idx = np.argwhere(t)
    teeth = float(av[idx[:, 1]].max()) - 4.0 if len(idx) else orbit
    w = np.clip((sv - (-50.0)) / 15.0, 0.0, 1.0)  # 0 at the mouth, 1 above the nose base
    return (teeth + (orbit - teeth) * w)[:, None, None].astype(np.float32)


def _axis_weights(
    start: int, stop: int, factor: int, offset: int, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Linear-interpolation indices/weights from a block grid (block ``factor``, first block
    ``offset``, ``n`` blocks) to full-resolution indices ``start``…``stop``-1, plus the
    nearest block."""
    u = (np.arange(start, stop) - (factor - 1) / 2.0) / factor - offset
    u = np.clip(u, 0.0, n - 1.0)
    i0 = np.floor(u).astype(np.intp)
    i1 = np.minimum(i0 + 1, n - 1)
    w = (u - i0).astype(np.float32)
    return i0, i1, w, np.rint(u).astype(np.intp)


def upsample_mask(fields: FaceFields, hu: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Full-resolution boolean mask, refined with the full-resolution HU (bone is kept where
    ``keep_bone``; outside air is not part of the mask).

    Two stages keep this cheap: one trilinear resampling of the signed field onto the ~2 mm
    block grid of the source volume (same orientation as the source), then separable linear
    interpolation to full resolution, slab by slab.
    """
    mask = np.zeros(hu.shape, dtype=bool)
    near = np.argwhere(fields.inside > -WORK_MM)
    if len(near) == 0:
        return mask
    f = np.maximum(1, np.rint(WORK_MM / geometry.spacing)).astype(int)
    nblk = -(-np.asarray(hu.shape) // f)
    bl = geometry.affine.copy()
    bl[:3, :3] = geometry.affine[:3, :3] * f
    bl[:3, 3] = geometry.affine[:3, :3] @ ((f - 1) / 2.0) + geometry.affine[:3, 3]
    glo, ghi = near.min(0) - 1, near.max(0) + 1
    corners = np.array(
        [[x, y, z] for x in (glo[0], ghi[0]) for y in (glo[1], ghi[1]) for z in (glo[2], ghi[2])],
        dtype=float,
    )
    cidx = Grid(bl, tuple(nblk)).to_index(fields.grid.to_patient(corners))
    clo = np.clip(np.floor(cidx.min(0)).astype(int) - 1, 0, nblk)
    chi = np.clip(np.ceil(cidx.max(0)).astype(int) + 2, 0, nblk)
    if np.any(chi <= clo):
        return mask
    sub_aff = bl.copy()
    sub_aff[:3, 3] = bl[:3, :3] @ clo + bl[:3, 3]
    size = chi - clo
    sub = Grid(sub_aff, (int(size[0]), int(size[1]), int(size[2])))
    fc = resample(fields.inside, fields.grid, sub, order=1, cval=-_CLIP)
    kc = resample(fields.keep_bone.astype(np.float32), fields.grid, sub, order=0, cval=1.0) > 0.5
    lo = clo * f
    hi = np.minimum(chi * f, hu.shape)
    k0s, k1s, kws, kns = _axis_weights(lo[0], hi[0], f[0], clo[0], sub.shape[0])
    r0, r1, rw, rn = _axis_weights(lo[1], hi[1], f[1], clo[1], sub.shape[1])
    c0, c1, cw, cn = _axis_weights(lo[2], hi[2], f[2], clo[2], sub.shape[2])
    for s0 in range(0, len(k0s), _SLAB):
        sl = slice(s0, s0 + _SLAB)
        wk = kws[sl, None, None]
        a = fc[k0s[sl]] * (1 - wk) + fc[k1s[sl]] * wk
        if not (a > -WORK_MM).any():
            continue
        a = a[:, r0] * (1 - rw[None, :, None]) + a[:, r1] * rw[None, :, None]
        val = a[:, :, c0] * (1 - cw) + a[:, :, c1] * cw
        inside = val > 0
        if not inside.any():
            continue
        kb = kc[kns[sl]][:, rn][:, :, cn]
        k = lo[0] + s0
        h = hu[k : k + inside.shape[0], lo[1] : hi[1], lo[2] : hi[2]]
        inside &= h > AIR_HU
        inside &= ~((h >= BONE_HU) & kb)
        mask[k : k + inside.shape[0], lo[1] : hi[1], lo[2] : hi[2]] = inside
    return mask
