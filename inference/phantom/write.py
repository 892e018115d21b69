"""Write a phantom: the DICOM series in ``OUT/dicom/`` and its ground truth beside it.

Layout (the ground truth is never inside the DICOM directory, so readers of the series see
only CT instances)::

    OUT/dicom/CT000001.dcm …      one CT Image Storage instance per slice
    OUT/facemask.nii.gz           uint8 ground-truth facemask
    OUT/intracranial.nii.gz       uint8 brain + CSF + intracranial vessels
    OUT/phantom.json              options, landmarks (LPS mm), slice count

The NIfTI arrays are the (k, r, c) volume transposed to (c, r, k), with an affine mapping
those indices to RAS mm, so viewers overlay them on the series.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from inference.dicomgen import make_ct_series
from inference.geometry import Geometry
from inference.phantom.generate import Phantom

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_KRC_TO_CRK = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)


def _nifti(mask: np.ndarray, geometry: Geometry) -> nib.Nifti1Image:
    affine = _LPS_TO_RAS @ geometry.affine @ _KRC_TO_CRK
    data = np.ascontiguousarray(np.transpose(mask.astype(np.uint8), (2, 1, 0)))
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def write_phantom(phantom: Phantom, out_dir: Path) -> Path:
    """Write the series and ground truth under ``out_dir``; return the DICOM directory."""
    out_dir = Path(out_dir)
    dicom_dir = out_dir / "dicom"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    datasets = make_ct_series(phantom.hu, phantom.geometry, header=phantom.header)
    for i, ds in enumerate(datasets, start=1):
        ds.save_as(dicom_dir / f"CT{i:06d}.dcm", enforce_file_format=True)
    nib.save(_nifti(phantom.facemask, phantom.geometry), out_dir / "facemask.nii.gz")
    nib.save(_nifti(phantom.intracranial, phantom.geometry), out_dir / "intracranial.nii.gz")
    meta = {
        "options": dataclasses.asdict(phantom.options),
        "shape": list(phantom.geometry.shape),
        "landmarks_lps_mm": {
            k: [round(float(c), 3) for c in v] for k, v in phantom.landmarks.items()
        },
        "facemask_voxels": int(phantom.facemask.sum()),
        "intracranial_voxels": int(phantom.intracranial.sum()),
    }
    (out_dir / "phantom.json").write_text(json.dumps(meta, indent=2))
    return dicom_dir


def load_ground_truth(out_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(facemask, intracranial) as bool (k, r, c) arrays from a directory written above."""
    out_dir = Path(out_dir)
    masks = []
    for name in ("facemask.nii.gz", "intracranial.nii.gz"):
        img = nib.load(out_dir / name)
        if not isinstance(img, nib.Nifti1Image):
            raise ValueError(f"{name} is not a NIfTI-1 image")
        data = np.asarray(img.dataobj)
        masks.append(np.transpose(data, (2, 1, 0)).astype(bool))
    return masks[0], masks[1]
