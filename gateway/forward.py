"""C-STORE SCU: forward one de-identified series to one destination over one association.

The caller (the forward task) owns the policy: it calls :func:`forward_series` per destination,
records the confirmed SOP Instance UIDs, retries :class:`TransientForwardError` after
:func:`backoff_delays`, dead-letters the series after the last retry (or at once on
:class:`PermanentForwardError`) and deletes nothing from the spool until every destination has
confirmed every instance.

Per-instance C-STORE statuses (PS3.4 B.2.3, PS3.7 C) are classified as:

* Success ``0x0000`` and every Warning (``0xB000`` coercion of data elements, ``0xB006``
  elements discarded, ``0xB007`` data set does not match SOP class, ``0x0001``, ``0x0107``,
  ``0x0116``): the destination **has stored** the instance → confirmed; warnings are returned
  in :attr:`ForwardResult.warnings` and logged.
* Out of Resources ``0xA7xx``, Resource Limitation ``0x0213``, Processing Failure ``0x0110``
  (what many PACS, Orthanc among them, answer for a storage-side error), Cancel ``0xFE00``, no
  response (DIMSE timeout, abort), connection refused/reset, ACSE timeout and
  A-ASSOCIATE-RJ *rejected-transient* → :class:`TransientForwardError`.
* Every other failure (``0xA9xx`` data set does not match SOP class, ``0xCxxx`` cannot
  understand, ``0x0117`` invalid SOP instance, ``0x0122`` SOP class not supported, ``0x0124``
  not authorised, unknown codes), A-ASSOCIATE-RJ *rejected-permanent* (e.g. unknown calling or
  called AE title) and a destination that accepts none of the needed presentation contexts →
  :class:`PermanentForwardError`: retrying without a change at the destination cannot help.

The first failing instance stops the transfer (the association is released); the exception
carries the instances confirmed before it so a retry can skip them.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, Literal

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, Association, build_context, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import code_to_category

from gateway.config import Destination, ForwardSettings

LOGGER = logging.getLogger(__name__)

#: PS3.8 9.3.1: at most 128 presentation contexts per association (odd ids 1..255).
MAX_CONTEXTS = 128


class StoreStatus(IntEnum):
    """C-STORE response statuses this module treats by name (PS3.4 B.2.3, PS3.7 C)."""

    SUCCESS = 0x0000
    WARNING_COERCION = 0xB000
    WARNING_ELEMENTS_DISCARDED = 0xB006
    WARNING_DATASET_MISMATCH = 0xB007
    PROCESSING_FAILURE = 0x0110
    RESOURCE_LIMITATION = 0x0213
    CANCEL = 0xFE00
    OUT_OF_RESOURCES = 0xA700
    OUT_OF_RESOURCES_LAST = 0xA7FF


class RejectResult(IntEnum):
    """A-ASSOCIATE-RJ Result field (PS3.8 9.3.4)."""

    PERMANENT = 0x01
    TRANSIENT = 0x02


Outcome = Literal["confirmed", "transient", "permanent"]


class ForwardError(Exception):
    """Forwarding a series to a destination did not complete; never contains PHI."""

    def __init__(
        self,
        message: str,
        *,
        destination: str,
        confirmed: Collection[str] = (),
        status: int | None = None,
    ) -> None:
        super().__init__(f"{destination}: {message}")
        self.destination = destination
        #: SOP Instance UIDs the destination confirmed before the failure (incl. skipped ones).
        self.confirmed: frozenset[str] = frozenset(confirmed)
        #: The DIMSE status that caused the failure, if any.
        self.status = status


class TransientForwardError(ForwardError):
    """The destination is unreachable or busy: retry later with backoff."""


class PermanentForwardError(ForwardError):
    """The destination refused the data: retrying unchanged cannot succeed → dead-letter."""


@dataclass(frozen=True)
class ForwardResult:
    """Every instance of the series is now stored at ``destination``."""

    destination: str
    #: SOP Instance UIDs confirmed (sent now with Success/Warning, or skipped as already sent).
    confirmed: frozenset[str]
    #: Instances actually sent in this call.
    sent: int
    #: (SOP Instance UID, status) of instances stored with a Warning status.
    warnings: tuple[tuple[str, int], ...] = field(default=())
    seconds: float = 0.0


def destination_key(destination: Destination) -> str:
    """Stable name of a destination for state keys and logs: ``AE@host:port``."""
    return f"{destination.ae_title}@{destination.host}:{destination.port}"


def backoff_delays(retries: int, base: float, cap: float) -> list[float]:
    """Seconds to wait before retry 1..``retries``: ``base·2^i`` capped at ``cap``.

    Deterministic (no jitter) so the schedule is predictable and testable; a gateway has one
    forwarder per series, not a thundering herd.
    """
    if retries < 0:
        raise ValueError("retries must be >= 0")
    if base <= 0 or cap <= 0:
        raise ValueError("backoff base and cap must be > 0")
    return [min(cap, base * 2.0**i) for i in range(retries)]


def classify_status(status: int) -> Outcome:
    """Map a C-STORE response status to confirmed / transient / permanent (see module doc)."""
    if status == StoreStatus.SUCCESS or code_to_category(status) == "Warning":
        return "confirmed"
    if StoreStatus.OUT_OF_RESOURCES <= status <= StoreStatus.OUT_OF_RESOURCES_LAST or status in (
        StoreStatus.RESOURCE_LIMITATION,
        StoreStatus.PROCESSING_FAILURE,
        StoreStatus.CANCEL,
    ):
        return "transient"
    return "permanent"


def enable_tcp_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: disable Nagle; pynetdicom does not, and delayed ACKs then stall
    every C-STORE exchange by ~40 ms on Linux."""
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def tls_context(destination: Destination) -> ssl.SSLContext | None:
    """Client SSL context for a TLS destination (TLS ≥ 1.2, server certificate verified)."""
    tls = destination.tls
    if tls is None:
        return None
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = tls.check_hostname
    if tls.cert_file is not None:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    return ctx


