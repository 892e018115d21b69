"""gateway.forward against real peers: Orthanc, dcmtk storescp and a pynetdicom SCP."""

from __future__ import annotations

import collections
import io
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from gateway.config import Destination, DestinationTLS, ForwardSettings
from gateway.forward import (
    ForwardResult,
    PermanentForwardError,
    StoreStatus,
    TransientForwardError,
    backoff_delays,
    classify_status,
    destination_key,
    forward_series,
    sender_only,
)
from inference.dicomgen import make_ct_series
from inference.geometry import Geometry
from tests.support.pacs import (
    LOCALHOST,
    Orthanc,
    StoreSCP,
    TlsFiles,
    free_port,
    orthanc,
    storescp,
    tls_files,
)

__all__ = ["orthanc", "storescp", "tls_files"]  # fixtures, imported explicitly

FAST = ForwardSettings.model_validate(
    {
        "retries": 1,
        "connect_timeout_s": 3,
        "acse_timeout_s": 5,
        "dimse_timeout_s": 5,
        "network_timeout_s": 10,
    }
)


def write_series(
    directory: Path, n: int = 5, transfer_syntax: str = ExplicitVRLittleEndian
) -> list[Path]:
    """A small CT series on disk (n slices of 32×32), as the pipeline leaves it in the spool."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1500, size=(n, 32, 32)).astype(np.float64)
    geometry = Geometry(affine=np.diag([2.0, 0.5, 0.5, 1.0]), shape=(n, 32, 32))
    paths = []
    for k, ds in enumerate(make_ct_series(hu, geometry, transfer_syntax=transfer_syntax)):
        path = directory / f"{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def sop_uids(paths: list[Path]) -> set[str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def dest(ae: str, port: int, tls: DestinationTLS | None = None) -> Destination:
    return Destination(ae_title=ae, host=LOCALHOST, port=port, tls=tls)


# --------------------------------------------------------------------------------------------
# pure helpers


def test_backoff_delays_double_and_cap() -> None:
    assert backoff_delays(0, 5, 300) == []
    assert backoff_delays(4, 5, 300) == [5, 10, 20, 40]
    assert backoff_delays(8, 5, 60) == [5, 10, 20, 40, 60, 60, 60, 60]
    with pytest.raises(ValueError):
        backoff_delays(-1, 5, 60)
    with pytest.raises(ValueError):
        backoff_delays(3, 0, 60)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (0x0000, "confirmed"),
        (0xB000, "confirmed"),
        (0xB006, "confirmed"),
        (0xB007, "confirmed"),
        (0xA700, "transient"),
        (0xA7FF, "transient"),
        (0x0213, "transient"),
        (0x0110, "transient"),
        (0xFE00, "transient"),
        (0xA900, "permanent"),
        (0xC000, "permanent"),
        (0x0122, "permanent"),
        (0x0124, "permanent"),
        (0x0117, "permanent"),
        (0xDEAD, "permanent"),
    ],
)
def test_classify_status(status: int, outcome: str) -> None:
    assert classify_status(status) == outcome


# --------------------------------------------------------------------------------------------
# real Orthanc


def test_forward_to_orthanc_confirms_every_instance(tmp_path: Path, orthanc: Orthanc) -> None:
    paths = write_series(tmp_path / "series")
    result = forward_series(paths, dest("ORTHANC", orthanc.dicom_port), FAST)
    assert isinstance(result, ForwardResult)
    assert result.confirmed == sop_uids(paths)
    assert result.sent == len(paths)
    assert result.warnings == ()
    assert orthanc.instance_count() == len(paths)
    stored = {str(orthanc.instance_tags(i)["SOPInstanceUID"]) for i in orthanc.instances()}
    assert stored == sop_uids(paths)
    # The pixel data arrived byte for byte.
    sent = {str(dcmread(p).SOPInstanceUID): dcmread(p).PixelData for p in paths}
    for data in orthanc.files():
        ds = dcmread(io.BytesIO(data))
        assert ds.PixelData == sent[str(ds.SOPInstanceUID)]


def test_skip_sends_only_unconfirmed_instances(tmp_path: Path, orthanc: Orthanc) -> None:
    paths = write_series(tmp_path / "series")
    already = sop_uids(paths[:3])
    result = forward_series(paths, dest("ORTHANC", orthanc.dicom_port), FAST, skip=already)
    assert result.sent == 2
    assert result.confirmed == sop_uids(paths)
    assert orthanc.instance_count() == 2
    assert orthanc.received_stores() == dict.fromkeys(sop_uids(paths[3:]), 1)
    # Nothing left to send: no association at all, everything confirmed.
    again = forward_series(paths, dest("ORTHANC", 1), FAST, skip=sop_uids(paths))
    assert again.sent == 0 and again.confirmed == sop_uids(paths)


def test_compressed_series_is_forwarded_in_its_transfer_syntax(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    paths = write_series(tmp_path / "series", n=3, transfer_syntax=JPEG2000Lossless)
    forward_series(paths, dest("ORTHANC", orthanc.dicom_port), FAST)
    for data in orthanc.files():
        ds = dcmread(io.BytesIO(data))
        assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless


def test_destination_down_is_transient(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "series", n=2)
    with pytest.raises(TransientForwardError) as info:
        forward_series(paths, dest("ORTHANC", free_port()), FAST)
    assert info.value.confirmed == frozenset()
    assert "ORTHANC@127.0.0.1" in str(info.value)


def test_destination_down_then_up_arrives(tmp_path: Path) -> None:
    """The retry loop a forward task runs: transient failures, then success once it is up."""
    paths = write_series(tmp_path / "series", n=3)
    pacs = Orthanc(tmp_path / "orthanc")
    settings = FAST.model_copy(update={"retries": 3, "backoff_base_s": 0.1})
    outcomes: list[str] = []
    try:
        for attempt, _delay in enumerate([0.0, *backoff_delays(3, 0.1, 1.0)]):
            if attempt == 2:
                pacs.start()
            try:
                forward_series(paths, dest("ORTHANC", pacs.dicom_port), settings)
            except TransientForwardError:
                outcomes.append("transient")
                continue
            outcomes.append("ok")
            break
        assert outcomes == ["transient", "transient", "ok"]
        assert pacs.instance_count() == 3
    finally:
        pacs.stop()


def test_wrong_called_ae_is_permanent(tmp_path: Path, orthanc: Orthanc) -> None:
    paths = write_series(tmp_path / "series", n=2)
    with pytest.raises(PermanentForwardError, match="Called AE title not recognised"):
        forward_series(paths, dest("NOTORTHANC", orthanc.dicom_port), FAST)
    assert orthanc.instance_count() == 0


def test_orthanc_restricted_to_known_modalities_rejects_then_accepts_after_fix(
    tmp_path: Path,
) -> None:
    """A PACS that only knows listed AEs rejects the association permanently; once the
    gateway's AE is declared there, the same call succeeds."""
    paths = write_series(tmp_path / "series", n=3)
    restricted = {"DicomAlwaysAllowEcho": False, "DicomAlwaysAllowStore": False}
    with Orthanc(tmp_path / "orthanc", config=restricted) as pacs:
        pacs.start()
        with pytest.raises(PermanentForwardError, match="Calling AE title not recognised"):
            forward_series(paths, dest("ORTHANC", pacs.dicom_port), FAST)
        assert pacs.instance_count() == 0
        pacs.allow_modality(FAST.calling_ae_title)
        pacs.restart()
        result = forward_series(paths, dest("ORTHANC", pacs.dicom_port), FAST)
        assert result.confirmed == sop_uids(paths)
        assert pacs.instance_count() == 3


