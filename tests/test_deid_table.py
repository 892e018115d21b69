"""Walk every row of PS3.15 Table E.1-1 and check the action applied, top level and nested."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from anonymizer import Profile, deidentify, pseudonym
from anonymizer.table import Action, Option, Rule, load_table
from tests.support.deid import ALL_OPTIONS, BASIC_ONLY, KEY, SAMPLE, TEXT, profile, sample_value

# A public sequence the table does not list: its items are processed like the top level.
CONTAINER = 0x00082218  # Anatomic Region Sequence
PSEUDONYMISED = {0x00100010, 0x00100020, 0x00080050, 0x00200010}
PATIENT_ID = "PID-TABLE-1"
OPTION_FLAGS = {
    Option.RETAIN_LONGITUDINAL_MODIFIED_DATES: "retain_longitudinal_modified_dates",
    Option.RETAIN_PATIENT_CHARACTERISTICS: "retain_patient_characteristics",
    Option.RETAIN_DEVICE_IDENTITY: "retain_device_identity",
    Option.RETAIN_INSTITUTION_IDENTITY: "retain_institution_identity",
    Option.RETAIN_UIDS: "retain_uids",
    Option.CLEAN_DESCRIPTORS: "clean_descriptors",
}


def _rows() -> list[tuple[Rule, str]]:
    return [(r, str(dictionary_VR(r.tag))) for r in load_table().rules if r.tag is not None]


def _expected(rule: Rule, vr: str, prof: Profile) -> str:
    """The single action PS3.15 asks for, restated independently of the implementation."""
    active = [getattr(prof, flag) for flag in OPTION_FLAGS.values()]
    codes = [
        rule.option_action(opt)
        for opt, on in zip(OPTION_FLAGS, active, strict=True)
        if on and rule.option_action(opt) is not None
    ]
    code = rule.basic
    if codes:
        code = Action.K if Action.K in codes else Action.C
    if vr == "SQ":
        single = {"X/Z": "X", "X/Z/D": "X", "X/D": "X", "Z/D": "Z", "X/Z/U*": "U"}
    else:
        single = {"X/Z": "Z", "X/Z/D": "D", "X/D": "D", "Z/D": "D", "X/Z/U*": "U"}
    result = single.get(code.value, code.value)
    if result == "C":
        cleanable = vr in ("DA", "DT", "TM", "CS", "SQ", "LO", "SH", "ST", "LT", "UT", "UC")
        if not cleanable:
            result = single.get(rule.basic.value, rule.basic.value)
    return result


def _build() -> Dataset:
    ds = Dataset()
    item = Dataset()
    for rule, vr in _rows():
        for target in (ds, item):
            target.add(DataElement(rule.tag, vr, sample_value(vr)))
    ds.PatientID = item.PatientID = PATIENT_ID
    ds.add(DataElement(CONTAINER, "SQ", Sequence([item])))
    return ds


def _check(rule: Rule, vr: str, action: str, out: Dataset, prof: Profile, where: str) -> None:
    tag = rule.tag
    label = f"{rule.pattern} {rule.name} ({vr}, {where}): expected {action}"
    original: Any = PATIENT_ID if tag == 0x00100020 else sample_value(vr)
    if action == "X":
        assert tag not in out, label
        return
    assert tag in out, label
    value = out[tag].value
    if vr == "SQ":
        if action == "Z":
            assert len(value) == 0, label
            return
        assert len(value) == 1, label
        code = value[0].get("CodeValue")
        if action == "K" or (action == "U" and not prof.retain_uids):
            assert code == "SECRETCV", label  # kept sequence: unlisted safe code kept
        else:  # D / C: rebuilt as a dummy sequence
            assert code is not None and code != "SECRETCV", label
        return
    if tag in PSEUDONYMISED and action in ("Z", "D"):
        assert value and str(value) != str(original), label
        if tag in (0x00100010, 0x00100020):
            assert str(value).startswith(prof.project_prefix), label
        return
    if action == "Z":
        assert value in (None, "", b""), label
    elif action == "D":
        assert value not in (None, "", b"") and value != original, label
        if vr == "UI":
            assert str(value).startswith("2.25."), label
    elif action == "K":
        assert value == original, label
    elif action == "U":
        assert value == pseudonym.pseudo_uid(KEY, original), label
    elif action == "C":
        if vr == "DA":
            assert value == pseudonym.shift_da(original, _shift()), label
        elif vr == "DT":
            assert value == pseudonym.shift_dt(original, _shift()), label
        elif vr in ("TM", "CS"):
            assert value == original, label
        else:
            assert value == "CTA HEAD", label
    else:  # pragma: no cover
        raise AssertionError(label)


def _shift() -> int:
    return pseudonym.date_shift_days(KEY, PATIENT_ID)


@pytest.fixture(scope="module")
def source() -> Dataset:
    return _build()


@pytest.mark.parametrize(
    ("options", "actions"),
    [({}, "XZDUC"), (BASIC_ONLY, "XZDU"), (ALL_OPTIONS, "XZDKCU")],
    ids=["default", "basic-only", "all-options"],
)
def test_every_row_top_level_and_nested(
    source: Dataset, options: dict[str, bool], actions: str
) -> None:
    prof = profile(**options)
    out = deidentify(source, prof, facemask_applied=False)
    rows = _rows()
    assert len(rows) == 617  # 621 rows minus 50xx, 60xx (2) and private
    seen: set[str] = set()
    for rule, vr in rows:
        action = _expected(rule, vr, prof)
        seen.add(action)
        if rule.tag >> 16 == 0x0002:  # file meta rows: checked in the rebuilt file meta
            _check(rule, vr, action, out.file_meta, prof, "file meta")
            continue
        _check(rule, vr, action, out, prof, "top level")
        _check(rule, vr, action, out[CONTAINER].value[0], prof, "nested")
    assert seen == set(actions)  # every kind of action was exercised


def test_table_is_complete_and_validated() -> None:
    table = load_table()
    assert len(table.rules) == 621
    assert {r.basic for r in table.rules} == set(Action) - {Action.K, Action.C}
    assert table.lookup(0x50021234) is table.curve
    assert table.lookup(0x601E3000) is table.overlay_data
    assert table.lookup(0x60024000) is table.overlay_comments
    assert table.lookup(0x00291010) is table.private
    assert table.lookup(0x00280010) is None  # Rows: not in the table


def test_repeating_groups_and_private_are_removed() -> None:
    ds = Dataset()
    ds.PatientID = "P1"
    ds.add_new(0x50000005, "US", 2)  # Curve Dimensions
    ds.add_new(0x50003000, "OB", b"\x00\x01")  # Curve Data
    ds.add_new(0x60000010, "US", 4)  # Overlay Rows
    ds.add_new(0x60000011, "US", 4)
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60003000, "OW", b"\xff\xff")
    ds.add_new(0x60024000, "LT", "overlay comment naming Jane Doe")
    block = ds.private_block(0x0029, "VENDOR X", create=True)
    block.add_new(0x01, "LO", "private Jane Doe")
    out = deidentify(ds, profile(), facemask_applied=False)
    assert not [e.tag for e in out if (e.tag >> 16) in (0x5000, 0x6000, 0x6002, 0x0029)]


def test_unlisted_attributes_follow_the_documented_rules() -> None:
    ds = Dataset()
    ds.PatientID = "P1"
    ds.Rows = 8  # numeric: kept
    ds.Modality = "CT"  # coded: kept
    ds.Manufacturer = "ACME"  # allow-listed text: kept
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # registered UID: kept
    ds.add_new(0x00081150, "UI", "1.2.3.999")  # Referenced SOP Class UID, unregistered: keyed
    ds.add_new(0x00189004, "CS", "PRODUCT")  # Content Qualification
    ds.add_new(0x00081195, "UI", "1.2.3.4")  # Transaction UID: in the table (U)
    ds.add_new(0x0018700C, "DA", "20200101")  # Date of Last Detector Calibration: listed
    ds.add_new(0x00400556, "ST", "Acquisition context description, Dr Who")  # listed X
    ds.add_new(0x00181050, "DS", "0.5")  # Spatial Resolution
    ds.add_new(0x00189305, "FD", 1.0)  # Revolution Time
    ds.add_new(0x00181160, "SH", "Filter of Dr Who")  # Filter Type: allow-listed
    ds.add_new(0x00101090, "LO", "Medical record locator")  # listed (X)
    ds.add_new(0x00102297, "PN", "Owner^Responsible")  # Responsible Person: listed
    ds.add_new(0x00189345, "FD", 12.0)  # CTDIvol
    ds.add_new(0x00187062, "LT", "Exposure control sensing regions description")
    out = deidentify(ds, profile(), facemask_applied=False)
    assert out.Rows == 8 and out.Modality == "CT" and out.Manufacturer == "ACME"
    assert out.SOPClassUID == ds.SOPClassUID
    assert out[0x00081150].value == pseudonym.pseudo_uid(KEY, "1.2.3.999")
    assert out[0x00189345].value == 12.0
    assert 0x00187062 not in out  # unlisted free text: removed
    assert out[0x00181160].value == "Filter of Dr Who"  # allow-listed technical text


def test_unknown_public_text_tag_is_removed_and_sample_covers_all_vrs() -> None:
    vrs = {vr for _, vr in _rows()}
    assert vrs <= set(SAMPLE) | {"SQ"}
    ds = Dataset()
    ds.add_new(0x00180002, "LO", TEXT)  # not in the data dictionary
    out = deidentify(ds, profile(), facemask_applied=False)
    assert 0x00180002 not in out
