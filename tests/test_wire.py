"""gateway.wire: the SCP's hand-encoded bytes equal what pydicom / pynetdicom would send."""

from __future__ import annotations

import struct
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta
from pynetdicom.events import Event

from gateway.wire import TruncatedDatasetError, c_store_rsp_command, identity, part10_header
from tests.support.deid import phi_series
from tests.test_scp import _series

# Odd and even UID lengths exercise the padding.
UIDS = [
    "1.2.3",
    "1.2.34",
    "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345",
    "1.2.826.0.1.3680043.8.498.1234567890123456789012345678901234",
]


@pytest.mark.parametrize("sop_uid", UIDS)
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, JPEG2000Lossless, "1.2.840.10008.1.2"])
def test_part10_header_equals_pynetdicom_encoded_dataset(sop_uid: str, syntax: str) -> None:
    request = C_STORE()
    request.AffectedSOPClassUID = EnhancedCTImageStorage
    request.AffectedSOPInstanceUID = sop_uid
    request.DataSet = BytesIO(b"\x08\x00\x16\x00UI\x00\x00")  # any dataset bytes
    event = Event(None, "EVT_C_STORE", {"request": request, "context": _Context(syntax)})  # type: ignore[arg-type]
    expected = event.encoded_dataset(include_meta=True)
    got = part10_header(EnhancedCTImageStorage, sop_uid, syntax) + request.DataSet.getvalue()
    assert got == expected


class _Context:
    """The presentation-context tuple pynetdicom hands its events."""

    def __init__(self, transfer_syntax: str) -> None:
        self.transfer_syntax = transfer_syntax
        self.context_id = 1
        self.abstract_syntax = CTImageStorage


def test_part10_header_reads_back_with_pydicom() -> None:
    meta = create_file_meta(
        sop_class_uid=CTImageStorage,
        sop_instance_uid="1.2.3",
        transfer_syntax=ExplicitVRLittleEndian,
    )

    raw = part10_header(CTImageStorage, "1.2.3", ExplicitVRLittleEndian)
    back = dcmread(BytesIO(raw + b"\x08\x00\x16\x00UI\x00\x00")).file_meta
    for keyword in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID"):
        assert back[keyword].value == meta[keyword].value
    assert back.FileMetaInformationGroupLength == len(raw) - 132 - 12


@pytest.mark.parametrize("sop_uid", UIDS)
@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xA900, 0xC000, 0xB007])
def test_c_store_rsp_equals_pynetdicom_encoding(sop_uid: str, status: int) -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 65535 if status else 7
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = sop_uid
    rsp.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    (pdata,) = list(message.encode_msg(1, 0))
    ((context_id, pdv),) = pdata.presentation_data_value_list
    assert context_id == 1 and pdv[0] == 0x03  # command, last fragment
    ours = c_store_rsp_command(int(rsp.MessageIDBeingRespondedTo), CTImageStorage, sop_uid, status)
    assert ours == pdv[1:]


def _dataset_bytes(ds: Dataset, syntax: str) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = syntax != ExplicitVRBigEndian
    fp.is_implicit_VR = syntax == ImplicitVRLittleEndian
    write_dataset(fp, ds)
    return fp.getvalue()


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_identity_reads_uids_and_rejects_truncation(syntax: str) -> None:
    (ds,) = _series(n=1, size=64)
    raw = _dataset_bytes(ds, syntax)
    uids = identity(BytesIO(raw), UID(syntax))
    assert uids == (ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID)
    # Pixel Data (deferred, not copied) cut short, or a short element in the header.
    inside_uid = raw.index(ds.SeriesInstanceUID.encode()) + 10
    for cut in (len(raw) - 1, len(raw) - 4000, inside_uid):
        with pytest.raises(TruncatedDatasetError):
            identity(BytesIO(raw[:cut]), UID(syntax))
    del ds.SeriesInstanceUID
    with pytest.raises(AttributeError):
        identity(BytesIO(_dataset_bytes(ds, syntax)), UID(syntax))


def _undefined_lengths(ds: Dataset) -> None:
    """Make every sequence (at any depth) undefined-length, as many scanners write them."""
    for elem in ds:
        if elem.VR == "SQ":
            elem.is_undefined_length = True
            for item in elem.value:
                _undefined_lengths(item)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("undefined", [False, True], ids=["defined", "undefined"])
def test_identity_walks_nested_sequences_and_private_tags(syntax: str, undefined: bool) -> None:
    (ds, *_), _ = phi_series(seed=3, slices=1)  # ~90 planted values, sequences, private tags
    assert any(e.VR == "SQ" for e in ds) and any(e.tag.is_private for e in ds)
    if undefined:
        _undefined_lengths(ds)
    raw = _dataset_bytes(ds, syntax)
    assert identity(BytesIO(raw), UID(syntax)) == (
        ds.SeriesInstanceUID,
        ds.SOPInstanceUID,
        ds.SOPClassUID,
    )
    # A cut inside a nested sequence or a value is caught, not read as a shorter dataset.
    sq = next(e for e in ds if e.VR == "SQ")
    inside_sq = raw.index(struct.pack("<HH", sq.tag.group, sq.tag.element)) + 20
    for cut in (inside_sq, len(raw) - 3):
        with pytest.raises(TruncatedDatasetError):
            identity(BytesIO(raw[:cut]), UID(syntax))


def test_identity_skips_encapsulated_pixel_data_fragments() -> None:
    (ds,) = _series(n=1, size=64)
    ds.compress(RLELossless)  # undefined-length Pixel Data with an offset table + fragments
    raw = _dataset_bytes(ds, ExplicitVRLittleEndian)
    assert identity(BytesIO(raw), UID(RLELossless))[1] == ds.SOPInstanceUID
    with pytest.raises(TruncatedDatasetError):  # sequence delimiter missing
        identity(BytesIO(raw[:-8]), UID(RLELossless))


@pytest.mark.parametrize("sop_uid", UIDS)
def test_store_lane_parses_commands_as_pynetdicom_encodes_them(sop_uid: str) -> None:
    from pynetdicom.dimse_messages import C_STORE_RQ

    from gateway.store_lane import _request, parse_command

    rq = C_STORE()
    rq.MessageID = 41
    rq.AffectedSOPClassUID = CTImageStorage
    rq.AffectedSOPInstanceUID = sop_uid
    rq.Priority = 2
    rq.MoveOriginatorApplicationEntityTitle = "MOVER"
    rq.MoveOriginatorMessageID = 9
    rq.DataSet = BytesIO(b"\x08\x00\x16\x00UI\x00\x00")
    message = C_STORE_RQ()
    message.primitive_to_message(rq)
    first_pdata = next(iter(message.encode_msg(1, 0)))
    _, pdv = first_pdata.presentation_data_value_list[0]  # the command, in one fragment
    fields = parse_command(pdv[1:])
    assert fields == {
        "AffectedSOPClassUID": CTImageStorage,
        "CommandField": 0x0001,
        "MessageID": 41,
        "Priority": 2,
        "CommandDataSetType": 0x0001,
        "AffectedSOPInstanceUID": sop_uid,
        "MoveOriginatorApplicationEntityTitle": "MOVER",
        "MoveOriginatorMessageID": 9,
    }
    back = _request(fields)
    assert (back.MessageID, back.AffectedSOPInstanceUID, back.Priority) == (41, sop_uid, 2)
    with pytest.raises(ValueError):  # truncated command set
        parse_command(pdv[1:-3])
    with pytest.raises(ValueError):  # pynetdicom's own validation of the primitive
        _request({**fields, "Priority": 7})