def test_orthanc_refusing_store_for_unknown_ae_is_transient(tmp_path: Path) -> None:
    """Orthanc answers an unauthorised C-STORE by aborting the association (no status):
    indistinguishable from a crash, so it is retried and dead-lettered after the retries."""
    paths = write_series(tmp_path / "series", n=2)
    with Orthanc(tmp_path / "orthanc", config={"DicomAlwaysAllowStore": False}) as pacs:
        pacs.start()
        with pytest.raises(TransientForwardError, match="no C-STORE response"):
            forward_series(paths, dest("ORTHANC", pacs.dicom_port), FAST)
        assert pacs.instance_count() == 0


# --------------------------------------------------------------------------------------------
# real dcmtk storescp


def test_forward_to_storescp(tmp_path: Path, storescp: StoreSCP) -> None:
    paths = write_series(tmp_path / "series")
    result = forward_series(paths, dest("STORESCP", storescp.port), FAST)
    assert result.confirmed == sop_uids(paths)
    assert sop_uids(storescp.received()) == sop_uids(paths)


def test_reactor_never_takes_the_response_the_sender_waits_for(
    tmp_path: Path, storescp: StoreSCP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pynetdicom's requestor reactor polls the DIMSE queue, and its pause handshake with
    send_c_store can race: the reactor then drops the C-STORE-RSP the sender waits for (seen
    in a fresh-clone test run: a 60 s DIMSE timeout and a duplicate store). A message put on
    the queue of a live association is taken by the unguarded reactor within milliseconds;
    with sender_only it stays for the sender's blocking get."""
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage)
    for guarded in (False, True):
        assoc = ae.associate(LOCALHOST, storescp.port, ae_title=storescp.aet)
        assert assoc.is_established
        try:
            if guarded:
                sender_only(assoc)
            item = (1, C_STORE())
            assoc.dimse.msg_queue.put(item)  # type: ignore[arg-type]
            time.sleep(0.2)  # the reactor polls every millisecond
            assert assoc.dimse.msg_queue.qsize() == (1 if guarded else 0)
            if guarded:
                assert assoc.dimse.get_msg(block=True) == item
        finally:
            assoc.release()

    guarded_associations: list[object] = []
    monkeypatch.setattr("gateway.forward.sender_only", guarded_associations.append)
    forward_series(write_series(tmp_path / "series"), dest("STORESCP", storescp.port), FAST)
    assert len(guarded_associations) == 1  # the forwarder guards its association


