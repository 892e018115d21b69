"""PHI sweep: no planted string or date survives anywhere in the written output bytes."""

from __future__ import annotations

import io
import re

import pytest
from pydicom import dcmread

from anonymizer import deidentify
from tests.support.deid import KEY, phi_series, profile, to_bytes

TIME = re.compile(r"^\d{6}\.\d{6}$")


def _leaks(planted: list[str], blob: bytes) -> list[str]:
    """Planted strings found in ``blob``, as written or upper-cased (PN/CS normalisation)."""
    return [s for s in planted if s.encode("latin-1") in blob or s.upper().encode() in blob]


@pytest.mark.parametrize("seed", [1, 2])
def test_default_profile_leaves_no_planted_phi(seed: int) -> None:
    series, planted = phi_series(seed)
    assert len(planted) > 90
    raw_in = b"".join(to_bytes(ds) for ds in series)
    assert _leaks(planted, raw_in) == planted  # the plants are really in the input files
    out = [deidentify(ds, profile(), facemask_applied=True) for ds in series]
    blob = b"".join(to_bytes(ds) for ds in out)
    assert _leaks(planted, blob) == []
    assert KEY not in blob and KEY.hex().encode() not in blob  # the key is never written
    for raw in (to_bytes(ds) for ds in out):
        back = dcmread(io.BytesIO(raw))
        assert back.PatientIdentityRemoved == "YES"
        assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID
        assert "SourceApplicationEntityTitle" not in back.file_meta
        assert not [e for e in back.iterall() if e.tag.is_private]


def test_basic_only_profile_leaves_no_planted_phi() -> None:
    series, planted = phi_series(3)
    out = [
        deidentify(ds, profile(clean_descriptors=False), facemask_applied=False) for ds in series
    ]
    assert _leaks(planted, b"".join(to_bytes(ds) for ds in out)) == []


def test_modified_dates_profile_shifts_every_planted_date() -> None:
    """With the modified-dates option the times stay (whole-day shift); no date survives."""
    series, planted = phi_series(4)
    prof = profile(retain_longitudinal_modified_dates=True)
    out = [deidentify(ds, prof, facemask_applied=True) for ds in series]
    blob = b"".join(to_bytes(ds) for ds in out)
    leaks = _leaks(planted, blob)
    assert leaks, "times of day are expected to be kept under this option"
    assert all(TIME.match(s) for s in leaks), leaks
    assert out[0].LongitudinalTemporalInformationModified == "MODIFIED"
    assert out[0].StudyDate and out[0].StudyDate != series[0].StudyDate


def test_sweep_detects_what_an_option_retains() -> None:
    """The sweep can fail: retained institution and device identity show up in it."""
    series, planted = phi_series(6)
    prof = profile(retain_institution_identity=True, retain_device_identity=True)
    out = [deidentify(ds, prof, facemask_applied=True) for ds in series]
    leaks = _leaks(planted, b"".join(to_bytes(ds) for ds in out))
    assert str(series[0].InstitutionName) in leaks
    assert str(series[0].DeviceSerialNumber) in leaks
    assert str(series[0].PatientID) not in leaks
