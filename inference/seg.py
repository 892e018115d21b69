"""Save the facemask: a DICOM SEG over the defaced series (highdicom) or a NIfTI file.

The SEG references the *defaced, de-identified* instances, so it carries their pseudonymous
patient/study identity and nothing from the original headers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from inference.geometry import Geometry
from inference.series import SliceRef

#: LPS (DICOM) → RAS (NIfTI): negate x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def facemask_segmentation(
    mask: np.ndarray,
    defaced_datasets: Sequence[Dataset],
    slices: Sequence[SliceRef],
    *,
    algorithm: str = "defacegate",
    algorithm_version: str = "0.1.0",
    family: hd.sr.CodedConcept | None = None,
) -> Dataset:
    """BINARY DICOM SEG with one segment "Face" (SCT 89545001) over ``defaced_datasets``.

    ``defaced_datasets[i]`` is the defaced copy of ``series.datasets[i]`` and
    ``slices[k]`` says which instance/frame holds mask slice ``k`` (SeriesVolume.slices).
    """
    if mask.shape[0] != len(slices):
        raise ValueError(f"mask has {mask.shape[0]} slices, series has {len(slices)}")
    multi_frame = {ref.frame is not None for ref in slices}
    if multi_frame == {True}:
        if len({ref.dataset for ref in slices}) != 1:
            raise ValueError("a SEG can reference one multi-frame instance, not several")
        source = [defaced_datasets[slices[0].dataset]]
        pixels = np.zeros((int(source[0].NumberOfFrames), *mask.shape[1:]), dtype=bool)
        for k, ref in enumerate(slices):
            pixels[ref.frame] = mask[k]
    elif multi_frame == {False}:
        source = [defaced_datasets[ref.dataset] for ref in slices]
        pixels = np.asarray(mask, dtype=bool)
    else:
        raise ValueError("series mixes single-frame and multi-frame instances")
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Face",
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.Face,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm,
            version=algorithm_version,
            family=family or codes.cid7162.MorphologicalOperations,
        ),
    )
    return hd.seg.Segmentation(
        source_images=source,
        pixel_array=pixels.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=generate_uid(),
        series_number=9901,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="defacegate",
        manufacturer_model_name="defacegate",
        software_versions=algorithm_version,
        device_serial_number="0",
        series_description="Facemask",
        omit_empty_frames=False,
    )


def nifti_affine(geometry: Geometry) -> np.ndarray:
    """RAS affine of the NIfTI array ``mask.transpose(2, 1, 0)`` (i=column, j=row, k=slice).

    Irregular slice spacing cannot be expressed in NIfTI; the mean step is used.
    """
    return LPS_TO_RAS @ geometry.affine[:, [2, 1, 0, 3]]


def write_mask_nifti(mask: np.ndarray, geometry: Geometry, path: Path) -> Path:
    """Write ``mask`` (k, r, c) as uint8 NIfTI-1 with the sform set to scanner RAS.

    The qform (a rotation, no shear) is set too, except for a gantry-tilted series whose
    affine is sheared: there it is left unset so no reader falls back to a wrong grid.
    """
    data = np.ascontiguousarray(np.asarray(mask, dtype=np.uint8).transpose(2, 1, 0))
    affine = nifti_affine(geometry)
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code="scanner")
    if geometry.tilt_degrees < 0.01:
        image.set_qform(affine, code="scanner")
    else:
        image.set_qform(None, code="unknown")
    nib.save(image, str(path))
    return path
