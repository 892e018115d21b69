"""The C-STORE lane: plain C-STORE requests handled in the association's DUL thread.

Why: per 512 KiB instance pynetdicom spends ≈ 1 ms of Python on six P-DATA PDUs (PDU objects,
state-machine events, DIMSE reassembly with copies), on decoding the command set into a
validated primitive and on handing the message to the association thread and the response
back. That was the gateway's ingest limit (bench/bench_ingest.py). Here the P-DATA-TF PDUs of
an accepted association in data transfer (Sta6) are split into their PDVs without copying;
when a message is complete and it is a C-STORE-RQ on an accepted, non-deflated context, the
gateway's own EVT_C_STORE handler is called right here with a real pynetdicom ``Event`` and
the response PDU is written to the socket. Everything else — C-ECHO, a deflated context, an
unknown context, a malformed command set, any release/abort PDU, or a message pynetdicom has
already started — goes through pynetdicom unchanged: the PDVs collected so far are handed to
``DIMSEServiceProvider.receive_primitive`` exactly as pynetdicom's DT-2 action would have.

When the C data phase is available (gateway/_pdata.c built, plain TCP, see
:meth:`StoreLane._serve_direct`), the data set of such a C-STORE is not split in Python at
all: C reads its PDUs from the socket and writes the fragments into a spool file in
``incoming/``, and the handler commits that file (docs/gateway.md, *The C data phase*).

Bound to pynetdicom 3.0's DUL internals (``_read_pdu_data``, ``_decode_pdu``, ``_recv_pdu``,
``event_queue``, ``Association._accepted_cx``), as gateway.scp already is; the dependency is
pinned ``>=3.0.4,<3.1`` and tests/test_scp.py proves the lane carries the stores.
"""

from __future__ import annotations

import ctypes
import errno
import importlib.util
import logging
import mmap
import os
import ssl
import struct
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import P_DATA

from gateway.statuses import Status
from gateway.wire import NO_DATA_SET, c_store_rsp_command, part10_header

if TYPE_CHECKING:
    from pynetdicom.association import Association
    from pynetdicom.dul import DULServiceProvider

    from gateway.spool import IncomingFiles

log = logging.getLogger(__name__)

P_DATA_TF = 0x04
_PDU_TYPES = frozenset(range(0x01, 0x08))
C_STORE_RQ = 0x0001  # CommandField (PS3.7 9.3.1.1)
#: pynetdicom's status when an EVT_C_STORE handler raises (service_class.StorageServiceClass).
HANDLER_FAILED = 0xC211

# gateway/_pdata.c's return codes
_PDATA_TRANSPORT = {-1: "connection closed", -2: "network timeout"}
_PDATA_INVALID = {
    -3: "another PDU type in the middle of a C-STORE data set",
    -5: "P-DATA-TF PDU whose PDV lengths do not add up",
    -6: "command fragment or another presentation context inside a C-STORE data set",
}
_PDATA_WRITE = -7
#: The C data phase copies fragments through a buffer of this size (any PDU length works).
_CHUNK = 1 << 20


def _load_pdata() -> Callable[..., int] | None:
    """``pdata_receive`` from gateway/_pdata.c, or None when it was not built."""
    spec = importlib.util.find_spec("gateway._pdata")
    if spec is None or spec.origin is None:
        return None
    try:
        func = ctypes.CDLL(spec.origin, use_errno=True).pdata_receive
    except (OSError, AttributeError):
        return None
    func.restype = ctypes.c_int
    func.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
    func.argtypes += (ctypes.c_int, ctypes.c_int)
    func.argtypes += (ctypes.POINTER(ctypes.c_longlong), ctypes.POINTER(ctypes.c_uint32))
    return cast(Callable[..., int], func)


#: The C data phase; None: the Python lane reads every PDU (also when tests set it so).
PDATA_RECEIVE = _load_pdata()

_CMD_FIELDS = {
    0x00000002: "AffectedSOPClassUID",
    0x00000100: "CommandField",
    0x00000110: "MessageID",
    0x00000700: "Priority",
    0x00000800: "CommandDataSetType",
    0x00001000: "AffectedSOPInstanceUID",
    0x00001030: "MoveOriginatorApplicationEntityTitle",
    0x00001031: "MoveOriginatorMessageID",
}
_US_FIELDS = frozenset({"CommandField", "MessageID", "Priority", "CommandDataSetType"})
_US_FIELDS |= {"MoveOriginatorMessageID"}


