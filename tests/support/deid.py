"""Fixtures for the de-identification tests: keys, VR-typed sample values, PHI series."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from anonymizer import Profile
from inference.dicomgen import make_ct_series
from inference.geometry import Geometry
from inference.phi_header import phi_header

KEY = b"test-key-0123456789-abcdefghij"
OTHER_KEY = b"another-key-9876543210-zyxwvut"

# A value per VR that any action visibly changes: the text contains two vocabulary words
# (kept by Clean Descriptors) and one word that is not.
TEXT = "CTA HEAD Secret"
SAMPLE: dict[str, Any] = {
    "AE": "SECRETAE",
    "AS": "045Y",
    "CS": "SECRETCS",
    "DA": "20210305",
    "DT": "20210305101010",
    "TM": "101010",
    "DS": "12.5",
    "IS": "7",
    "LO": TEXT,
    "SH": TEXT,
    "ST": TEXT,
    "LT": TEXT,
    "UT": TEXT,
    "UC": TEXT,
    "PN": "Doe^Jane",
    "UI": "1.2.3.4.5.6.7.8",
    "UR": "http://secret.example/x",
    "US": 5,
    "UL": 5,
    "SS": 5,
    "SL": 5,
    "FL": 1.5,
    "FD": 1.5,
    "OB": b"\x01\x02",
    "OW": b"\x01\x02",
    "UN": b"\x01\x02",
}


def code_item(value: str = "SECRETCV", meaning: str = "Secret meaning") -> Dataset:
    """A code sequence item (unlisted attributes: kept in normal, dummied in strict items)."""
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "99LOCAL"
    item.CodeMeaning = meaning
    return item


def sample_value(vr: str) -> Any:
    if vr == "SQ":
        return Sequence([code_item()])
    return SAMPLE[vr]


def profile(**options: Any) -> Profile:
    return Profile(key=KEY, **options)


ALL_OPTIONS = {
    "retain_longitudinal_modified_dates": True,
    "retain_patient_characteristics": True,
    "retain_device_identity": True,
    "retain_institution_identity": True,
    "clean_descriptors": True,
    "retain_uids": True,
}
BASIC_ONLY = {"clean_descriptors": False}


def phi_series(
    seed: int = 1,
    *,
    slices: int = 2,
    study_uid: str | None = None,
    header: Dataset | None = None,
) -> tuple[list[Dataset], list[str]]:
    """A tiny CT series whose header (and file meta) carries planted PHI; and the plants.

    The planted list includes the original Study/Series/SOP/Frame of Reference UIDs and file
    meta values, which must not survive either.
    """
    planted: list[str]
    if header is None:
        header, planted = phi_header(seed)
    else:
        planted = []
    shape = (slices, 16, 16)
    geometry = Geometry(np.diag([0.5, 0.5, 1.0, 1.0]), shape)
    hu = np.full(shape, -1000.0)
    hu[:, 4:12, 4:12] = 40.0
    series = make_ct_series(hu, geometry, header=header, study_uid=study_uid)
    for i, ds in enumerate(series):
        ds.file_meta.SourceApplicationEntityTitle = f"SRCAE{seed}{i}"
        planted.append(f"SRCAE{seed}{i}")
        planted.extend(
            str(ds[k].value) for k in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
        )
        planted.append(str(ds.FrameOfReferenceUID))
    return series, list(dict.fromkeys(planted))


def to_bytes(ds: Dataset) -> bytes:
    """Encode as a DICOM file, with pydicom's strict validation on."""
    buf = io.BytesIO()
    old = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.RAISE
    try:
        ds.save_as(buf, enforce_file_format=True)
    finally:
        pydicom_config.settings.writing_validation_mode = old
    return buf.getvalue()


def round_trip(ds: Dataset) -> Dataset:
    return dcmread(io.BytesIO(to_bytes(ds)))
