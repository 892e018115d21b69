"""Profile options, recorded method codes, refusal, purity, re-id lookup, docs and CLI."""

from __future__ import annotations

import io
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.uid import ImplicitVRLittleEndian

from anonymizer import (
    DeidentificationError,
    Effect,
    Profile,
    deidentify,
    describe,
    explain,
    reid_record,
    write_reid_records,
)
from anonymizer.deidentify import clean_text
from tests.support.deid import ALL_OPTIONS, KEY, phi_series, profile, to_bytes

DOCS = Path(__file__).resolve().parents[1] / "docs" / "deidentification.md"


def _codes(ds) -> list[str]:  # type: ignore[no-untyped-def]
    return [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]


def test_method_codes_record_the_options_used() -> None:
    series, _ = phi_series(21, slices=1)
    ds = series[0]
    default = deidentify(ds, profile(), facemask_applied=True)
    assert _codes(default) == ["113100", "113102", "113105"]
    assert default.RecognizableVisualFeatures == "NO"
    assert default.LongitudinalTemporalInformationModified == "REMOVED"
    assert default.PatientIdentityRemoved == "YES"
    assert "2024b" in default.DeidentificationMethod[0]
    plain = deidentify(ds, profile(clean_descriptors=False), facemask_applied=False)
    assert _codes(plain) == ["113100"]
    assert "RecognizableVisualFeatures" not in plain
    everything = deidentify(
        ds, profile(**ALL_OPTIONS, retain_safe_private=("(0009,xx10) X",)), facemask_applied=True
    )
    assert sorted(_codes(everything)) == sorted(
        ["113100", "113102", "113105", "113107", "113108", "113109", "113110", "113111", "113112"]
    )
    assert everything.LongitudinalTemporalInformationModified == "MODIFIED"


def test_options_retain_what_they_say() -> None:
    series, _ = phi_series(22, slices=1)
    ds = series[0]
    kept = deidentify(ds, profile(**ALL_OPTIONS), facemask_applied=True)
    assert kept.SOPInstanceUID == ds.SOPInstanceUID
    assert kept.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert kept.PatientSex == ds.PatientSex and kept.PatientAge == ds.PatientAge
    assert kept.PatientWeight == ds.PatientWeight
    assert kept.DeviceSerialNumber == ds.DeviceSerialNumber
    assert kept.InstitutionName == ds.InstitutionName
    assert kept.PatientID != ds.PatientID  # never retained: there is no such option
    default = deidentify(ds, profile(), facemask_applied=True)
    for attr in ("PatientAge", "PatientWeight", "InstitutionAddress", "OtherPatientIDs"):
        assert attr not in default
    assert default.PatientSex in (None, "")
    assert default.DeviceSerialNumber != ds.DeviceSerialNumber


def test_burned_in_annotation_is_refused() -> None:
    series, _ = phi_series(23, slices=1)
    series[0].BurnedInAnnotation = "YES"
    with pytest.raises(DeidentificationError) as err:
        deidentify(series[0], profile(), facemask_applied=True)
    assert str(series[0].PatientID) not in str(err.value)
    series[0].BurnedInAnnotation = "NO"
    assert deidentify(series[0], profile(), facemask_applied=True).BurnedInAnnotation == "NO"


def test_key_is_validated_and_never_shown() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Profile(key=b"short")
    with pytest.raises(ValueError, match="project_prefix"):
        Profile(key=KEY, project_prefix="bad prefix!")
    p = Profile(key=KEY.decode())
    assert p.key == KEY
    assert KEY.decode() not in repr(p) and KEY.decode() not in "\n".join(describe(p))


def test_safe_private_allow_list() -> None:
    series, planted = phi_series(24, slices=1)
    ds = series[0]
    creator = next(s for s in planted if s.startswith("DGPHI ") and "INNER" not in s)
    prof = profile(retain_safe_private=[f"(0009,xx11) {creator}"])
    out = deidentify(ds, prof, facemask_applied=False)
    private = {e.tag: e.value for e in out if e.tag.is_private}
    assert private == {0x00090010: creator, 0x00091011: ds[0x00091011].value}
    with pytest.raises(ValueError, match="GGGG,xxEE"):
        profile(retain_safe_private=["0009,1011"])
    with pytest.raises(ValueError, match="odd"):
        profile(retain_safe_private=["(0008,xx11) X"])


def test_deidentify_is_pure() -> None:
    series, _ = phi_series(25, slices=1)
    ds = series[0]
    before = to_bytes(ds)
    out = deidentify(ds, profile(), facemask_applied=True)
    out.PixelData = b"\x00" * len(out.PixelData)
    out.Manufacturer = "changed"
    out.ImageType[0] = "DERIVED"
    assert to_bytes(ds) == before
    # A dataset read from a file (raw elements) works the same and is left untouched too.
    read = dcmread(io.BytesIO(before))
    out2 = deidentify(read, profile(), facemask_applied=True)
    assert to_bytes(out2) == to_bytes(deidentify(ds, profile(), facemask_applied=True))
    assert to_bytes(read) == before
    # Not even pydicom's lazy conversion was cached into the input: it is still all raw.
    fresh = dcmread(io.BytesIO(before))
    deidentify(fresh, profile(), facemask_applied=True)
    converted = [e.tag for e in fresh.values() if not isinstance(e, RawDataElement)]
    assert converted in ([], [0x00080005])  # pydicom decodes Specific Character Set itself


