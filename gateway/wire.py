"""Byte encoders for the SCP's per-instance hot path.

pynetdicom builds the Part 10 file meta (``Event.encoded_dataset``) and every C-STORE
response through pydicom ``Dataset`` objects: ≈ 0.3 ms each per instance, a third of what
the whole receive costs. Both are fixed, tiny structures, so they are encoded here directly
with ``struct``. Tests check every function byte-for-byte against pydicom's and
pynetdicom's own encoders (tests/test_wire.py); anything outside these fixed shapes goes
through the library as before.
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import cast

from pydicom.dataelem import RawDataElement
from pydicom.filereader import data_element_generator
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

#: Values of the C-STORE-RSP command set that never vary (PS3.7 9.3.1.2).
C_STORE_RSP_COMMAND_FIELD = 0x8001
NO_DATA_SET = 0x0101

_PREAMBLE = b"\x00" * 128 + b"DICM"
#: Explicit VR elements with a 2-byte reserved field and 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC"})
_LONG_VRS |= {b"UN", b"UR", b"UT", b"UV"}


def _pad(value: bytes, vr: bytes) -> bytes:
    if len(value) % 2:
        return value + (b"\x00" if vr in (b"UI", b"OB") else b" ")
    return value


def _explicit(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    value = _pad(value, vr)
    if vr in _LONG_VRS:
        return struct.pack("<HH2s2xI", group, element, vr, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _implicit(group: int, element: int, value: bytes) -> bytes:
    value = _pad(value, b"UI")  # command sets carry only UIDs and binary values here
    return struct.pack("<HHI", group, element, len(value)) + value


def part10_header(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    implementation_uid: str = PYNETDICOM_IMPLEMENTATION_UID,
    implementation_version: str = PYNETDICOM_IMPLEMENTATION_VERSION,
) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group, as pynetdicom's
    ``Event.encoded_dataset(include_meta=True)`` writes them before the dataset bytes."""
    body = b"".join(
        (
            _explicit(0x0002, 0x0001, b"OB", b"\x00\x01"),
            _explicit(0x0002, 0x0002, b"UI", sop_class_uid.encode("ascii")),
            _explicit(0x0002, 0x0003, b"UI", sop_instance_uid.encode("ascii")),
            _explicit(0x0002, 0x0010, b"UI", transfer_syntax_uid.encode("ascii")),
            _explicit(0x0002, 0x0012, b"UI", implementation_uid.encode("ascii")),
            _explicit(0x0002, 0x0013, b"SH", implementation_version.encode("ascii")),
        )
    )
    length = _explicit(0x0002, 0x0000, b"UL", struct.pack("<I", len(body)))
    return _PREAMBLE + length + body


def c_store_rsp_command(
    message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int
) -> bytes:
    """The C-STORE-RSP command set (Implicit VR Little Endian, no data set), as pynetdicom
    encodes it for a response without Offending Element / Error Comment."""
    body = b"".join(
        (
            _implicit(0x0000, 0x0002, sop_class_uid.encode("ascii")),
            _implicit(0x0000, 0x0100, struct.pack("<H", C_STORE_RSP_COMMAND_FIELD)),
            _implicit(0x0000, 0x0120, struct.pack("<H", message_id)),
            _implicit(0x0000, 0x0800, struct.pack("<H", NO_DATA_SET)),
            _implicit(0x0000, 0x0900, struct.pack("<H", status)),
            _implicit(0x0000, 0x1000, sop_instance_uid.encode("ascii")),
        )
    )
    return _implicit(0x0000, 0x0000, struct.pack("<I", len(body))) + body


#: Elements longer than this are skipped over, not copied (Pixel Data).
_DEFER_BYTES = 4096


class TruncatedDatasetError(Exception):
    """An element's declared length runs past the end of the received bytes (undecodable,
    not a UID problem: the SCP answers 0xC000)."""


_SERIES_UID, _SOP_UID, _SOP_CLASS_UID = 0x0020000E, 0x00080018, 0x00080016


def identity(stream: BytesIO, transfer_syntax: UID) -> tuple[str, str, str]:
    """(SeriesInstanceUID, SOPInstanceUID, SOPClassUID) of a received dataset.

    Walks every top-level element header with pydicom's raw element generator (so a corrupt
    dataset fails here, as a full decode would) but skips large values instead of copying
    them. Raises pydicom's errors, :class:`TruncatedDatasetError`, or ``AttributeError``
    when an identifying UID is absent or empty. Deflated datasets are the caller's job
    (pynetdicom's ``Event.dataset`` inflates).
    """
    stream.seek(0)
    size = len(stream.getbuffer())
    found: dict[int, bytes] = {}
    for raw in data_element_generator(
        stream,
        transfer_syntax.is_implicit_VR,
        transfer_syntax.is_little_endian,
        defer_size=_DEFER_BYTES,
    ):
        raw = cast(RawDataElement, raw)  # the generator yields raw elements only
        if raw.length == 0xFFFFFFFF:  # sequences / encapsulated pixel data: parsed through
            continue
        stored = size - raw.value_tell if raw.value is None else len(raw.value)
        if stored < raw.length:
            raise TruncatedDatasetError("an element runs past the end of the dataset")
        if raw.tag in (_SERIES_UID, _SOP_UID, _SOP_CLASS_UID) and raw.value:
            found[raw.tag] = raw.value
    try:
        uids = [found[t] for t in (_SERIES_UID, _SOP_UID, _SOP_CLASS_UID)]
    except KeyError:
        raise AttributeError("an identifying UID is missing") from None
    series, sop, sop_class = (u.rstrip(b"\x00 ").decode("ascii") for u in uids)
    return series, sop, sop_class
