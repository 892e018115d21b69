"""The C-STORE SCP with real peers: dcmtk echoscu/storescu (interoperability, TLS, rejections)
and pynetdicom as SCU where a test needs the exact DIMSE status."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dsutils import split_dataset

from gateway.config import CallerSettings, GatewaySettings, ScpTLS
from gateway.controls import IngestControls
from gateway.forward import sender_only
from gateway.scp import VERIFICATION as Verification
from gateway.scp import StorageSCP
from gateway.spool import INCOMING, Spool
from gateway.state import Kind, State, StateStore
from gateway.statuses import Status
from inference.dicomgen import make_ct_series
from inference.geometry import Geometry
from tests.support.data_phase import DataPhase, data_phase
from tests.support.pacs import LOCALHOST, TlsFiles, make_tls_files, wait_for

__all__ = ["data_phase"]  # fixture, imported explicitly

AET = "DEFACEGATE"


@pytest.fixture(autouse=True)
def _both_data_phases(data_phase: DataPhase) -> DataPhase:
    """Every test here runs with the C data phase and with the Python lane."""
    return data_phase


@contextmanager
def running_scp(
    tmp_path: Path, paused: Callable[[], bool] = lambda: False, **overrides: Any
) -> Iterator[tuple[StorageSCP, Spool, StateStore]]:
    settings = GatewaySettings(
        **{
            "host": LOCALHOST,
            "port": 0,
            "spool_dir": tmp_path / "spool",
            "free_space_floor_mb": 0,
            "acse_timeout_s": 5,
            **overrides,
        }
    )
    spool = Spool(settings.spool_dir, free_space_floor_mb=settings.free_space_floor_mb)
    store = StateStore(settings.state_path)
    scp = StorageSCP(settings, spool, store, paused=paused)
    scp.start()
    try:
        yield scp, spool, store
    finally:
        scp.stop()
    # Nothing is left behind in incoming/: committed, removed, or an unused made-ahead file.
    incoming = spool.root / INCOMING
    wait_for(lambda: not any(incoming.iterdir()), 5.0, "incoming/ to be empty")


def _series(n: int = 4, size: int = 16) -> list[Dataset]:
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1500, size=(n, size, size)).astype(np.float32)
    geometry = Geometry(affine=np.diag([2.0, 0.5, 0.5, 1.0]), shape=hu.shape)
    header = Dataset()
    header.PatientName = "DOE^JANE"
    header.PatientID = "MRN-0042"
    return make_ct_series(hu, geometry, header=header)


def _write(datasets: list[Dataset], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = directory / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def _echoscu(port: int, *extra: str, calling: str = "ECHOSCU", called: str = AET) -> Any:
    return _run(["echoscu", "-aet", calling, "-aec", called, *extra, LOCALHOST, str(port)])


def _assoc(port: int, contexts: list[tuple[str, list[str]]], calling: str = "PYSCU") -> Any:
    ae = AE(ae_title=calling)
    for sop, syntaxes in contexts:
        ae.add_requested_context(sop, syntaxes)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate(LOCALHOST, port, ae_title=AET)
    if assoc.is_established:
        sender_only(assoc)  # pynetdicom's reactor could otherwise take a response (forward.py)
    return assoc


def test_echo_and_store_with_dcmtk(tmp_path: Path, data_phase: DataPhase) -> None:
    datasets = _series()
    paths = _write(datasets, tmp_path / "in")
    with running_scp(tmp_path) as (scp, spool, store):
        assert _echoscu(scp.port).returncode == 0
        done = _run(
            ["storescu", "-aet", "CT1", "-aec", AET, LOCALHOST, str(scp.port), *map(str, paths)]
        )
        assert done.returncode == 0, done.stderr
        series_uid = datasets[0].SeriesInstanceUID
        spooled = spool.instance_paths(series_uid)
        assert sorted(p.stem for p in spooled) == sorted(ds.SOPInstanceUID for ds in datasets)
        rec = store.get(series_uid)
        assert (rec.state, rec.instances, rec.kind) == (State.RECEIVED, 4, Kind.CT)
        for ds in datasets:
            got = dcmread(spool.input_dir(series_uid) / f"{ds.SOPInstanceUID}.dcm")
            assert got.PixelData == ds.PixelData and got.PatientName == "DOE^JANE"
        # Sending the same series again is idempotent.
        again = _run(["storescu", "-aec", AET, LOCALHOST, str(scp.port), *map(str, paths)])
        assert again.returncode == 0
        assert store.get(series_uid).instances == 4 and len(spool.instance_paths(series_uid)) == 4
    # Which data phase read the eight data sets: C (each call returned 0) or the Python lane.
    assert data_phase.codes == ([0] * 8 if data_phase.name == "c" else [])


def _to_syntax(src: Path, dst: Path, syntax: str) -> None:
    """Re-encode one file with dcmtk (deflate, implicit VR, JPEG lossless) or pydicom."""
    tools: dict[str, list[str]] = {
        ImplicitVRLittleEndian: ["dcmconv", "+ti"],
        DeflatedExplicitVRLittleEndian: ["dcmconv", "+td"],
        JPEGLosslessSV1: ["dcmcjpeg", "+e1"],
    }
    if syntax in tools:
        done = _run([*tools[syntax], str(src), str(dst)])
        assert done.returncode == 0, done.stderr
        return
    ds = dcmread(src)
    if syntax != ds.file_meta.TransferSyntaxUID:
        ds.compress(syntax)
    ds.save_as(dst, enforce_file_format=True)


PROPOSE: dict[str, str] = {
    ImplicitVRLittleEndian: "-xi",
    ExplicitVRLittleEndian: "-xe",
    DeflatedExplicitVRLittleEndian: "-xd",
    JPEG2000Lossless: "-xv",
    JPEGLSLossless: "-xt",
    JPEGLosslessSV1: "-xs",
    RLELossless: "-xr",
}


@pytest.mark.parametrize(
    "syntax",
    [
        ImplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGLSLossless,
        JPEGLosslessSV1,
        RLELossless,
    ],
    ids=lambda s: s.name,
)
def test_transfer_syntaxes_are_spooled_byte_for_byte_as_sent(tmp_path: Path, syntax: str) -> None:
    (ds,) = _series(n=1, size=64)  # JPEG 2000's default resolution levels need ≥ 64 px
    plain = _write([ds], tmp_path / "plain")[0]
    encoded = tmp_path / "encoded.dcm"
    _to_syntax(plain, encoded, syntax)
    with running_scp(tmp_path) as (scp, spool, _):
        # Propose the file's own transfer syntax first, so storescu sends it unconverted.
        propose = PROPOSE[syntax]
        done = _run(["storescu", "-aec", AET, propose, LOCALHOST, str(scp.port), str(encoded)])
        assert done.returncode == 0, done.stderr
        (path,) = spool.instance_paths(ds.SeriesInstanceUID)
    got = dcmread(path)
    assert got.file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(got.pixel_array, ds.pixel_array)
    # The dataset part is exactly what the sender encoded (no decode/re-encode on ingest).
    sent = dcmread(encoded)
    assert got.SOPInstanceUID == sent.SOPInstanceUID
    if syntax != DeflatedExplicitVRLittleEndian:
        assert got.PixelData == sent.PixelData


def test_calling_ae_allow_list_bound_to_ip_and_called_ae(tmp_path: Path) -> None:
    callers = [
        CallerSettings(ae_title="GOOD", host=None),
        CallerSettings(ae_title="PINNED", host="10.255.255.1"),
    ]
    with running_scp(tmp_path, allowed_callers=callers) as (scp, _, _):
        assert _echoscu(scp.port, calling="GOOD").returncode == 0
        bad = _echoscu(scp.port, calling="EVIL")
        assert bad.returncode != 0 and "Calling AE Title Not Recognized" in bad.stderr
        pinned = _echoscu(scp.port, calling="PINNED")  # right AE, wrong source address
        assert pinned.returncode != 0 and "Calling AE Title Not Recognized" in pinned.stderr
        wrong = _echoscu(scp.port, calling="GOOD", called="OTHER")
        assert wrong.returncode != 0 and "Called AE Title Not Recognized" in wrong.stderr
        assert "Rejected Permanent" in wrong.stderr


def test_max_associations_rejects_transient_local_limit(tmp_path: Path) -> None:
    with running_scp(tmp_path, max_associations=1) as (scp, _, _):
        first = _assoc(scp.port, [(Verification, [ExplicitVRLittleEndian])])
        assert first.is_established
        try:
            second = _assoc(scp.port, [(Verification, [ExplicitVRLittleEndian])])
            assert second.is_rejected
            rj = second.acceptor.primitive
            assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
        finally:
            first.release()


def test_accepted_sockets_have_tcp_nodelay(tmp_path: Path) -> None:
    with running_scp(tmp_path) as (scp, _, _):
        assoc = _assoc(scp.port, [(Verification, [ExplicitVRLittleEndian])])
        try:
            (server_side,) = scp.server.active_associations
            assoc_socket = server_side.dul.socket
            assert assoc_socket is not None and assoc_socket.socket is not None
            sock = assoc_socket.socket
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            assoc.release()


def _store_status(port: int, dataset: Dataset | Path, sop_class: str = CTImageStorage) -> int:
    assoc = _assoc(port, [(sop_class, [ExplicitVRLittleEndian])])
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(dataset).Status)
    finally:
        assoc.release()


def test_undecodable_and_incomplete_datasets_get_error_statuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Let the SCU send a file's bytes without decoding them (pynetdicom's option).
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    (ds,) = _series(n=1)
    good = _write([ds], tmp_path / "in")[0]
    # Valid file meta, garbage dataset: pynetdicom sends the bytes as they are.
    broken = tmp_path / "broken.dcm"
    raw = good.read_bytes()
    _, meta_end = split_dataset(good)  # where the dataset starts after the file meta
    # An undefined-length sequence that never ends: pydicom cannot decode it.
    garbage = b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff" + b"\x01" * 30
    broken.write_bytes(raw[:meta_end] + garbage)
    missing = _series(n=1)[0]
    del missing.SeriesInstanceUID
    with running_scp(tmp_path) as (scp, spool, _):
        assert _store_status(scp.port, broken) == Status.CANNOT_UNDERSTAND
        assert _store_status(scp.port, missing) == Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
        assert list(spool.series_on_disk()) == []
        assert _store_status(scp.port, good) == Status.SUCCESS


def test_free_space_floor_gives_out_of_resources(tmp_path: Path) -> None:
    (ds,) = _series(n=1)
    floor = shutil.disk_usage(tmp_path).free // (1024 * 1024) + 1024
    with running_scp(tmp_path, free_space_floor_mb=floor) as (scp, spool, _):
        assert _store_status(scp.port, ds) == Status.OUT_OF_RESOURCES
        assert spool.instance_paths(ds.SeriesInstanceUID) == []


def test_backpressure_refuses_new_series_but_completes_pending_ones(tmp_path: Path) -> None:
    first, second = _series(n=2), _series(n=1)
    with running_scp(tmp_path, max_pending_series=1) as (scp, spool, store):
        assert _store_status(scp.port, first[0]) == Status.SUCCESS
        assert _store_status(scp.port, second[0]) == Status.OUT_OF_RESOURCES
        assert _store_status(scp.port, first[1]) == Status.SUCCESS
        assert store.get(first[0].SeriesInstanceUID).instances == 2
        assert spool.instance_paths(second[0].SeriesInstanceUID) == []


def test_secondary_capture_accepted_as_other_and_unlisted_classes_not_negotiated(
    tmp_path: Path,
) -> None:
    (sc,) = _series(n=1)
    sc.SOPClassUID = SecondaryCaptureImageStorage
    sc.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    sc.SeriesInstanceUID = generate_uid()
    with running_scp(tmp_path) as (scp, _, store):
        assert _store_status(scp.port, sc, SecondaryCaptureImageStorage) == Status.SUCCESS
        assert store.get(sc.SeriesInstanceUID).kind is Kind.OTHER
        assoc = _assoc(scp.port, [(MRImageStorage, [ExplicitVRLittleEndian])])
        assert not assoc.is_established or not assoc.accepted_contexts
        if assoc.is_established:
            assoc.release()


def test_tls_port_accepts_tls_and_refuses_plain_and_certless(
    tmp_path: Path, data_phase: DataPhase
) -> None:
    tls: TlsFiles = make_tls_files(tmp_path / "tls")
    settings = ScpTLS(
        cert_file=tls.server_cert,
        key_file=tls.server_key,
        ca_file=tls.ca_cert,
        require_client_cert=True,
    )
    client = ["+tls", str(tls.client_key), str(tls.client_cert), "+cf", str(tls.ca_cert)]
    with running_scp(tmp_path, tls=settings) as (scp, spool, _):
        ok = _echoscu(scp.port, *client)
        assert ok.returncode == 0, ok.stderr
        assert _echoscu(scp.port).returncode != 0  # plain DICOM on the TLS port
        anonymous = _echoscu(scp.port, "+tla", "+cf", str(tls.ca_cert))  # TLS, no client cert
        assert anonymous.returncode != 0
        # A store over TLS lands in the spool.
        datasets = _series(n=1)
        path = _write(datasets, tmp_path / "in")[0]
        done = _run(["storescu", *client, "-aec", AET, LOCALHOST, str(scp.port), str(path)])
        assert done.returncode == 0, done.stderr
        assert len(spool.instance_paths(datasets[0].SeriesInstanceUID)) == 1
    assert data_phase.codes == []  # over TLS the socket's bytes are not PDUs: never C


def test_paused_ingest_refuses_associations_transiently(tmp_path: Path) -> None:
    controls = IngestControls(tmp_path / "controls.db")
    with running_scp(tmp_path, paused=lambda: controls.paused) as (scp, _, _):
        assert _echoscu(scp.port).returncode == 0
        controls.pause()
        refused = _assoc(scp.port, [(Verification, [ExplicitVRLittleEndian])])
        assert refused.is_rejected
        rj = refused.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
        controls.resume()
        assert _echoscu(scp.port).returncode == 0


def _thread_cpu_s(native_id: int | None) -> float:
    assert native_id is not None
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_association_blocks_instead_of_polling_and_releases_promptly(
    tmp_path: Path,
) -> None:
    """The accepted association waits on its socket/queues (no 1 ms polling loop), yet
    still answers a release at once."""
    with running_scp(tmp_path) as (scp, _, _):
        assoc = _assoc(scp.port, [(Verification, [ExplicitVRLittleEndian])])
        assert assoc.is_established
        (server_side,) = scp.server.active_associations
        threads = (server_side.native_id, server_side.dul.native_id)
        before = sum(_thread_cpu_s(t) for t in threads)
        time.sleep(1.0)
        idle_cpu = sum(_thread_cpu_s(t) for t in threads) - before
        # pynetdicom's own 1 ms polling costs ~0.03 s here, a busy loop ~1 s
        assert idle_cpu < 0.025, f"idle association used {idle_cpu:.2f} s CPU in 1 s"
        assert assoc.send_c_echo().Status == Status.SUCCESS
        start = time.monotonic()
        assoc.release()
        assert assoc.is_released
        server_side.join(timeout=5)
        assert not server_side.is_alive() and time.monotonic() - start < 1.0
        assert server_side.dul.socket._wake_r.fileno() == -1  # wake-up pair closed


@pytest.mark.parametrize("max_pdu", [16384, 0])  # many PDUs per instance / one per instance
def test_instances_larger_than_socket_reads_arrive_whole(
    tmp_path: Path, max_pdu: int, data_phase: DataPhase
) -> None:
    datasets = _series(n=6, size=256)  # 128 KiB of pixels each: many recv() per PDU
    paths = _write(datasets, tmp_path / "in")
    with running_scp(tmp_path, max_pdu=max_pdu) as (scp, spool, store):
        done = _run(
            ["storescu", "-aet", "CT1", "-aec", AET, LOCALHOST, str(scp.port), *map(str, paths)]
        )
        assert done.returncode == 0, done.stderr
        series_uid = datasets[0].SeriesInstanceUID
        assert store.get(series_uid).instances == len(datasets)
        for ds in datasets:
            got = dcmread(spool.input_dir(series_uid) / f"{ds.SOPInstanceUID}.dcm")
            assert got.PixelData == ds.PixelData
    assert len(data_phase.codes) == (len(datasets) if data_phase.name == "c" else 0)


@pytest.fixture
def pynetdicom_store_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Spy on pynetdicom's own C-STORE service: which SOP instances went through it."""
    from pynetdicom.service_class import StorageServiceClass

    calls: list[str] = []
    original = StorageServiceClass.SCP

    def spy(self: StorageServiceClass, req: Any, context: Any) -> None:
        calls.append(str(req.AffectedSOPInstanceUID))
        original(self, req, context)

    monkeypatch.setattr(StorageServiceClass, "SCP", spy)
    return calls


