"""Two series of one study, de-identified in separate runs (one in another process), agree."""

from __future__ import annotations

import copy
import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from anonymizer import Profile, deidentify
from inference.phi_header import phi_header
from tests.support.deid import KEY, OTHER_KEY, phi_series, to_bytes


def _days(a: str, b: str) -> int:
    return (dt.datetime.strptime(a, "%Y%m%d") - dt.datetime.strptime(b, "%Y%m%d")).days


def _study(tmp_path: Path) -> tuple[list[Dataset], list[Dataset]]:
    header, _ = phi_header(11)
    first, _ = phi_series(header=header, slices=2)
    study_uid = str(first[0].StudyInstanceUID)
    second_header = copy.deepcopy(header)
    second_header.SeriesDate = "20240102"  # differs from the first series' date
    refs = []
    for ds in first:
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        refs.append(ref)
    second_header.ReferencedImageSequence = Sequence(refs)
    second, _ = phi_series(header=second_header, slices=2, study_uid=study_uid)
    first[0].SeriesDate = "20231225"
    return first, second


def test_separate_runs_share_study_patient_references_and_date_offset(tmp_path: Path) -> None:
    first, second = _study(tmp_path)
    options = {"retain_longitudinal_modified_dates": True}
    # Run 1: in this process.
    out1 = [deidentify(ds, Profile(key=KEY, **options), facemask_applied=True) for ds in first]
    # Run 2: another process, through the CLI, key from the environment.
    src = tmp_path / "in"
    src.mkdir()
    files = []
    for i, ds in enumerate(second):
        files.append(src / f"{i}.dcm")
        files[-1].write_bytes(to_bytes(ds))
    env = {
        **os.environ,
        "DEFACEGATE_DEID__KEY": KEY.decode(),
        "DEFACEGATE_DEID__RETAIN_LONGITUDINAL_MODIFIED_DATES": "true",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "deid", *map(str, files), "-o", str(tmp_path / "o")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert KEY.decode() not in proc.stdout + proc.stderr
    out2 = [dcmread(p) for p in sorted((tmp_path / "o").glob("*.dcm"))]
    assert len(out2) == 2

    assert {d.StudyInstanceUID for d in out1} == {d.StudyInstanceUID for d in out2}
    assert out1[0].StudyInstanceUID != first[0].StudyInstanceUID
    assert out1[0].SeriesInstanceUID != out2[0].SeriesInstanceUID
    assert {d.PatientID for d in out1} == {d.PatientID for d in out2}
    assert str(out2[0].PatientName) == str(out1[0].PatientName)
    assert out1[0].PatientID.startswith("DG-")
    assert {d.AccessionNumber for d in out1} == {d.AccessionNumber for d in out2}
    # References inside sequences resolve to the new SOP Instance UIDs of the first series.
    new_sops = {d.SOPInstanceUID for d in out1}
    refs = {r.ReferencedSOPInstanceUID for d in out2 for r in d.ReferencedImageSequence}
    assert refs == new_sops
    # File meta names the new instance.
    assert all(d.file_meta.MediaStorageSOPInstanceUID == d.SOPInstanceUID for d in out1 + out2)
    # One per-patient offset: same shifted study date, the interval between series kept.
    assert out1[0].StudyDate == out2[0].StudyDate != first[0].StudyDate
    shift = _days(first[0].StudyDate, out1[0].StudyDate)
    assert 365 <= shift <= 3650
    assert _days(out2[0].SeriesDate, out1[0].SeriesDate) == _days("20240102", "20231225")


def test_same_input_same_key_is_deterministic_other_key_differs() -> None:
    series, _ = phi_series(12, slices=1)
    a = deidentify(series[0], Profile(key=KEY), facemask_applied=False)
    b = deidentify(series[0], Profile(key=KEY), facemask_applied=False)
    c = deidentify(series[0], Profile(key=OTHER_KEY), facemask_applied=False)
    assert to_bytes(a) == to_bytes(b)
    for attr in ("SOPInstanceUID", "StudyInstanceUID", "PatientID", "AccessionNumber"):
        assert a[attr].value != c[attr].value
