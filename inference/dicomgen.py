"""Build CT Image Storage datasets from a HU volume and its geometry.

Used by the phantom generator and the tests; the gateway never creates images. The header
template is copied into every instance (so planted test PHI ends up everywhere).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from inference.geometry import Geometry


def stored_range(bits_stored: int, pixel_representation: int) -> tuple[int, int]:
    """Smallest and largest stored value (PS3.5 8.1.1)."""
    if pixel_representation:
        return -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    return 0, (1 << bits_stored) - 1


def hu_to_stored(
    hu: np.ndarray, slope: float, intercept: float, bits_stored: int, pixel_representation: int
) -> np.ndarray:
    """HU → stored integers, rounded and clipped to the stored range."""
    lo, hi = stored_range(bits_stored, pixel_representation)
    values = np.rint((np.asarray(hu, dtype=np.float64) - intercept) / slope)
    dtype = np.int16 if pixel_representation else np.uint16
    return np.clip(values, lo, hi).astype(dtype)


def _type2_defaults(ds: Dataset) -> None:
    """Attributes the CT IODs require (PS3.3 A.3, A.38) unless the header template has them."""
    ds.setdefault("SeriesNumber", 1)
    ds.setdefault("AcquisitionNumber", 1)
    ds.setdefault("PatientPosition", "HFS")
    ds.setdefault("PositionReferenceIndicator", "")


def make_ct_series(
    hu: np.ndarray,
    geometry: Geometry,
    *,
    header: Dataset | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    rescale_slope: float = 1.0,
    rescale_intercept: float = -1024.0,
    bits_stored: int = 12,
    pixel_representation: int = 0,
    transfer_syntax: str = ExplicitVRLittleEndian,
    instance_order: Sequence[int] | None = None,
) -> list[Dataset]:
    """One CT Image Storage dataset per slice of ``hu`` (k, r, c), with file meta.

    ``instance_order`` permutes InstanceNumber (to test that readers sort by position).
    Compressed transfer syntaxes are applied with :meth:`pydicom.Dataset.compress`.
    """
    if hu.ndim != 3 or tuple(hu.shape) != geometry.shape:
        raise ValueError(f"volume shape {hu.shape} does not match geometry {geometry.shape}")
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    stored = hu_to_stored(hu, rescale_slope, rescale_intercept, bits_stored, pixel_representation)
    d = geometry.direction
    iop = [float(v) for v in (*d[:, 2], *d[:, 1])]
    sp = geometry.spacing
    order = list(instance_order) if instance_order is not None else list(range(hu.shape[0]))
    out: list[Dataset] = []
    for k in range(hu.shape[0]):
        ds = copy.deepcopy(header) if header is not None else Dataset()
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = UID(ExplicitVRLittleEndian)
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = order[k] + 1
        _type2_defaults(ds)
        if geometry.slice_origins is not None:
            ipp = geometry.slice_origins[k]
        else:
            ipp = geometry.index_to_patient(np.array([k, 0, 0]))
        ds.ImagePositionPatient = [round(float(v), 4) for v in ipp]
        ds.ImageOrientationPatient = [round(v, 6) for v in iop]
        ds.PixelSpacing = [round(float(sp[1]), 6), round(float(sp[2]), 6)]
        ds.SliceThickness = round(geometry.slice_spacing, 6)
        ds.GantryDetectorTilt = round(geometry.tilt_degrees, 3)
        ds.KVP = 120
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(hu.shape[1]), int(hu.shape[2])
        ds.BitsAllocated = 16
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = pixel_representation
        ds.RescaleIntercept = rescale_intercept
        ds.RescaleSlope = rescale_slope
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = 300, 700
        ds.PixelData = stored[k].tobytes()
        ds["PixelData"].VR = "OW"
        if transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax, generate_instance_uid=False)
        out.append(ds)
    return out


def make_enhanced_ct(
    hu: np.ndarray,
    geometry: Geometry,
    *,
    header: Dataset | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    rescale: Sequence[tuple[float, float]] | None = None,
    bits_stored: int = 12,
    pixel_representation: int = 0,
    transfer_syntax: str = ExplicitVRLittleEndian,
    frame_order: Sequence[int] | None = None,
) -> Dataset:
    """One multi-frame Enhanced CT Image Storage dataset (PS3.3 A.38) holding ``hu``.

    Plane position is per frame; orientation and pixel measures are shared. ``rescale``
    gives a (slope, intercept) per slice and puts PixelValueTransformation per frame (else
    it is shared, slope 1 intercept −1024). ``frame_order[j]`` is the slice stored as frame
    j (to test that readers sort frames by position, not by frame number).
    """
    if hu.ndim != 3 or tuple(hu.shape) != geometry.shape:
        raise ValueError(f"volume shape {hu.shape} does not match geometry {geometry.shape}")
    n = hu.shape[0]
    order = [int(k) for k in frame_order] if frame_order is not None else list(range(n))
    ds = copy.deepcopy(header) if header is not None else Dataset()
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = UID(ExplicitVRLittleEndian)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.InstanceNumber = 1
    _type2_defaults(ds)
    ds.ContentQualification = "PRODUCT"
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(hu.shape[1]), int(hu.shape[2])
    ds.NumberOfFrames = n
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = pixel_representation

    d = geometry.direction
    sp = geometry.spacing
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [round(float(sp[1]), 6), round(float(sp[2]), 6)]
    measures.SliceThickness = round(geometry.slice_spacing, 6)
    shared.PixelMeasuresSequence = [measures]
    orientation = Dataset()
    orientation.ImageOrientationPatient = [round(float(v), 6) for v in (*d[:, 2], *d[:, 1])]
    shared.PlaneOrientationSequence = [orientation]
    frame_type = Dataset()
    frame_type.FrameType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    shared.CTImageFrameTypeSequence = [frame_type]

    def _pvt(slope: float, intercept: float) -> Dataset:
        item = Dataset()
        item.RescaleSlope = slope
        item.RescaleIntercept = intercept
        item.RescaleType = "HU"
        return item

    if rescale is None:
        shared.PixelValueTransformationSequence = [_pvt(1.0, -1024.0)]
        per_slice = [(1.0, -1024.0)] * n
    else:
        per_slice = [(float(a), float(b)) for a, b in rescale]
    ds.SharedFunctionalGroupsSequence = [shared]

    frames = []
    per_frame = []
    for k in order:
        item = Dataset()
        content = Dataset()
        content.StackID = "1"
        content.InStackPositionNumber = k + 1
        content.DimensionIndexValues = [1, k + 1]
        item.FrameContentSequence = [content]
        position = Dataset()
        if geometry.slice_origins is not None:
            ipp = geometry.slice_origins[k]
        else:
            ipp = geometry.index_to_patient(np.array([k, 0, 0]))
        position.ImagePositionPatient = [round(float(v), 4) for v in ipp]
        item.PlanePositionSequence = [position]
        slope, intercept = per_slice[k]
        if rescale is not None:
            item.PixelValueTransformationSequence = [_pvt(slope, intercept)]
        per_frame.append(item)
        frames.append(hu_to_stored(hu[k], slope, intercept, bits_stored, pixel_representation))
    ds.PerFrameFunctionalGroupsSequence = per_frame
    dim_uid = generate_uid()
    dims = []
    for pointer, group in (
        (0x00209056, 0x00209111),  # StackID in FrameContentSequence
        (0x00209057, 0x00209111),  # InStackPositionNumber
    ):
        dim = Dataset()
        dim.DimensionOrganizationUID = dim_uid
        dim.DimensionIndexPointer = pointer
        dim.FunctionalGroupPointer = group
        dims.append(dim)
    org = Dataset()
    org.DimensionOrganizationUID = dim_uid
    ds.DimensionOrganizationSequence = [org]
    ds.DimensionIndexSequence = dims
    ds.PixelData = np.stack(frames).tobytes()
    ds["PixelData"].VR = "OW"
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax, generate_instance_uid=False)
    return ds
