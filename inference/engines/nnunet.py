"""nnU-Net v2 facemask engine (e.g. the CTA-DEFACE weights), with ROI-cropped inference.

Load once, predict many: the model folder is opened by nnU-Net's own ``nnUNetPredictor``
(``initialize_from_trained_model_folder``) when the engine is built; every ``mask()`` call
then runs the in-process ``predict_single_npy_array`` path. nnU-Net's multiprocessing paths
(``predict_from_files`` etc.) spawn pools and cannot run inside a Celery prefork child.

Orientation. nnU-Net never reorients: the array must be fed in the axis order and direction
the model was trained on. nnU-Net's ``SimpleITKIO`` (and ``NibabelIO``) give arrays indexed
(k, j, i) of the NIfTI voxel grid, with the spacing reversed to match. CTA-DEFACE was
trained on NIfTI converted from DICOM (dcm2niix, which stores axial CT as "LAS": i towards
patient left, j towards anterior, k towards superior), so its arrays run
Superior, Anterior, Left — ``axes="SAL"``, the default. ``axes`` is any permutation of one
letter from each of L/R, A/P, S/I naming where each array axis points, or ``"native"`` to
feed the DICOM (slice, row, column) array as it is. The volume is permuted/flipped to the
nearest matching axes (no resampling; rotated heads stay rotated, as they were in training).

ROI. On a CPU a sliding window over a whole 512×512×300 CTA is dominated by the number of
patches, so the network runs only on crops around the face and the predictions are pasted back
into an all-background volume (``roi=False`` predicts the full volume). The crops cover the
anatomical engine's facemask (its landmark ``face_region`` when that engine fails, the full
volume when both do) with ``roi_margin_mm`` around every voxel: ``roi.plan_crops`` cuts the
bounding box into up to ``roi_max_crops`` boxes where that needs fewer tiles, since the face
is a curved shell. Each crop is then grown to the largest size that needs the same number of
sliding-window tiles: context at no extra tiles.

Post-processing: the largest connected component of the face label, then a small dilation
that may only grow into air, so the mask never eats more tissue than the network said.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
from scipy import ndimage

from inference.engines import FacemaskEngine
from inference.engines.roi import Region, box_mask, escaping_sides, grow, plan_crops
from inference.errors import FacemaskError, ModelError
from inference.geometry import Geometry, mask_extent
from inference.models import CHECKPOINT_NAME, ModelInfo, resolve_training_dir, validate_training_dir

log = logging.getLogger(__name__)

#: Localises the face for ROI mode: a boolean guide mask of what the crops must hold
#: (FacemaskError: not found, predict the full volume).
RoiFunction = Callable[[np.ndarray, Geometry], np.ndarray]

#: Unit vector in LPS of the direction each orientation letter points to.
_LETTER_VECTORS = {
    "L": np.array([1.0, 0.0, 0.0]),
    "R": np.array([-1.0, 0.0, 0.0]),
    "P": np.array([0.0, 1.0, 0.0]),
    "A": np.array([0.0, -1.0, 0.0]),
    "S": np.array([0.0, 0.0, 1.0]),
    "I": np.array([0.0, 0.0, -1.0]),
}


@dataclass(frozen=True)
class NnUNetOptions:
    """How the engine runs the model; defaults suit a CPU worker and CTA-DEFACE."""

    roi: bool = True
    #: Context around every voxel of the anatomical facemask, mm (before the free growth to
    #: the tile grid, which usually adds more).
    roi_margin_mm: float = 10.0
    #: Boxes the facemask may be split into when that needs fewer tiles (1: its bounding box).
    roi_max_crops: int = 16
    #: When the prediction leaves the crops through a side (not the volume border) the face
    #: may continue outside: grow that side by ``roi_grow_mm`` and predict again, at most
    #: ``roi_grow_rounds`` times, then fall back to the full volume. A wrong ROI costs
    #: time, never a face left in place.
    roi_grow_mm: float = 30.0
    roi_grow_rounds: int = 3
    axes: str = "SAL"
    #: Test-time mirroring (up to 8 network passes per patch). None: on with a GPU, off on CPU.
    tta: bool | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: CPU threads for torch; None = the cores this process may use. nnU-Net caps its own
    #: prediction at ``nnUNet_def_n_proc`` (default 8).
    threads: int | None = None
    tile_step_size: float = 0.5
    dilate_mm: float = 2.0
    #: Dilation grows the mask only into voxels at or below this HU (air).
    air_hu: float = -500.0
    fold: str = "all"
    checkpoint_name: str = CHECKPOINT_NAME
    face_label: str | None = None

    def __post_init__(self) -> None:
        _axes_vectors(self.axes)  # validate early
        if not 0.0 < self.tile_step_size <= 1.0:
            raise ValueError("tile_step_size must be in (0, 1]")
        if self.dilate_mm < 0 or self.roi_margin_mm < 0:
            raise ValueError("dilate_mm and roi_margin_mm must be >= 0")
        if self.roi_max_crops < 1:
            raise ValueError("roi_max_crops must be >= 1")


def _axes_vectors(axes: str) -> list[np.ndarray] | None:
    if axes == "native":
        return None
    code = axes.upper()
    pairs = ({"L", "R"}, {"A", "P"}, {"S", "I"})
    if len(code) != 3 or any(sum(c in p for c in code) != 1 for p in pairs):
        raise ValueError(
            f"axes must be 'native' or one letter of each of L/R, A/P, S/I (e.g. 'SAL'), "
            f"got {axes!r}"
        )
    return [_LETTER_VECTORS[c] for c in code]


@dataclass(frozen=True)
class _Reorientation:
    """Our (k, r, c) array → the model's array: transpose by ``perm`` then flip ``flips``."""

    perm: tuple[int, int, int]
    flips: tuple[bool, bool, bool]

    def forward(self, a: np.ndarray) -> np.ndarray:
        out = a.transpose(self.perm)
        for axis, flip in enumerate(self.flips):
            if flip:
                out = np.flip(out, axis)
        return out

    def backward(self, a: np.ndarray) -> np.ndarray:
        for axis, flip in enumerate(self.flips):
            if flip:
                a = np.flip(a, axis)
        return a.transpose(np.argsort(self.perm))