def test_deferred_reads_are_loaded_not_lost(tmp_path: Path) -> None:
    series, _ = phi_series(29, slices=1)
    path = tmp_path / "in.dcm"
    path.write_bytes(to_bytes(series[0]))
    eager = deidentify(dcmread(path), profile(), facemask_applied=True)
    lazy = deidentify(dcmread(path, defer_size=64), profile(), facemask_applied=True)
    assert to_bytes(lazy) == to_bytes(eager)
    assert len(lazy.PixelData) == 16 * 16 * 2


def test_implicit_vr_input_gets_the_same_decisions(tmp_path: Path) -> None:
    """Implicit VR files reach us as raw elements without VR: the dictionary VR decides."""
    series, planted = phi_series(30, slices=1)
    ds = series[0]
    explicit = deidentify(dcmread(io.BytesIO(to_bytes(ds))), profile(), facemask_applied=True)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    path = tmp_path / "implicit.dcm"
    ds.save_as(path, enforce_file_format=True)
    read = dcmread(path)
    assert read.get_item(0x00100010).VR is None  # really raw, VR unknown
    implicit = deidentify(read, profile(), facemask_applied=True)
    assert sorted(e.tag for e in implicit.iterall()) == sorted(e.tag for e in explicit.iterall())
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber"):
        assert str(implicit[keyword].value) == str(explicit[keyword].value)
    assert _leaks_in(planted, to_bytes(implicit)) == []


def _leaks_in(planted: list[str], blob: bytes) -> list[str]:
    return [s for s in planted if s.encode("latin-1") in blob]


def test_reid_lookup_written_0600_and_matches_output(tmp_path: Path) -> None:
    series, _ = phi_series(26, slices=2)
    prof = profile(retain_longitudinal_modified_dates=True)
    out = deidentify(series[0], prof, facemask_applied=True)
    records = [reid_record(ds, prof) for ds in series]
    path = tmp_path / "reid.jsonl"
    assert write_reid_records(path, records) == 1  # two instances, one study: one line
    assert write_reid_records(path, records[:1]) == 1  # appended
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2
    rec = lines[0]
    assert rec["patient_id"] == series[0].PatientID and rec["pseudonym"] == out.PatientID
    assert rec["pseudo_study_instance_uid"] == out.StudyInstanceUID
    assert rec["pseudo_accession_number"] == out.AccessionNumber
    assert KEY.decode() not in path.read_text()
    os.chmod(path, 0o644)
    write_reid_records(path, records)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_clean_descriptors_keeps_vocabulary_only() -> None:
    assert clean_text("CTA Head/Neck 0.625 mm Dr Smith 1957") == "CTA Head Neck 0.625 mm"
    assert clean_text("with Jane") == ""
    assert clean_text("John Smith") == ""


def test_explain_masks_values_and_covers_nested_attributes() -> None:
    series, planted = phi_series(27, slices=1)
    decisions = explain(series[0], profile())
    text = "\n".join(f"{d.path} {d.name} {d.rule} {d.effect.value} {d.result}" for d in decisions)
    assert [s for s in planted if s in text] == []
    paths = {d.path for d in decisions}
    assert "(0040,0275)[0]>(0008,0050)" in paths  # nested Accession Number
    assert any(d.effect is Effect.PSEUDONYM and d.tag == 0x00100020 for d in decisions)
    assert any(d.effect is Effect.ADDED and d.tag == 0x00120062 for d in decisions)


def test_docs_action_list_matches_describe() -> None:
    text = DOCS.read_text(encoding="utf-8")
    block = re.search(
        r"<!-- describe:begin -->\n```text\n(.*?)```\n<!-- describe:end -->", text, re.S
    )
    assert block, "docs/deidentification.md lacks the generated action list"
    assert block.group(1).splitlines() == describe(Profile(key=b"x" * 32))


def test_cli_dry_run_prints_masked_plan(tmp_path: Path) -> None:
    series, planted = phi_series(28, slices=1)
    path = tmp_path / "in.dcm"
    path.write_bytes(to_bytes(series[0]))
    config = tmp_path / "site.yaml"
    config.write_text("deid:\n  project_prefix: SITEX\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "deid",
            "--dry-run",
            str(path),
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("DEFACEGATE_")},
    )
    assert proc.returncode == 0, proc.stderr
    assert "(0010,0020)" in proc.stdout and "pseudonym" in proc.stdout
    assert "patient 'SITEX-'" in proc.stdout  # the profile of the given configuration
    assert "(0009,1012)[0]>" not in proc.stdout  # private sequences are dropped, not entered
    assert "Private" in proc.stdout and "removed" in proc.stdout
    assert [s for s in planted if s in proc.stdout + proc.stderr] == []


def test_settings_key_file_and_errors_never_echo_the_key(tmp_path: Path) -> None:
    from gateway.config import DeidSettings, load_settings

    secret = tmp_path / "deid_key"
    secret.write_text(KEY.decode() + "\n")
    assert DeidSettings(key_file=secret).key.get_secret_value() == KEY.decode()  # type: ignore[union-attr]
    for overrides in (
        {"deid": {"key": "tooshort-secret"}},
        {"deid": {"key": "tooshort-secret", "key_file": str(secret)}},
        {"deid": {"key": "tooshort-secret", "project_prefix": "no spaces"}},
    ):
        with pytest.raises(ValueError) as err:
            load_settings(**overrides)
        assert "tooshort-secret" not in str(err.value)