def parse_command(raw: bytes) -> dict[str, Any]:
    """The fields of an Implicit VR Little Endian command set this lane needs.

    Raises ValueError on a malformed set (the caller then lets pynetdicom decide)."""
    out: dict[str, Any] = {}
    view, offset = memoryview(raw), 0
    while offset < len(raw):
        if offset + 8 > len(raw):
            raise ValueError("truncated command element")
        group, element, length = struct.unpack_from("<HHI", view, offset)
        offset += 8
        value = bytes(view[offset : offset + length])
        if len(value) != length:
            raise ValueError("truncated command value")
        offset += length
        name = _CMD_FIELDS.get((group << 16) | element)
        if name in _US_FIELDS:
            if length != 2:
                raise ValueError(f"{name} is not a US")
            out[name] = struct.unpack("<H", value)[0]
        elif name is not None:
            out[name] = value.rstrip(b"\x00 ").decode("ascii")
    return out


def _request(fields: dict[str, Any]) -> C_STORE:
    """The C-STORE request primitive (pynetdicom validates each value as it is set)."""
    request = C_STORE()
    request.MessageID = fields["MessageID"]
    request.AffectedSOPClassUID = fields["AffectedSOPClassUID"]
    request.AffectedSOPInstanceUID = fields["AffectedSOPInstanceUID"]
    request.Priority = fields.get("Priority", 0)
    if fields.get("MoveOriginatorApplicationEntityTitle"):
        request.MoveOriginatorApplicationEntityTitle = fields[
            "MoveOriginatorApplicationEntityTitle"
        ]
    if "MoveOriginatorMessageID" in fields:
        request.MoveOriginatorMessageID = fields["MoveOriginatorMessageID"]
    return request


def response_pdu(context_id: int, command: bytes) -> bytes:
    """A P-DATA-TF PDU with one PDV: the last (only) fragment of a command (PS3.8 9.3.5)."""
    item = struct.pack(">IBB", len(command) + 2, context_id, 0x03) + command
    return struct.pack(">BBI", P_DATA_TF, 0, len(item)) + item


class ArrivedDataSet(BytesIO):
    """A data set the C data phase wrote straight into a spool file (``path``, still open
    as ``fd``, Part 10 ``header`` first), read through a memory map. The handler commits
    that file (:meth:`gateway.spool.Spool.commit`) instead of writing the bytes again.

    Reads like the ``BytesIO`` pynetdicom puts in ``C_STORE.DataSet`` (``getvalue``,
    ``getbuffer``, ``read``/``seek``/``tell`` for ``Event.dataset``) without a copy of the
    data set in memory; the buffer of ``getbuffer`` is valid while the handler runs."""

    def __init__(self, mapped: mmap.mmap, path: Path, fd: int, header: bytes) -> None:
        super().__init__()
        self._mapped = mapped
        self._start = len(header)
        self._pos = 0
        self.path, self.fd, self.header = path, fd, header

    def getbuffer(self) -> memoryview:  # type: ignore[override]
        return memoryview(self._mapped)[self._start :]

    def getvalue(self) -> bytes:
        return self._mapped[self._start :]

    def read(self, size: int | None = -1) -> bytes:
        start = self._start + self._pos
        end = len(self._mapped) if size is None or size < 0 else start + size
        data = self._mapped[start:end]
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos}.get(whence)
        if base is None:  # SEEK_END
            base = len(self._mapped) - self._start
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


