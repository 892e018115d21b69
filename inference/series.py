"""DICOM instances → validated CT volumes (HU, geometry, slice ↔ instance mapping).

Why not SimpleITK's series reader: it silently resamples a gantry-tilted series onto an
axis-aligned grid and only warns on missing slices. Here the geometry is derived from
ImagePositionPatient / ImageOrientationPatient (PS3.3 C.7.6.2) or, for Enhanced CT, from the
per-frame functional groups (PS3.3 C.7.6.16), checked, and kept exactly: column 0 of the
affine is the slice-to-slice step vector, not the normal. Each volume slice remembers which
instance (and frame) it came from so the defaced voxels go back to the right place.

Pure functions over pydicom datasets, plus :func:`load_datasets`, a thin file loader.
Error messages name files by position ("file #3 of 120") and series by index, never by
file name or header content: hospital exports often put patient names in file names.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    LegacyConvertedEnhancedCTImageStorage,
    MediaStorageDirectoryStorage,
    RLELossless,
)

from inference.errors import GeometryError, NotCTError, SeriesError, UnreadableFileError
from inference.geometry import Geometry
from inference.replace import AIR_HU

log = logging.getLogger(__name__)

CT_SOP_CLASSES = frozenset(
    {CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage}
)
#: Compressed transfer syntaxes that are lossless by definition (PS3.5 Section 8.2).
LOSSLESS_SYNTAXES = frozenset(
    {
        JPEGLossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEG2000Lossless,
        HTJ2KLossless,
        HTJ2KLosslessRPCL,
        RLELossless,
    }
)
#: Files with these extensions, found while scanning a directory, are not DICOM candidates.
NON_DICOM_EXTENSIONS = frozenset(
    {
        ".json",
        ".nii",
        ".nii.gz",
        ".gz",
        ".npz",
        ".npy",
        ".txt",
        ".md",
        ".csv",
        ".tsv",
        ".xml",
        ".html",
        ".pdf",
        ".png",
        ".jpg",
        ".jpeg",
        ".zip",
        ".log",
        ".yaml",
        ".yml",
        ".ini",
    }
)
#: Orientation cosines closer than this are "the same orientation".
ORIENTATION_TOLERANCE = 1e-3
#: Slices whose positions along the normal differ by less than this (mm) are duplicates.
DUPLICATE_TOLERANCE_MM = 0.01
#: A step longer than this × the median step is a missing slice.
GAP_FACTOR = 1.5


@dataclass(frozen=True)
class SliceRef:
    """Where volume slice k comes from: ``datasets[dataset]`` (frame ``frame`` if multi-frame)."""

    dataset: int
    frame: int | None
    slope: float
    intercept: float


@dataclass
class SeriesVolume:
    """One CT series as a volume. ``hu[k]`` comes from ``slices[k]``."""

    hu: np.ndarray
    geometry: Geometry
    series_uid: str
    datasets: list[Dataset]
    slices: list[SliceRef]
    #: Stored values treated as padding (PixelPaddingValue [.. PixelPaddingRangeLimit]).
    padding: tuple[int, int] | None = None
    padding_voxels: int = 0
    #: Some instance was lossy-compressed (JPEG baseline/extended, lossy J2K, ...).
    lossy: bool = False
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Frame:
    dataset: int
    frame: int | None
    position: np.ndarray
    orientation: np.ndarray
    spacing: tuple[float, float]
    matrix: tuple[int, int]
    slope: float
    intercept: float


# ---------------------------------------------------------------------------------- loading


def load_datasets(paths: Sequence[Path | str]) -> list[Dataset]:
    """Read every file of ``paths`` (directories recursively), in sorted path order.

    DICOMDIR files are skipped, and so are files found in a directory whose extension marks
    them as something else (``.json``, ``.nii.gz``, ``.txt``, ... — e.g. a phantom's ground
    truth next to its series). Any other file that is not readable DICOM raises
    :class:`UnreadableFileError` naming the file by position, never by name.
    """
    files: list[Path] = []
    skipped: Counter[str] = Counter()
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(f for f in p.rglob("*") if f.is_file()):
                ext = "".join(f.suffixes[-2:]).lower() if f.suffixes else ""
                if ext in NON_DICOM_EXTENSIONS or f.suffix.lower() in NON_DICOM_EXTENSIONS:
                    skipped[f.suffix.lower()] += 1
                else:
                    files.append(f)
        elif p.is_file():
            files.append(p)
        else:
            raise UnreadableFileError(f"input #{len(files) + 1} does not exist")
    if skipped:
        log.warning("skipped non-DICOM files: %s", dict(skipped))
    out: list[Dataset] = []
    for i, f in enumerate(files, start=1):
        where = f"file #{i} of {len(files)}"
        try:
            ds = pydicom.dcmread(f)
        except Exception as exc:  # any parse failure: the message could quote the content
            raise UnreadableFileError(
                f"{where} is not a readable DICOM file ({type(exc).__name__})"
            ) from None
        meta = getattr(ds, "file_meta", None)
        if meta is not None and meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage:
            continue
        if "SOPInstanceUID" not in ds or "SeriesInstanceUID" not in ds:
            raise UnreadableFileError(f"{where} is not a DICOM instance (no SOP/Series UID)")
        out.append(ds)
    if not out:
        raise UnreadableFileError("no DICOM instances in the input")
    return out


# ------------------------------------------------------------------------------- assembling


def group_by_series(datasets: Sequence[Dataset]) -> list[list[Dataset]]:
    """Group by SeriesInstanceUID in order of first appearance; repeated SOP instances drop."""
    groups: dict[str, list[Dataset]] = {}
    seen: set[str] = set()
    for ds in datasets:
        sop = str(ds.SOPInstanceUID)
        if sop in seen:
            continue  # the same instance received twice is not a duplicate slice
        seen.add(sop)
        groups.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    return list(groups.values())


def assemble(
    datasets: Sequence[Dataset], *, min_slices: int = 20, allow_gaps: bool = False
) -> list[SeriesVolume]:
    """One validated volume per series of ``datasets``; the first invalid series raises."""
    groups = group_by_series(datasets)
    return [
        assemble_series(
            g,
            min_slices=min_slices,
            allow_gaps=allow_gaps,
            label=f"series #{i} of {len(groups)}",
        )
        for i, g in enumerate(groups, start=1)
    ]


def assemble_series(
    datasets: Sequence[Dataset],
    *,
    min_slices: int = 20,
    allow_gaps: bool = False,
    label: str = "series",
) -> SeriesVolume:
    """Validate the instances of one series and build its HU volume."""
    warnings: list[str] = []
    for ds in datasets:
        modality = str(ds.get("Modality", ""))
        if modality != "CT":
            raise NotCTError(f"{label}: modality is {modality or 'missing'}, not CT")
        if str(ds.get("SOPClassUID", "")) not in CT_SOP_CLASSES:
            raise NotCTError(f"{label}: SOP class is not a CT image storage class")
        meta = getattr(ds, "file_meta", None)
        if meta is not None and meta.get("TransferSyntaxUID") == ExplicitVRBigEndian:
            # Retired (PS3.5 A.3); its other binary elements cannot be re-encoded faithfully.
            raise SeriesError(
                f"{label}: Explicit VR Big Endian (retired) is not supported; "
                "convert the files first (dcmconv +te)"
            )
    kept = [ds for ds in datasets if not _is_localizer(ds)]
    if len(kept) < len(datasets):
        warnings.append(f"dropped {len(datasets) - len(kept)} localizer image(s)")
    frames = [f for i, ds in enumerate(kept) for f in _frames(ds, i, label)]
    frames, dropped = _majority_orientation(frames, label)
    if dropped:
        warnings.append(f"dropped {dropped} localizer slice(s) with a different orientation")
    if len(frames) < min_slices:
        raise GeometryError(f"{label}: {len(frames)} slices, fewer than the minimum {min_slices}")
    if len({f.matrix for f in frames}) > 1:
        raise GeometryError(f"{label}: mixed matrix sizes {sorted({f.matrix for f in frames})}")
    spacings = np.array([f.spacing for f in frames])
    if np.ptp(spacings, axis=0).max() > 1e-3 * spacings.max():
        raise GeometryError(f"{label}: mixed pixel spacings within the series")

    geometry, frames, geo_warnings = _geometry(frames, allow_gaps=allow_gaps, label=label)
    warnings.extend(geo_warnings)
    used = sorted({f.dataset for f in frames})
    remap = {old: new for new, old in enumerate(used)}
    series_datasets = [kept[i] for i in used]
    slices = [SliceRef(remap[f.dataset], f.frame, f.slope, f.intercept) for f in frames]

    hu, padding, n_pad, lossy = _decode(series_datasets, slices, geometry.shape, label)
    if lossy:
        warnings.append("input is lossy-compressed; output is written uncompressed")
    for w in warnings:
        log.warning("%s: %s", label, w)
    return SeriesVolume(
        hu=hu,
        geometry=geometry,
        series_uid=str(series_datasets[0].SeriesInstanceUID),
        datasets=series_datasets,
        slices=slices,
        padding=padding,
        padding_voxels=n_pad,
        lossy=lossy,
        warnings=warnings,
    )


def _is_localizer(ds: Dataset) -> bool:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return "LOCALIZER" in image_type


def _functional_group(ds: Dataset, frame: int, name: str, label: str) -> Dataset:
    """Item of functional group ``name`` for ``frame``: per-frame first, then shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame) and name in per_frame[frame]:
        return per_frame[frame][name][0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and name in shared[0]:
        return shared[0][name][0]
    raise GeometryError(f"{label}: multi-frame instance lacks {name} for frame {frame + 1}")


def _frames(ds: Dataset, index: int, label: str) -> list[_Frame]:
    """Geometry and rescale of every frame of ``ds`` (one for a single-frame instance)."""
    if "PixelData" not in ds:
        raise UnreadableFileError(f"{label}: instance #{index + 1} has no pixel data")
    if int(ds.get("SamplesPerPixel", 1)) != 1 or not str(
        ds.get("PhotometricInterpretation", "MONOCHROME2")
    ).startswith("MONOCHROME"):
        raise SeriesError(f"{label}: instance #{index + 1} is not a greyscale image")
    matrix = (int(ds.Rows), int(ds.Columns))
    try:
        if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
            out = []
            for k in range(int(ds.get("NumberOfFrames", 1))):
                pos = _functional_group(ds, k, "PlanePositionSequence", label)
                ori = _functional_group(ds, k, "PlaneOrientationSequence", label)
                meas = _functional_group(ds, k, "PixelMeasuresSequence", label)
                try:
                    pvt = _functional_group(ds, k, "PixelValueTransformationSequence", label)
                except GeometryError:
                    pvt = ds  # Legacy Converted objects may keep rescale at the top level
                slope, intercept = _rescale(pvt)
                out.append(
                    _Frame(
                        index,
                        k,
                        np.asarray(pos.ImagePositionPatient, float),
                        np.asarray(ori.ImageOrientationPatient, float),
                        (float(meas.PixelSpacing[0]), float(meas.PixelSpacing[1])),
                        matrix,
                        slope,
                        intercept,
                    )
                )
            return out
        slope, intercept = _rescale(ds)
        return [
            _Frame(
                index,
                None,
                np.asarray(ds.ImagePositionPatient, float),
                np.asarray(ds.ImageOrientationPatient, float),
                (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
                matrix,
                slope,
                intercept,
            )
        ]
    except (AttributeError, KeyError, IndexError, ValueError, TypeError) as exc:
        raise GeometryError(
            f"{label}: instance #{index + 1} lacks valid plane position/orientation/spacing "
            f"({type(exc).__name__})"
        ) from None


def _rescale(item: Dataset) -> tuple[float, float]:
    slope = float(item.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(item.get("RescaleIntercept", 0.0) or 0.0)
    return slope, intercept


def _orientation_key(f: _Frame) -> tuple[float, ...]:
    return tuple(np.round(f.orientation / (10 * ORIENTATION_TOLERANCE)).astype(int).tolist())


def _majority_orientation(frames: list[_Frame], label: str) -> tuple[list[_Frame], int]:
    """Keep the majority orientation; drop small minorities as scouts, else reject."""
    if not frames:
        return frames, 0
    counts = Counter(_orientation_key(f) for f in frames)
    majority_key = counts.most_common(1)[0][0]
    majority = next(f.orientation for f in frames if _orientation_key(f) == majority_key)
    same = [f for f in frames if np.abs(f.orientation - majority).max() < ORIENTATION_TOLERANCE]
    other = len(frames) - len(same)
    # A scout is a handful of images; more than that is a second acquisition plane.
    if other > max(3, len(frames) // 20):
        raise GeometryError(f"{label}: mixed image orientations within the series")
    return same, other


def _geometry(
    frames: list[_Frame], *, allow_gaps: bool, label: str
) -> tuple[Geometry, list[_Frame], list[str]]:
    """Sort frames along the slice normal, check spacing, and build the Geometry."""
    warnings: list[str] = []
    if len(frames) < 2:
        raise GeometryError(f"{label}: {len(frames)} slice(s): a volume needs at least 2")
    iop = frames[0].orientation
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    if abs(np.linalg.norm(normal) - 1.0) > 1e-2 or abs(row_dir @ col_dir) > 1e-2:
        raise GeometryError(f"{label}: ImageOrientationPatient is not orthonormal")
    normal = normal / np.linalg.norm(normal)
    proj = np.array([f.position @ normal for f in frames])
    order = np.argsort(proj, kind="stable")
    frames = [frames[i] for i in order]
    proj = proj[order]
    steps = np.diff(proj)
    if steps.min() < DUPLICATE_TOLERANCE_MM:
        n_dup = int((steps < DUPLICATE_TOLERANCE_MM).sum())
        raise GeometryError(f"{label}: {n_dup} duplicated slice position(s)")
    median = float(np.median(steps))
    gaps = steps > GAP_FACTOR * median
    if gaps.any():
        msg = (
            f"{gaps.sum()} gap(s) in the slice positions (largest {steps.max():.2f} mm, "
            f"median spacing {median:.2f} mm)"
        )
        if not allow_gaps:
            raise GeometryError(f"{label}: missing slices: {msg}")
        warnings.append(msg)
    positions = np.array([f.position for f in frames])
    step = (positions[-1] - positions[0]) / (len(frames) - 1)
    # Positions must lie on one line (tilted or not); otherwise no affine describes them.
    unit = step / np.linalg.norm(step)
    rel = positions - positions[0]
    off_line = np.linalg.norm(rel - np.outer(rel @ unit, unit), axis=1).max()
    if off_line > 0.5 * min(frames[0].spacing):
        raise GeometryError(f"{label}: slice positions do not lie on one line")
    irregular = bool(np.abs(steps - median).max() > 0.01 * median + 1e-3)
    if irregular and not gaps.any():
        warnings.append(
            f"irregular slice spacing ({steps.min():.3f}-{steps.max():.3f} mm); "
            "per-slice positions kept"
        )
    rows, cols = frames[0].matrix
    geometry = Geometry.from_dicom(
        image_position=positions[0],
        image_orientation=iop,
        pixel_spacing=frames[0].spacing,
        slice_step=step,
        shape=(len(frames), rows, cols),
        slice_origins=positions if irregular else None,
    )
    return geometry, frames, warnings


def padding_range(ds: Dataset) -> tuple[int, int] | None:
    """Stored values that mean "no data" (PS3.3 C.7.5.1.1.2), or None."""
    if "PixelPaddingValue" not in ds:
        return None
    value = _as_int(ds["PixelPaddingValue"].value, ds)
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is None:
        return value, value
    limit = _as_int(limit, ds)
    return min(value, limit), max(value, limit)


def _as_int(value: object, ds: Dataset) -> int:
    """US/SS-ambiguous values may still be raw bytes; decode per PixelRepresentation."""
    if isinstance(value, bytes):
        dtype = "<i2" if int(ds.get("PixelRepresentation", 0)) else "<u2"
        return int(np.frombuffer(value[:2], dtype=dtype)[0])
    return int(value)  # type: ignore[call-overload]


def stored_frames(ds: Dataset) -> np.ndarray:
    """Stored pixel values of ``ds`` as (frames, rows, cols), whatever the transfer syntax."""
    arr = ds.pixel_array
    return arr.reshape((-1, int(ds.Rows), int(ds.Columns)))


def is_lossy(ds: Dataset) -> bool:
    """Whether this instance's pixels have been lossy-compressed, now or before.

    JPEG 2000 (.91) may be either; it counts as lossy unless LossyImageCompression is "00".
    """
    if str(ds.get("LossyImageCompression", "")) == "01":
        return True
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is None or not ts.is_compressed or ts in LOSSLESS_SYNTAXES:
        return False
    if ts == JPEG2000:
        return str(ds.get("LossyImageCompression", "")) != "00"
    return True


def _decode(
    datasets: list[Dataset], slices: list[SliceRef], shape: tuple[int, int, int], label: str
) -> tuple[np.ndarray, tuple[int, int] | None, int, bool]:
    hu = np.empty(shape, dtype=np.float32)
    where: dict[int, list[tuple[int, int]]] = {}
    for k, ref in enumerate(slices):
        where.setdefault(ref.dataset, []).append((k, ref.frame or 0))
    padding: tuple[int, int] | None = None
    n_pad = 0
    lossy = False
    for d, ds in enumerate(datasets):
        try:
            stored = stored_frames(ds)
        except Exception as exc:  # missing decoder, corrupt codestream, truncated data
            raise UnreadableFileError(
                f"{label}: pixel data of instance #{d + 1} cannot be decoded ({type(exc).__name__})"
            ) from None
        lossy = lossy or is_lossy(ds)
        pad = padding_range(ds)
        padding = padding or pad
        for k, frame in where[d]:
            if frame >= stored.shape[0]:
                raise GeometryError(f"{label}: instance #{d + 1} has fewer frames than declared")
            ref = slices[k]
            values = stored[frame]
            hu[k] = values.astype(np.float32) * np.float32(ref.slope) + np.float32(ref.intercept)
            if pad is not None:
                is_pad = (values >= pad[0]) & (values <= pad[1])
                n_pad += int(is_pad.sum())
                hu[k][is_pad] = AIR_HU
    return hu, padding, n_pad, lossy