def test_store_lane_serves_plain_stores_and_leaves_the_rest_to_pynetdicom(
    tmp_path: Path, pynetdicom_store_calls: list[str]
) -> None:
    datasets = _series(n=3, size=64)
    paths = _write(datasets, tmp_path / "in")
    deflated = tmp_path / "deflated.dcm"
    (extra,) = _series(n=1, size=64)
    _to_syntax(_write([extra], tmp_path / "plain")[0], deflated, DeflatedExplicitVRLittleEndian)
    with running_scp(tmp_path) as (scp, spool, store):
        done = _run(["storescu", "-aec", AET, LOCALHOST, str(scp.port), *map(str, paths)])
        assert done.returncode == 0, done.stderr
        assert pynetdicom_store_calls == []  # every plain store took the lane
        # Deflate is inflated by pynetdicom: that store goes its way, and succeeds.
        propose = PROPOSE[DeflatedExplicitVRLittleEndian]
        done = _run(["storescu", "-aec", AET, propose, LOCALHOST, str(scp.port), str(deflated)])
        assert done.returncode == 0, done.stderr
        assert pynetdicom_store_calls == [extra.SOPInstanceUID]
        # Echo, store, echo, error store, store on one association: lane and pynetdicom
        # take turns without losing a message.
        more = _series(n=2, size=64)
        for ds in more:
            ds.SeriesInstanceUID = datasets[0].SeriesInstanceUID
        broken = _series(n=1, size=64)[0]
        broken.SOPInstanceUID = generate_uid()
        del broken.SeriesInstanceUID  # → 0xA900 from the gateway's handler, via the lane
        assoc = _assoc(
            scp.port,
            [(Verification, [ExplicitVRLittleEndian]), (CTImageStorage, [ExplicitVRLittleEndian])],
        )
        try:
            assert assoc.send_c_echo().Status == 0
            assert assoc.send_c_store(more[0]).Status == Status.SUCCESS
            assert assoc.send_c_echo().Status == 0
            assert assoc.send_c_store(broken).Status == Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
            assert assoc.send_c_store(more[1]).Status == Status.SUCCESS
        finally:
            assoc.release()
        assert pynetdicom_store_calls == [extra.SOPInstanceUID]
        series_uid = datasets[0].SeriesInstanceUID
        assert store.get(series_uid).instances == 5
        for ds in [*datasets, *more]:
            got = dcmread(spool.input_dir(series_uid) / f"{ds.SOPInstanceUID}.dcm")
            assert got.PixelData == ds.PixelData


def test_store_lane_steps_aside_when_pynetdicom_logs_at_debug(
    tmp_path: Path, pynetdicom_store_calls: list[str]
) -> None:
    import logging

    (ds,) = _series(n=1, size=32)
    logger = logging.getLogger("pynetdicom")
    level = logger.level
    logger.setLevel(logging.DEBUG)  # its standard handlers stay bound: they see every PDU
    try:
        with running_scp(tmp_path) as (scp, spool, _):
            assert _store_status(scp.port, ds) == Status.SUCCESS
    finally:
        logger.setLevel(level)
    assert pynetdicom_store_calls == [ds.SOPInstanceUID]
    assert len(spool.instance_paths(ds.SeriesInstanceUID)) == 1


def test_malloc_tuning_applies_on_glibc() -> None:
    import platform

    from gateway.malloc import tune_for_ingest

    assert tune_for_ingest() is (platform.libc_ver()[0] == "glibc")