def test_storescp_refusing_the_sop_class_is_permanent(tmp_path: Path) -> None:
    profile = tmp_path / "storescp.cfg"
    profile.write_text(
        "[[TransferSyntaxes]]\n[Uncompressed]\nTransferSyntax1 = LocalEndianExplicit\n"
        "TransferSyntax2 = LittleEndianImplicit\n\n"
        "[[PresentationContexts]]\n[OnlyMR]\nPresentationContext1 = MRImageStorage\\Uncompressed\n"
        "PresentationContext2 = VerificationSOPClass\\Uncompressed\n\n"
        "[[Profiles]]\n[OnlyMR]\nPresentationContexts = OnlyMR\n"
    )
    paths = write_series(tmp_path / "series", n=2)
    with StoreSCP(tmp_path / "scp", extra_args=["-xf", str(profile), "OnlyMR"]) as scp:
        scp.start()
        with pytest.raises(PermanentForwardError, match="none of the presentation contexts"):
            forward_series(paths, dest("STORESCP", scp.port), FAST)
        assert scp.received() == []


# --------------------------------------------------------------------------------------------
# TLS


def tls_dest(port: int, tls: TlsFiles, ae: str, client_cert: bool = True) -> Destination:
    return dest(
        ae,
        port,
        DestinationTLS(
            ca_file=tls.ca_cert,
            cert_file=tls.client_cert if client_cert else None,
            key_file=tls.client_key if client_cert else None,
            check_hostname=True,
        ),
    )


def test_tls_to_orthanc(tmp_path: Path, tls_files: TlsFiles) -> None:
    paths = write_series(tmp_path / "series", n=3)
    with Orthanc(tmp_path / "orthanc", tls=tls_files) as pacs:
        pacs.start()
        result = forward_series(paths, tls_dest(pacs.dicom_port, tls_files, "ORTHANC"), FAST)
        assert result.confirmed == sop_uids(paths)
        assert pacs.instance_count() == 3
        # Plain DICOM to the TLS port, or TLS without the client certificate Orthanc requires,
        # does not get an association.
        with pytest.raises(TransientForwardError, match="no association"):
            forward_series(paths, dest("ORTHANC", pacs.dicom_port), FAST)
        with pytest.raises(TransientForwardError, match="no association"):
            forward_series(
                paths, tls_dest(pacs.dicom_port, tls_files, "ORTHANC", client_cert=False), FAST
            )