def reorientation(geometry: Geometry, axes: str) -> _Reorientation:
    """Permutation and flips bringing (k, r, c) closest to the model's ``axes`` directions."""
    targets = _axes_vectors(axes)
    if targets is None:
        return _Reorientation((0, 1, 2), (False, False, False))
    cos = np.array([[geometry.direction[:, s] @ t for s in range(3)] for t in targets])
    best = max(
        itertools.permutations(range(3)),
        key=lambda p: sum(abs(cos[t, p[t]]) for t in range(3)),
    )
    perm = (int(best[0]), int(best[1]), int(best[2]))
    flips = (bool(cos[0, perm[0]] < 0), bool(cos[1, perm[1]] < 0), bool(cos[2, perm[2]] < 0))
    return _Reorientation(perm, flips)


def physical_spacing(geometry: Geometry) -> np.ndarray:
    """Spacing of (k, r, c) in mm, with the slice spacing measured along the normal."""
    spacing = geometry.spacing.copy()
    spacing[0] = geometry.slice_spacing
    return spacing


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class NnUNetEngine:
    """Facemask from a trained nnU-Net v2 model; build once per process."""

    name = "nnunet"

    def __init__(
        self,
        model_dir: Path | str,
        options: NnUNetOptions | None = None,
        *,
        roi_fn: RoiFunction | None = None,
    ) -> None:
        """Validate and load the model folder (training, dataset or results folder).

        ``roi_fn`` localises the face for ROI mode (a FacemaskError from it means: predict
        the full volume); by default ``anatomical_guide``.
        """
        self.options = options or NnUNetOptions()
        opts = self.options
        training_dir = resolve_training_dir(Path(model_dir))
        self.info: ModelInfo = validate_training_dir(
            training_dir,
            fold=opts.fold,
            checkpoint_name=opts.checkpoint_name,
            face_label=opts.face_label,
            load_checkpoint=False,  # the predictor below loads it; its failure is reported
        )
        self._roi_fn = roi_fn

        # nnU-Net prints (env warnings at import, device notes): keep it out of stdout.
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink):
            import torch
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

            use_cuda = opts.device == "cuda" or (
                opts.device == "auto" and torch.cuda.is_available()
            )
            if opts.device == "cuda" and not torch.cuda.is_available():
                raise ModelError("device 'cuda' requested but torch sees no GPU")
            device = torch.device("cuda" if use_cuda else "cpu")
            if not use_cuda:
                torch.set_num_threads(opts.threads or _usable_cpus())
            tta = opts.tta if opts.tta is not None else use_cuda
            predictor = nnUNetPredictor(
                tile_step_size=opts.tile_step_size,
                use_gaussian=True,
                use_mirroring=tta,
                perform_everything_on_device=use_cuda,
                device=device,
                verbose=False,
                verbose_preprocessing=False,
                allow_tqdm=False,
            )
            try:
                predictor.initialize_from_trained_model_folder(
                    str(self.info.training_dir),
                    use_folds=(opts.fold,),
                    checkpoint_name=opts.checkpoint_name,
                )
            except Exception as exc:  # nnU-Net raises bare KeyError/RuntimeError/pickle errors
                raise ModelError(
                    f"nnU-Net could not load model {self.info.name}: {type(exc).__name__}: {exc}"
                ) from None
        for line in sink.getvalue().splitlines():
            if line.strip():
                log.debug("nnunetv2: %s", line)
        self._predictor = predictor
        self.device = device.type
        self.tta = tta
        log.info(
            "nnU-Net model %s loaded (%s, device=%s, tta=%s, axes=%s)",
            self.info.name,
            self.info.configuration,
            self.device,
            tta,
            opts.axes,
        )

    # -- public API ---------------------------------------------------------------------------

    def mask(self, hu: np.ndarray, geometry: Geometry) -> np.ndarray:
        """Facemask (bool, ``hu.shape``): network prediction + post-processing.

        Raises FacemaskError when the network finds no face (fail closed).
        """
        face, _ = self.predict_face(hu, geometry)
        return postprocess(
            face,
            hu,
            physical_spacing(geometry),
            dilate_mm=self.options.dilate_mm,
            air_hu=self.options.air_hu,
        )

    def predict_face(
        self, hu: np.ndarray, geometry: Geometry
    ) -> tuple[np.ndarray, list[Region] | None]:
        """Raw face prediction and the crops it came from (None: the full volume).

        In ROI mode a crop grows while the prediction leaves the covered volume through one
        of its sides. Only grown crops are predicted again: the sliding-window tiles move
        with the crop, so its previous logits cannot be reused exactly, and with crops
        around the anatomical facemask a round is the exception.
        """
        if not self.options.roi:
            return self.predict(hu, geometry), None
        crops = self.crops(hu, geometry)
        if crops is None:
            return self.predict(hu, geometry), None
        grow_vox = self.options.roi_grow_mm / physical_spacing(geometry)
        seen: dict[tuple[int, ...], np.ndarray] = {}
        for _ in range(self.options.roi_grow_rounds + 1):
            face = self.predict_crops(hu, geometry, crops, seen)
            escapes = escaping_sides(face, crops)
            if not escapes:
                return face, crops
            log.info("face prediction leaves the crops through %d sides: growing", len(escapes))
            crops = _unique(
                self.fit_tile_grid(
                    grow(r, [(a, d) for c, a, d in escapes if c == i], grow_vox, hu.shape),
                    geometry,
                )
                if any(c == i for c, _, _ in escapes)
                else r
                for i, r in enumerate(crops)
            )
        log.warning("face still leaves the crops: predicting the full volume")
        return self.predict(hu, geometry), None

    def crops(self, hu: np.ndarray, geometry: Geometry) -> list[Region] | None:
        """The crops the network runs on: ``plan_crops`` over the face guide, each fitted to
        the tile grid (``fit_tile_grid``).

        None when the face cannot be localised: the full volume is predicted then, because a
        wrong ROI may cost time but never a face left in place.
        """
        localise = self._roi_fn or anatomical_guide
        try:
            guide = localise(hu, geometry)
            planned = plan_crops(
                guide,
                physical_spacing(geometry),
                self.options.roi_margin_mm,
                self.tile_cost(geometry),
                max_crops=self.options.roi_max_crops,
            )
        except FacemaskError as exc:
            log.warning("ROI: face not localised (%s): predicting the full volume", exc)
            return None
        crops = _unique(self.fit_tile_grid(r, geometry) for r in planned)
        cost = self.tile_cost(geometry)
        log.info(
            "ROI: %d crops, %d tiles (full volume: %d)",
            len(crops),
            sum(cost(_shape(r)) for r in crops),
            cost(geometry.shape),
        )
        return crops

    def predict_crops(
        self,
        hu: np.ndarray,
        geometry: Geometry,
        crops: list[Region],
        seen: dict[tuple[int, ...], np.ndarray] | None = None,
    ) -> np.ndarray:
        """Union of the network's face label on each crop (bool, ``hu.shape``); False
        outside them. ``seen`` keeps each crop's prediction so a growth round only predicts
        the crops that changed."""
        seen = {} if seen is None else seen
        face = np.zeros(hu.shape, dtype=bool)
        for r in crops:
            key = _key(r)
            if key not in seen:
                seen[key] = self.predict_crop(hu, geometry, r)
            face[r] |= seen[key]
        return face

    def tile_cost(self, geometry: Geometry) -> Callable[[tuple[int, int, int]], int]:
        """Sliding-window tiles of a crop of a given shape (voxels of ours), for planning."""
        grid = self._axis_grid(geometry)
        step = self.options.tile_step_size
        return lambda shape: int(np.prod(_tiles_per_axis(shape, grid, step)))

    def tiles(self, shape: tuple[int, ...], geometry: Geometry) -> tuple[int, int, int]:
        """Sliding-window tiles nnU-Net runs per axis of ours on a crop of ``shape``."""
        t = _tiles_per_axis(shape, self._axis_grid(geometry), self.options.tile_step_size)
        return t[0], t[1], t[2]

    def fit_tile_grid(self, roi: Region, geometry: Geometry) -> Region:
        """Grow ``roi`` (centred, inside the volume) to the largest size that needs the same
        number of sliding-window tiles along each axis: extra context at no extra network
        passes. This also grows it to at least one patch."""
        step = self.options.tile_step_size
        out = []
        for axis, (sl, (scale, patch)) in enumerate(
            zip(roi, self._axis_grid(geometry), strict=True)
        ):
            size = geometry.shape[axis]
            start, stop, _ = sl.indices(size)
            if stop <= start:
                raise FacemaskError("face region is empty")
            want = min(size, _largest_same_tiles(stop - start, scale, patch, step))
            extra = want - (stop - start)
            start = max(0, start - extra // 2)
            stop = min(size, start + want)
            start = max(0, stop - want)
            out.append(slice(start, stop))
        return out[0], out[1], out[2]

    def predict(
        self, hu: np.ndarray, geometry: Geometry, region: Region | None = None
    ) -> np.ndarray:
        """Raw face label of the network (bool, ``hu.shape``), on ``region`` or everything.

        Outside ``region`` the result is False.
        """
        if region is None:
            return self.predict_crop(hu, geometry, None)
        out = np.zeros(hu.shape, dtype=bool)
        out[region] = self.predict_crop(hu, geometry, region)
        return out

    def predict_crop(self, hu: np.ndarray, geometry: Geometry, region: Region | None) -> np.ndarray:
        """Raw face label of the network on ``hu[region]`` (bool, the crop's shape)."""
        if hu.ndim != 3 or hu.shape != geometry.shape:
            raise ValueError(f"volume shape {hu.shape} does not match geometry {geometry.shape}")
        crop = hu if region is None else hu[region]
        if min(crop.shape) < 1:
            raise FacemaskError("face region is empty")
        image, properties = self.model_input(crop, geometry)
        seg = self.run_network(image, properties)
        reo = reorientation(geometry, self.options.axes)
        return np.ascontiguousarray(reo.backward(seg == self.info.face_label))

    def run_network(self, image: np.ndarray, properties: dict[str, Any]) -> np.ndarray:
        """Label array of ``image``'s grid via nnU-Net's in-process path: preprocessing,
        sliding window, export (a seam for the benchmark, which times the three apart)."""
        seg = self._predictor.predict_single_npy_array(image, properties, None, None, False)
        return np.asarray(seg)

    def model_input(
        self, crop: np.ndarray, geometry: Geometry
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """What nnU-Net is given: a (1, *model axes) float32 array and a fresh properties dict
        whose spacing is in the same axis order (nnU-Net writes bookkeeping into the dict)."""
        reo = reorientation(geometry, self.options.axes)
        image = np.ascontiguousarray(reo.forward(crop), dtype=np.float32)[None]
        spacing = physical_spacing(geometry)
        return image, {"spacing": [float(spacing[a]) for a in reo.perm]}

    # -- helpers --------------------------------------------------------------------------------

    def _axis_grid(self, geometry: Geometry) -> list[tuple[float, int]]:
        """Per axis of ours: (model voxels per voxel of ours, patch size in model voxels).

        Undoes the reorientation and nnU-Net's ``transpose_forward``: patch and target
        spacing are stored in the transposed order.
        """
        reo = reorientation(geometry, self.options.axes)
        spacing = physical_spacing(geometry)
        tf = list(self.info.transpose_forward)
        patch, target = np.empty(3, int), np.empty(3)
        patch[tf] = self.info.patch_size
        target[tf] = self.info.spacing
        grid: list[tuple[float, int]] = [(1.0, 1)] * 3
        for model_axis, our_axis in enumerate(reo.perm):
            scale = float(spacing[our_axis]) / float(target[model_axis])
            grid[our_axis] = (scale, int(patch[model_axis]))
        return grid


def _model_size(n: int, scale: float) -> int:
    """Voxels after nnU-Net's resampling (``compute_new_shape``: round(old / new · n))."""
    return round(scale * n)


def _tiles_per_axis(
    shape: tuple[int, ...], grid: list[tuple[float, int]], step: float
) -> list[int]:
    return [
        _tiles(_model_size(n, scale), patch, step)
        for n, (scale, patch) in zip(shape, grid, strict=True)
    ]


def _tiles(size: int, patch: int, step: float) -> int:
    """Tiles along one axis (nnU-Net's ``compute_steps_for_sliding_window``; smaller
    inputs are padded to one patch)."""
    if size <= patch:
        return 1
    return int(np.ceil((size - patch) / (patch * step))) + 1


def _largest_same_tiles(n: int, scale: float, patch: int, step: float) -> int:
    """Largest crop size (voxels of ours) ≥ ``n`` with no more tiles than ``n`` needs: in
    model voxels patch + (tiles − 1) · patch · step."""
    tiles = _tiles(_model_size(n, scale), patch, step)
    best = int(np.floor((patch + (tiles - 1) * patch * step + 0.5) / scale)) + 1
    while best > n and _tiles(_model_size(best, scale), patch, step) > tiles:
        best -= 1
    return max(best, n)


def _key(region: Region) -> tuple[int, ...]:
    """A hashable stand-in for a region (slices are not hashable before Python 3.12)."""
    return tuple(v for sl in region for v in (sl.start, sl.stop))


def _unique(regions: Iterable[Region]) -> list[Region]:
    """Regions in order, without repeats (fitted crops can coincide)."""
    out: dict[tuple[int, ...], Region] = {}
    for r in regions:
        out.setdefault(_key(r), r)
    return list(out.values())


def _shape(region: Region) -> tuple[int, int, int]:
    a, b, c = (sl.stop - sl.start for sl in region)
    return a, b, c


def anatomical_guide(
    hu: np.ndarray, geometry: Geometry, engine: FacemaskEngine | None = None
) -> np.ndarray:
    """Where the face is, for the crops: the anatomical engine's facemask (a shell ~3 % of a
    head-and-neck volume); when that engine fails or finds nothing, its landmark
    ``face_region`` box (~40 %). FacemaskError when neither finds the face. ``engine``
    replaces the default anatomical engine (tests)."""
    from inference.engines.anatomical import AnatomicalEngine, face_region

    try:
        mask = (engine or AnatomicalEngine()).mask(hu, geometry)
        if mask.any():
            return mask
        log.warning("ROI: anatomical facemask is empty: using the landmark face region")
    except FacemaskError as exc:
        log.warning("ROI: anatomical facemask failed (%s): using the landmark face region", exc)
    return box_mask(hu.shape, face_region(hu, geometry, margin_mm=0.0))


def _ellipsoid(radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    radii = np.maximum(np.floor(radius_mm / spacing), 0).astype(int)
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in radii)]
    dist = sum((g * s / max(radius_mm, 1e-6)) ** 2 for g, s in zip(grids, spacing, strict=True))
    return np.asarray(dist <= 1.0)


def postprocess(
    face: np.ndarray,
    hu: np.ndarray,
    spacing: np.ndarray,
    *,
    dilate_mm: float = 2.0,
    air_hu: float = -500.0,
) -> np.ndarray:
    """Largest connected component, then dilation by ``dilate_mm`` into air only.

    Works on the bounding box of the prediction so a small face in a big volume stays cheap.
    """
    if face.shape != hu.shape:
        raise ValueError(f"mask shape {face.shape} != volume shape {hu.shape}")
    if not face.any():
        raise FacemaskError("the nnU-Net model found no face voxels")
    struct = _ellipsoid(dilate_mm, np.asarray(spacing, float)) if dilate_mm > 0 else None
    pad = np.array(struct.shape) // 2 if struct is not None else np.zeros(3, int)
    first, stop = cast(tuple[np.ndarray, np.ndarray], mask_extent(face))  # face.any() above
    lo = np.maximum(first - pad, 0)
    hi = np.minimum(stop + pad, face.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    labels, n = ndimage.label(face[box])
    if n > 1:
        counts = np.bincount(labels.ravel())
        counts[0] = 0
        keep = labels == int(np.argmax(counts))
    else:
        keep = labels > 0
    if struct is not None and struct.size > 1:
        grown = ndimage.binary_dilation(keep, structure=struct)
        keep |= grown & (hu[box] <= air_hu)
    out = np.zeros(face.shape, dtype=bool)
    out[box] = keep
    return out