@dataclass(frozen=True)
class _Instance:
    path: Path
    sop_class: UID
    sop_instance: str
    transfer_syntax: UID


def _scan(paths: Sequence[Path], name: str) -> list[_Instance]:
    """Read the file meta of every file (cheap) to plan presentation contexts."""
    out: list[_Instance] = []
    seen: set[str] = set()
    for path in paths:
        try:
            meta = read_file_meta_info(path)
            item = _Instance(
                Path(path),
                UID(meta.MediaStorageSOPClassUID),
                str(meta.MediaStorageSOPInstanceUID),
                UID(meta.TransferSyntaxUID),
            )
        except (OSError, InvalidDicomError, AttributeError) as exc:
            raise PermanentForwardError(
                f"spooled file {Path(path).name} is not a DICOM file with file meta "
                f"({type(exc).__name__})",
                destination=name,
            ) from None
        if item.sop_instance not in seen:
            seen.add(item.sop_instance)
            out.append(item)
    return out


def _contexts(instances: Sequence[_Instance], name: str) -> list[PresentationContext]:
    """One context per (SOP class, transfer syntax); uncompressed data may also go as
    explicit or implicit VR little endian, which pynetdicom converts to."""
    pairs = sorted({(i.sop_class, i.transfer_syntax) for i in instances})
    if len(pairs) > MAX_CONTEXTS:
        raise PermanentForwardError(
            f"series needs {len(pairs)} presentation contexts, more than {MAX_CONTEXTS}",
            destination=name,
        )
    contexts = []
    for sop_class, ts in pairs:
        syntaxes: list[str | UID] = [ts]
        if not ts.is_compressed and ts.is_little_endian:
            syntaxes += [s for s in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if s != ts]
        contexts.append(build_context(sop_class, syntaxes))
    return contexts


def sender_only(assoc: Association) -> None:
    """Keep pynetdicom's association reactor away from the responses this SCU waits for.

    pynetdicom's requestor runs a reactor thread that polls ``dimse.get_msg(block=False)``
    to serve requests from the peer. ``send_c_store`` pauses it with a handshake that can
    race: the reactor may already be past its pause point when the sender sees it "paused",
    take the C-STORE-RSP off the queue and drop it ("Received unexpected C-STORE service
    message"). The sender then waits out the DIMSE timeout and the instance is sent again
    (seen in a fresh-clone test run: a 60 s stall and a duplicate store). A storage SCU
    serves no requests, so on this association the reactor's non-blocking poll gets nothing
    and only the sender's blocking ``get_msg`` takes messages.
    """
    dimse = assoc.dimse
    get_msg = dimse.get_msg

    def sender_get_msg(block: bool = False) -> Any:
        return get_msg(block=True) if block else (None, None)

    dimse.get_msg = sender_get_msg  # type: ignore[method-assign]