class StoreLane:
    """Per association: reassemble P-DATA PDVs and serve plain C-STOREs in the DUL thread.

    With ``incoming`` (spool files to write into) and gateway/_pdata.c built, the data set
    of each such C-STORE on a plain (non-TLS) connection is read by C, which writes it into
    a spool file as it arrives (:meth:`_serve_direct`).
    """

    def __init__(self, assoc: Association, incoming: IncomingFiles | None = None) -> None:
        self.assoc = assoc
        self.dul: DULServiceProvider = assoc.dul
        self._incoming = incoming
        self._chunk: bytearray | None = None  # the C data phase's buffer
        self._reset()

    def install(self) -> None:
        """Route this association's PDU reads through :meth:`read_pdu`."""
        self.dul._read_pdu_data = self.read_pdu  # type: ignore[method-assign]

    def _reset(self) -> None:
        self._pdvs: list[tuple[int, memoryview]] = []
        self._command: list[memoryview] = []
        self._data: list[memoryview] = []
        self._fields: dict[str, Any] | None = None

    # -- the DUL's read, with the lane for P-DATA-TF -----------------------------------------
    def read_pdu(self) -> None:
        """pynetdicom 3.0's ``DULServiceProvider._read_pdu_data`` (same events on errors),
        except that P-DATA-TF PDUs in Sta6 go to :meth:`feed`."""
        dul = self.dul
        sock = cast(Any, dul.socket)
        try:
            header = sock.recv(6)
            if len(header) < 6:
                raise ConnectionError("short PDU header")
            pdu_type, _, length = struct.unpack(">BBL", header)
        except (OSError, TimeoutError, ConnectionError, struct.error):
            dul.event_queue.put("Evt17")  # transport connection closed
            return
        if pdu_type not in _PDU_TYPES:
            log.error("unknown PDU type received 0x%02X", pdu_type)
            dul.event_queue.put("Evt19")
            return
        try:
            body = sock.recv(length)
        except (OSError, TimeoutError):
            dul.event_queue.put("Evt17")
            return
        if len(body) != length:
            log.error("received PDU shorter than its length (%d of %d)", len(body), length)
            dul.event_queue.put("Evt17")
            return
        if (
            pdu_type == P_DATA_TF
            and dul.state_machine.current_state == "Sta6"
            and self.assoc.is_established
        ):
            self.feed(body)
            return
        try:
            pdu, event = dul._decode_pdu(header + body)
        except Exception:
            log.exception("unable to decode the received PDU")
            dul.event_queue.put("Evt19")
            return
        dul.event_queue.put(event)
        dul._recv_pdu.put(pdu)

    # -- reassembly ----------------------------------------------------------------------------
    def feed(self, body: bytearray) -> None:
        """The PDVs of one P-DATA-TF PDU (views into ``body``, not copies)."""
        view = memoryview(body)
        pdvs: list[tuple[int, memoryview]] = []
        offset = 0
        while offset < len(body):
            if offset + 6 > len(body):
                self._invalid()
                return
            item_length, context_id = struct.unpack_from(">IB", view, offset)
            end = offset + 4 + item_length
            if item_length < 2 or end > len(body):
                self._invalid()
                return
            pdvs.append((context_id, view[offset + 5 : end]))
            offset = end
        if self.assoc.dimse.message is not None:  # pynetdicom owns the current message
            self._to_pynetdicom(pdvs)
            return
        for i, (context_id, pdv) in enumerate(pdvs):
            self._pdvs.append((context_id, pdv))
            control = pdv[0]
            if control & 1:  # a command fragment
                self._command.append(pdv[1:])
                if control & 2 and not self._command_complete():
                    self._hand_over(pdvs[i + 1 :])  # C-ECHO, deflated, malformed, ...
                    return
                if control & 2 and i == len(pdvs) - 1 and self._serve_direct():
                    return
                continue
            if self._fields is None or context_id != self._fields["context_id"]:
                self._hand_over(pdvs[i + 1 :])  # data out of place: pynetdicom's call
                return
            self._data.append(pdv[1:])
            if control & 2:  # last data fragment: the message is complete
                self._serve()
                self._to_pynetdicom(pdvs[i + 1 :])  # anything after it in this PDU (rare)
                return

    def _command_complete(self) -> bool:
        """Parse the command; False when the lane will not serve this message."""
        try:
            fields = parse_command(b"".join(self._command))
        except (ValueError, UnicodeDecodeError):
            return False
        context_ids = {cid for cid, _ in self._pdvs}
        context_id = next(iter(context_ids))
        if (
            fields.get("CommandField") != C_STORE_RQ
            or fields.get("CommandDataSetType") == NO_DATA_SET
            or len(context_ids) != 1
            or not self._servable(context_id)
            or not fields.get("AffectedSOPClassUID")
            or not fields.get("AffectedSOPInstanceUID")
            or "MessageID" not in fields
        ):
            return False
        self._fields = {**fields, "context_id": context_id}
        return True

    def _servable(self, context_id: int) -> bool:
        assoc = self.assoc
        context = assoc._accepted_cx.get(context_id)
        if context is None or getattr(assoc, "_sent_release", False):
            return False
        return not UID(context.transfer_syntax[0]).is_deflated

    def _hand_over(self, rest: list[tuple[int, memoryview]]) -> None:
        """Give everything collected (and the rest of this PDU) to pynetdicom's DIMSE."""
        pdvs = self._pdvs + rest
        self._reset()
        self._to_pynetdicom(pdvs)

    def _to_pynetdicom(self, pdvs: list[tuple[int, memoryview]]) -> None:
        if not pdvs:
            return
        primitive = P_DATA()
        primitive.presentation_data_value_list = [[cid, bytes(pdv)] for cid, pdv in pdvs]  # type: ignore[misc]
        self.assoc.dimse.receive_primitive(primitive)  # what pynetdicom's DT-2 does

    def _invalid(self, what: str = "malformed P-DATA-TF PDU") -> None:
        log.error("%s received: aborting the association", what)
        self._reset()
        self.dul.event_queue.put("Evt19")  # invalid PDU: pynetdicom aborts

    # -- serving -------------------------------------------------------------------------------
    def _serve(self) -> None:
        fields = cast(dict[str, Any], self._fields)
        data = b"".join(self._data)
        self._reset()
        self._respond(fields, BytesIO(data))

    def _direct(self) -> bool:
        """Whether the C data phase can serve this association."""
        if PDATA_RECEIVE is None or self._incoming is None:
            return False
        return not isinstance(cast(Any, self.dul.socket).socket, ssl.SSLSocket)  # TLS: no

    def _serve_direct(self) -> bool:
        """Read this C-STORE's data set in C, straight into a spool file, and answer it.
        False (nothing read) when the C data phase cannot serve it: the Python lane goes on."""
        if not self._direct():
            return False
        fields = cast(dict[str, Any], self._fields)
        context_id = int(fields["context_id"])
        syntax = self.assoc._accepted_cx[context_id].transfer_syntax[0]
        header = part10_header(
            fields["AffectedSOPClassUID"], fields["AffectedSOPInstanceUID"], syntax
        )
        incoming = cast("IncomingFiles", self._incoming)
        try:
            path, fd = incoming.take()
        except OSError:
            return False  # the handler meets the same error and answers it
        try:
            try:
                os.write(fd, header)
            except OSError:
                return False
            code, length, rest = self._receive(fd, context_id, incoming.spool.fsync)
            self._reset()
            self.dul._idle_timer.restart()  # frozen in _receive
            if code == _PDATA_WRITE:
                log.error(
                    "C-STORE refused: spool write failed (%s)",
                    errno.errorcode.get(ctypes.get_errno(), "?"),
                )
                self._send_response(fields, Status.OUT_OF_RESOURCES)
            elif code in _PDATA_TRANSPORT:
                log.error("C-STORE data set not received: %s", _PDATA_TRANSPORT[code])
                self.dul.event_queue.put("Evt17")
                return True
            elif code < 0:
                self._invalid(_PDATA_INVALID.get(code, f"C data phase code {code}"))
                return True
            else:
                with mmap.mmap(fd, len(header) + length, prot=mmap.PROT_READ) as mapped:
                    self._respond(fields, ArrivedDataSet(mapped, path, fd, header))
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)  # unless the handler committed it
        if rest:  # PDVs after the last fragment in its PDU: the rest of that PDU
            body = cast(Any, self.dul.socket).recv(rest)
            if len(body) != rest:
                self.dul.event_queue.put("Evt17")
            else:
                self.feed(body)
        return True

    def _receive(self, fd: int, context_id: int, writeback: bool) -> tuple[int, int, int]:
        """The C data phase (``pdata_receive``) into ``fd``: (code, data set length, bytes of
        the last PDU left to read)."""
        if self._chunk is None:
            self._chunk = bytearray(_CHUNK)
        buffer = (ctypes.c_char * _CHUNK).from_buffer(self._chunk)
        length, rest = ctypes.c_longlong(), ctypes.c_uint32()
        timeout = self.assoc.network_timeout
        # pynetdicom restarts the idle timer per PDU; C reads them all and applies the
        # network timeout to each read itself, so the association thread must not see the
        # timer run out meanwhile (a large object on a slow link): frozen until restarted.
        idle = self.dul._idle_timer
        idle.start()
        idle.stop()
        try:
            code = cast(Callable[..., int], PDATA_RECEIVE)(
                cast(Any, self.dul.socket).socket.fileno(),
                fd,
                context_id,
                buffer,
                _CHUNK,
                -1 if timeout is None else int(timeout * 1000),
                int(writeback),
                ctypes.byref(length),
                ctypes.byref(rest),
            )
        finally:
            del buffer
        return code, length.value, rest.value

    def _respond(self, fields: dict[str, Any], dataset: BytesIO) -> None:
        """Call the EVT_C_STORE handler with a real pynetdicom ``Event`` and answer."""
        assoc = self.assoc
        try:
            request = _request(fields)
        except (ValueError, TypeError) as exc:  # as pynetdicom: an invalid message aborts
            log.error("invalid C-STORE-RQ command set (%s)", type(exc).__name__)
            self.dul.event_queue.put("Evt19")
            return
        request.DataSet = dataset
        context = assoc._accepted_cx[int(fields["context_id"])]
        event = Event(assoc, evt.EVT_C_STORE, {"request": request, "context": context.as_tuple})
        handler, args = cast(tuple[Any, list[Any]], assoc.get_handlers(evt.EVT_C_STORE))
        try:
            status = int(handler(event, *(args or [])))
        except Exception:  # as pynetdicom: the peer gets 0xC211, the association goes on
            log.exception("exception in the EVT_C_STORE handler")
            status = HANDLER_FAILED
        self._send_response(fields, status)

    def _send_response(self, fields: dict[str, Any], status: int) -> None:
        command = c_store_rsp_command(
            fields["MessageID"],
            fields["AffectedSOPClassUID"],
            fields["AffectedSOPInstanceUID"],
            status,
        )
        cast(Any, self.dul.socket).send(response_pdu(int(fields["context_id"]), command))
