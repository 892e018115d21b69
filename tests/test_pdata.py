"""The C data phase (gateway/_pdata.c) against a peer that writes raw P-DATA-TF PDUs.

A pynetdicom SCU negotiates the association; the test then writes PDUs of its own making to
the socket (fragment sizes, several PDVs per PDU, a command after the last fragment, broken
lengths, an abort or a stall in the middle of a data set) and reads the C-STORE responses
that pynetdicom's DUL decodes. Every test checks what the spool holds afterwards, and
``running_scp`` that nothing is left in ``incoming/``.
"""

from __future__ import annotations

import queue
import struct
import subprocess
import sys
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE

from gateway.state import UnknownSeriesError
from gateway.statuses import Status
from gateway.wire import part10_header
from tests.support.data_phase import DataPhase, c_data_phase
from tests.support.pacs import wait_for
from tests.test_scp import _assoc, _series, running_scp

__all__ = ["c_data_phase"]  # fixture, imported explicitly

SYNTAX = ExplicitVRLittleEndian


def _encoded(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def pdv(context_id: int, control: int, payload: bytes) -> bytes:
    """One presentation data value item (PS3.8 9.3.5.1); control bit 0: command, 1: last."""
    return struct.pack(">IBB", len(payload) + 2, context_id, control) + payload


def pdu(*items: bytes) -> bytes:
    body = b"".join(items)
    return struct.pack(">BBI", 0x04, 0, len(body)) + body


def command(context_id: int, ds: Dataset, message_id: int) -> bytes:
    """The C-STORE-RQ command set of ``ds`` as one last command fragment (pynetdicom's)."""
    rq = C_STORE()
    rq.MessageID = message_id
    rq.AffectedSOPClassUID = CTImageStorage
    rq.AffectedSOPInstanceUID = ds.SOPInstanceUID
    rq.DataSet = BytesIO(b"")
    message = C_STORE_RQ()
    message.primitive_to_message(rq)
    _, value = next(iter(message.encode_msg(context_id, 0))).presentation_data_value_list[0]
    return pdv(context_id, value[0], value[1:])


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def data_pdvs(context_id: int, parts: list[bytes]) -> list[bytes]:
    return [pdv(context_id, 0x02 if i == len(parts) - 1 else 0x00, p) for i, p in enumerate(parts)]


class RawPeer:
    """An established association whose PDUs the test writes itself."""

    def __init__(self, port: int) -> None:
        self.assoc = _assoc(port, [(CTImageStorage, [SYNTAX])])
        assert self.assoc.is_established
        self.context_id = self.assoc.accepted_contexts[0].context_id
        self.sock = self.assoc.dul.socket.socket

    def send(self, *pdus: bytes) -> None:
        for p in pdus:
            self.sock.sendall(p)

    def status(self, timeout: float = 10.0) -> int:
        _, rsp = self.assoc.dimse.msg_queue.get(timeout=timeout)
        return int(rsp.Status)

    def no_response(self, within: float) -> bool:
        try:
            self.assoc.dimse.msg_queue.get(timeout=within)
        except queue.Empty:
            return True
        return False

    def ended(self) -> bool:
        return not self.assoc.is_established

    def close(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()


def _spooled(spool: Any, ds: Dataset) -> bytes | None:
    path = spool.input_dir(ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
    return path.read_bytes() if path.exists() else None


def _as_spooled(ds: Dataset) -> bytes:
    return part10_header(CTImageStorage, ds.SOPInstanceUID, SYNTAX) + _encoded(ds)


def test_fragments_of_any_size_and_pdus_longer_than_the_buffer_are_spooled_exactly(
    tmp_path: Path, c_data_phase: DataPhase
) -> None:
    """Small fragments, several PDVs per PDU, and one PDU of 2.5 MiB (over the 1 MiB the C
    phase copies through at a time; max_pdu 0 = no limit was negotiated)."""
    a, b = _series(n=2, size=1150)  # 2.6 MB of pixels each
    with running_scp(tmp_path, max_pdu=0) as (scp, spool, store):
        peer = RawPeer(scp.port)
        try:
            cid = peer.context_id
            data = _encoded(a)
            parts = data_pdvs(cid, [data[:7], data[7:100], *chunks(data[100:], 300_000)])
            peer.send(pdu(command(cid, a, 1)), pdu(*parts[:3]), *(pdu(p) for p in parts[3:]))
            assert peer.status() == Status.SUCCESS
            b_data = _encoded(b)
            assert len(b_data) > 2.5 * (1 << 20)
            peer.send(pdu(command(cid, b, 2)), pdu(*data_pdvs(cid, [b_data])))  # one PDU
            assert peer.status() == Status.SUCCESS
        finally:
            peer.close()
        assert _spooled(spool, a) == _as_spooled(a)
        assert _spooled(spool, b) == _as_spooled(b)
        assert store.get(a.SeriesInstanceUID).instances == 2
    assert c_data_phase.codes == [0, 0]


def test_a_command_after_the_last_fragment_in_the_same_pdu_is_served_next(
    tmp_path: Path, c_data_phase: DataPhase
) -> None:
    a, b = _series(n=2, size=64)
    with running_scp(tmp_path) as (scp, spool, _):
        peer = RawPeer(scp.port)
        try:
            cid = peer.context_id
            *head, last = data_pdvs(cid, chunks(_encoded(a), 3000))
            # The last fragment of a, then b's command, in one PDU; then b's data.
            peer.send(pdu(command(cid, a, 1)), pdu(*head), pdu(last, command(cid, b, 2)))
            peer.send(pdu(*data_pdvs(cid, [_encoded(b)])))
            assert [peer.status(), peer.status()] == [Status.SUCCESS, Status.SUCCESS]
        finally:
            peer.close()
        assert _spooled(spool, a) == _as_spooled(a)
        assert _spooled(spool, b) == _as_spooled(b)
    assert c_data_phase.codes == [0, 0]


def _abort_pdu() -> bytes:
    return struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, 0, 0)  # A-ABORT, service-user


@pytest.mark.parametrize(
    "trouble",
    ["peer closes", "pdv longer than its pdu", "command fragment in the data", "a-abort"],
)
def test_a_data_set_cut_short_is_never_spooled_and_the_gateway_goes_on(
    tmp_path: Path, c_data_phase: DataPhase, trouble: str, caplog: pytest.LogCaptureFixture
) -> None:
    ds, after = _series(n=2, size=64)
    data = _encoded(ds)
    with running_scp(tmp_path) as (scp, spool, store):
        peer = RawPeer(scp.port)
        cid = peer.context_id
        peer.send(pdu(command(cid, ds, 1)), pdu(pdv(cid, 0x00, data[:5000])))
        if trouble == "peer closes":
            peer.sock.shutdown(2)
        elif trouble == "pdv longer than its pdu":
            item = pdv(cid, 0x02, data[5000:])
            peer.send(struct.pack(">BBI", 0x04, 0, len(item) - 10) + item[:-10])
        elif trouble == "command fragment in the data":
            peer.send(pdu(pdv(cid, 0x01, data[5000:6000])))
        else:
            peer.send(_abort_pdu())
        wait_for(peer.ended, 10.0, "the association to end")
        assert _spooled(spool, ds) is None
        with pytest.raises(UnknownSeriesError):
            store.get(ds.SeriesInstanceUID)  # nothing recorded either
        # The gateway serves the next association as usual.
        again = RawPeer(scp.port)
        try:
            again.send(pdu(command(again.context_id, after, 1)))
            again.send(pdu(*data_pdvs(again.context_id, [_encoded(after)])))
            assert again.status() == Status.SUCCESS
        finally:
            again.close()
        assert _spooled(spool, after) == _as_spooled(after)
    expected = {"peer closes": -1, "pdv longer than its pdu": -5}
    expected |= {"command fragment in the data": -6, "a-abort": -3}
    assert c_data_phase.codes == [expected[trouble], 0]
    said = {
        "peer closes": "C-STORE data set not received: connection closed",
        "pdv longer than its pdu": "PDV lengths do not add up received: aborting",
        "command fragment in the data": "command fragment or another presentation context",
        "a-abort": "another PDU type in the middle of a C-STORE data set received: aborting",
    }
    assert said[trouble] in caplog.text


def test_a_stalled_data_set_ends_at_the_network_timeout(
    tmp_path: Path, c_data_phase: DataPhase
) -> None:
    (ds,) = _series(n=1, size=64)
    with running_scp(tmp_path, network_timeout_s=1.0) as (scp, spool, _):
        peer = RawPeer(scp.port)
        cid = peer.context_id
        start = time.monotonic()
        peer.send(pdu(command(cid, ds, 1)), pdu(pdv(cid, 0x00, _encoded(ds)[:5000])))
        wait_for(peer.ended, 10.0, "the gateway to drop the stalled association")
        assert 0.9 < time.monotonic() - start < 5.0
        assert _spooled(spool, ds) is None
    assert c_data_phase.codes == [-2]


def test_a_slow_data_set_outlasting_the_network_timeout_is_received(
    tmp_path: Path, c_data_phase: DataPhase
) -> None:
    """Each read comes within the 1 s network timeout, the whole data set takes 2.4 s: the
    association thread must not take the idle timer (not restarted while C reads) for a
    dead link and abort the association under the next instance."""
    ds, then = _series(n=2, size=64)
    with running_scp(tmp_path, network_timeout_s=1.0) as (scp, spool, _):
        peer = RawPeer(scp.port)
        try:
            cid = peer.context_id
            data = _encoded(ds)
            parts = data_pdvs(cid, chunks(data, -(-len(data) // 6)))  # six fragments
            assert len(parts) == 6
            peer.send(pdu(command(cid, ds, 1)))
            for part in parts:
                assert peer.no_response(within=0.4)
                peer.send(pdu(part))
            assert peer.status() == Status.SUCCESS
            # The association is still up: the next instance of the series goes through.
            peer.send(pdu(command(cid, then, 2)), pdu(*data_pdvs(cid, [_encoded(then)])))
            assert peer.status() == Status.SUCCESS
        finally:
            peer.close()
        assert _spooled(spool, ds) == _as_spooled(ds)
        assert _spooled(spool, then) == _as_spooled(then)
    assert c_data_phase.codes == [0, 0]


_WRITE_FAILS = """
import resource, signal, sys
from pathlib import Path
from gateway import store_lane
from gateway.config import GatewaySettings
from gateway.scp import StorageSCP
from gateway.spool import Spool
from gateway.state import StateStore
assert store_lane.PDATA_RECEIVE is not None, "gateway/_pdata.c was not built"
root = Path(sys.argv[1])
settings = GatewaySettings(host="127.0.0.1", port=0, spool_dir=root, free_space_floor_mb=0)
scp = StorageSCP(settings, Spool(root, free_space_floor_mb=0), StateStore(settings.state_path))
scp.start()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
print(scp.port, flush=True)
sys.stdin.read()
scp.stop()
"""


def test_a_spool_write_that_fails_mid_data_set_is_out_of_resources(tmp_path: Path) -> None:
    """A real failing write (file-size limit → EFBIG, as ENOSPC would) in a gateway
    subprocess: the whole data set is read, the peer gets 0xA700 and the association goes
    on; nothing of the failed instance stays."""
    big, small = _series(n=2, size=900)
    small.PixelData = small.PixelData[:2048]
    small.Rows, small.Columns = 32, 32
    root = tmp_path / "spool"
    gateway = subprocess.Popen(
        [sys.executable, "-c", _WRITE_FAILS, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert gateway.stdout is not None
        port = int(gateway.stdout.readline())
        peer = RawPeer(port)
        try:
            cid = peer.context_id
            peer.send(pdu(command(cid, big, 1)), *(pdu(p) for p in data_pdvs(cid, [_encoded(big)])))
            assert peer.status() == Status.OUT_OF_RESOURCES
            peer.send(pdu(command(cid, small, 2)), pdu(*data_pdvs(cid, [_encoded(small)])))
            assert peer.status() == Status.SUCCESS
        finally:
            peer.close()
    finally:
        _, stderr = gateway.communicate("", timeout=30)
    assert gateway.returncode == 0, stderr
    assert "C-STORE refused: spool write failed (EFBIG)" in stderr  # the C phase's error
    series = root / "series" / big.SeriesInstanceUID / "in"
    assert sorted(p.name for p in series.iterdir()) == [f"{small.SOPInstanceUID}.dcm"]
    assert not any((root / "incoming").iterdir())


def test_an_arrived_data_set_reads_like_pynetdicoms_bytesio(tmp_path: Path) -> None:
    """Handlers may read ``request.DataSet`` as pynetdicom fills it: whole (getvalue), as a
    buffer, or as a file (``Event.dataset`` decodes it with read/seek/tell)."""
    import mmap
    import os

    from pynetdicom.dsutils import decode

    from gateway.store_lane import ArrivedDataSet

    (ds,) = _series(n=1, size=64)
    data = _encoded(ds)
    header = part10_header(CTImageStorage, ds.SOPInstanceUID, SYNTAX)
    path = tmp_path / "arrived"
    path.write_bytes(header + data)
    fd = os.open(path, os.O_RDONLY)
    try:
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as mapped:
            arrived = ArrivedDataSet(mapped, path, fd, header)
            assert arrived.getvalue() == data and bytes(arrived.getbuffer()) == data
            assert arrived.read(10) == data[:10] and arrived.tell() == 10
            assert arrived.seek(-4, os.SEEK_END) == len(data) - 4 and arrived.read() == data[-4:]
            decoded = decode(arrived, False, True)
            assert decoded.SOPInstanceUID == ds.SOPInstanceUID
            assert decoded.PixelData == ds.PixelData
            del decoded
    finally:
        os.close(fd)