def _associate(
    instances: Sequence[_Instance], destination: Destination, settings: ForwardSettings
) -> Association:
    name = destination_key(destination)
    ae = AE(ae_title=settings.calling_ae_title)
    ae.connection_timeout = settings.connect_timeout_s
    ae.acse_timeout = settings.acse_timeout_s
    ae.dimse_timeout = settings.dimse_timeout_s
    ae.network_timeout = settings.network_timeout_s
    ctx = tls_context(destination)
    tls_args = None
    if ctx is not None:
        tls_args = (ctx, destination.host if ctx.check_hostname else None)
    assoc = ae.associate(
        destination.host,
        destination.port,
        contexts=_contexts(instances, name),
        ae_title=destination.ae_title,
        max_pdu=settings.max_pdu,
        tls_args=tls_args,  # type: ignore[arg-type]  # pynetdicom's hint says str, None is fine
        evt_handlers=[(evt.EVT_CONN_OPEN, enable_tcp_nodelay)],
    )
    if assoc.is_established:
        sender_only(assoc)
        return assoc
    rsp = assoc.acceptor.primitive
    if assoc.is_rejected and rsp is not None:
        kind = (
            PermanentForwardError if rsp.result == RejectResult.PERMANENT else TransientForwardError
        )
        raise kind(
            f"association rejected ({rsp.result_str}, source: {rsp.source_str}, "
            f"reason: {rsp.reason_str})",
            destination=name,
        )
    if rsp is not None and rsp.result == 0x00 and not assoc.accepted_contexts:
        sops = ", ".join(sorted({str(i.sop_class) for i in instances}))
        raise PermanentForwardError(
            f"association accepted but none of the presentation contexts for {sops}",
            destination=name,
        )
    raise TransientForwardError(
        "no association (connection refused, TLS handshake failed, timed out or aborted)",
        destination=name,
    )


def forward_series(
    paths: Sequence[Path],
    destination: Destination,
    settings: ForwardSettings,
    *,
    skip: Collection[str] = (),
) -> ForwardResult:
    """Send every file in ``paths`` to ``destination`` over one association.

    ``skip``: SOP Instance UIDs this destination already confirmed in an earlier attempt.
    Returns when every instance is confirmed; otherwise raises :class:`TransientForwardError`
    or :class:`PermanentForwardError` carrying the instances confirmed so far.
    """
    name = destination_key(destination)
    start = time.monotonic()
    instances = _scan(paths, name)
    confirmed = {i.sop_instance for i in instances if i.sop_instance in skip}
    todo = [i for i in instances if i.sop_instance not in confirmed]
    if not todo:
        return ForwardResult(name, frozenset(confirmed), 0, (), time.monotonic() - start)

    warnings: list[tuple[str, int]] = []
    assoc = _associate(todo, destination, settings)
    try:
        for n, item in enumerate(todo):
            try:
                ds = dcmread(item.path)
            except (OSError, InvalidDicomError) as exc:
                raise PermanentForwardError(
                    f"spooled file {item.path.name} unreadable ({type(exc).__name__})",
                    destination=name,
                    confirmed=confirmed,
                ) from None
            try:
                rsp = assoc.send_c_store(ds, msg_id=n % 65535 + 1)
            except ValueError:
                raise PermanentForwardError(
                    f"destination accepted no presentation context for SOP class "
                    f"{item.sop_class} in {item.transfer_syntax.name}",
                    destination=name,
                    confirmed=confirmed,
                ) from None
            if "Status" not in rsp:
                raise TransientForwardError(
                    f"no C-STORE response for {item.path.name} (timeout or association lost)",
                    destination=name,
                    confirmed=confirmed,
                )
            status = int(rsp.Status)
            outcome = classify_status(status)
            if outcome == "confirmed":
                confirmed.add(item.sop_instance)
                if status != StoreStatus.SUCCESS:
                    warnings.append((item.sop_instance, status))
                    LOGGER.warning("%s stored %s with warning 0x%04X", name, item.path.name, status)
                continue
            kind = TransientForwardError if outcome == "transient" else PermanentForwardError
            raise kind(
                f"C-STORE of {item.path.name} failed with status 0x{status:04X}",
                destination=name,
                confirmed=confirmed,
                status=status,
            )
    finally:
        if assoc.is_established:
            assoc.release()
    seconds = time.monotonic() - start
    LOGGER.info(
        "%s confirmed %d instances (%d sent) in %.1f s", name, len(confirmed), len(todo), seconds
    )
    return ForwardResult(name, frozenset(confirmed), len(todo), tuple(warnings), seconds)