def test_tls_to_storescp_verifies_the_server_certificate(
    tmp_path: Path, tls_files: TlsFiles
) -> None:
    paths = write_series(tmp_path / "series", n=2)
    with StoreSCP(tmp_path / "scp", tls=tls_files) as scp:
        scp.start()
        forward_series(paths, tls_dest(scp.port, tls_files, "STORESCP"), FAST)
        assert sop_uids(scp.received()) == sop_uids(paths)
        # A CA that did not sign the server certificate: the handshake fails.
        other = tls_files.server_cert  # a leaf certificate is not a CA for itself
        bad_tls = DestinationTLS(ca_file=other, cert_file=None, key_file=None, check_hostname=False)
        bad = dest("STORESCP", scp.port, bad_tls)
        with pytest.raises(TransientForwardError, match="no association"):
            forward_series(paths, bad, FAST)


# --------------------------------------------------------------------------------------------
# per-instance statuses, from a pynetdicom SCP that answers a scripted status per instance


class ScriptedSCP:
    """A real (pynetdicom) storage SCP answering the n-th C-STORE with ``statuses[n]``."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = collections.deque(statuses)
        self.received: list[str] = []
        self.port = free_port()
        ae = AE(ae_title="SCRIPTED")
        ae.add_supported_context(CTImageStorage)
        self.server: ThreadedAssociationServer = ae.start_server(  # type: ignore[assignment]
            (LOCALHOST, self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store)],
        )

    def _store(self, event: evt.Event) -> int:
        self.received.append(str(event.request.AffectedSOPInstanceUID))  # type: ignore[union-attr]
        return self.statuses.popleft() if self.statuses else StoreStatus.SUCCESS

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def scripted() -> Iterator[type[ScriptedSCP]]:
    servers: list[ScriptedSCP] = []

    def make(statuses: list[int]) -> ScriptedSCP:
        scp = ScriptedSCP(statuses)
        servers.append(scp)
        return scp

    yield make  # type: ignore[misc]
    for scp in servers:
        scp.close()


def test_out_of_resources_is_transient_and_keeps_progress(tmp_path: Path, scripted) -> None:
    paths = write_series(tmp_path / "series", n=5)
    order = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    scp = scripted([0x0000, 0x0000, 0xA700])
    with pytest.raises(TransientForwardError, match="0xA700") as info:
        forward_series(paths, dest("SCRIPTED", scp.port), FAST)
    assert info.value.status == 0xA700
    assert info.value.confirmed == set(order[:2])
    # The retry skips what was confirmed and sends the rest, starting with the failed one.
    result = forward_series(paths, dest("SCRIPTED", scp.port), FAST, skip=info.value.confirmed)
    assert result.sent == 3
    assert result.confirmed == set(order)
    assert scp.received == order[:3] + order[2:]


def test_cannot_understand_is_permanent(tmp_path: Path, scripted) -> None:
    paths = write_series(tmp_path / "series", n=3)
    scp = scripted([0xC000])
    with pytest.raises(PermanentForwardError, match="0xC000") as info:
        forward_series(paths, dest("SCRIPTED", scp.port), FAST)
    assert info.value.confirmed == frozenset()
    assert len(scp.received) == 1  # stopped at the first failure


def test_warning_statuses_count_as_stored(tmp_path: Path, scripted) -> None:
    paths = write_series(tmp_path / "series", n=3)
    scp = scripted([0xB000, 0x0000, 0xB007])
    result = forward_series(paths, dest("SCRIPTED", scp.port), FAST)
    assert result.confirmed == sop_uids(paths)
    assert sorted(s for _, s in result.warnings) == [0xB000, 0xB007]


def test_destination_key() -> None:
    assert destination_key(dest("PACS", 104)) == "PACS@127.0.0.1:104"
