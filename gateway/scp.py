"""The C-STORE / C-ECHO SCP (pynetdicom): security checks at association time, then every
instance is written to the spool before Success is returned.

Handlers are small and get their dependencies bound (STYLE §2); they translate between
DIMSE and :mod:`gateway.spool` / :mod:`gateway.state` and return :class:`Status` members.

Which SOP classes: CT Image Storage, Enhanced CT and Legacy Converted Enhanced CT are
processed. The other objects a CTA study commonly carries (secondary captures such as dose
screens and 3D renderings, dose SRs, presentation states) are *accepted and quarantined*:
refusing them would fail the sender's whole study transfer and make it retry forever, while
they are exactly the objects with burned-in or free-text PHI, so they are never forwarded.
Any other SOP class is not negotiated (presentation context rejected).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable
from io import BytesIO
from typing import Any, cast

from pydicom.uid import (
    JPEG2000,
    UID,
    ComprehensiveSRStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    EnhancedSRStorage,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    LegacyConvertedEnhancedCTImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    XRayRadiationDoseSRStorage,
)
from pydicom.uid import JPEGLossless as JPEGLosslessP14
from pynetdicom import AE, evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from gateway import store_lane
from gateway.config import GatewaySettings
from gateway.keys import log_id, safe_uid
from gateway.spool import IncomingFiles, Spool, SpoolFullError, StoreOutcome
from gateway.state import Kind, StateStore
from gateway.statuses import Status
from gateway.store_lane import ArrivedDataSet, StoreLane
from gateway.trail import AuditTrail
from gateway.wire import identity, part10_header

log = logging.getLogger(__name__)

VERIFICATION = UID("1.2.840.10008.1.1")  # Verification SOP Class (PS3.4 A.4)

CT_SOP_CLASSES: frozenset[str] = frozenset(
    {CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage}
)
QUARANTINED_SOP_CLASSES: frozenset[str] = frozenset(
    {
        SecondaryCaptureImageStorage,
        MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        MultiFrameTrueColorSecondaryCaptureImageStorage,
        GrayscaleSoftcopyPresentationStateStorage,
        XRayRadiationDoseSRStorage,
        EnhancedSRStorage,
        ComprehensiveSRStorage,
    }
)
TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEGLosslessSV1,
    JPEGLosslessP14,
    RLELossless,
)

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4.
_RJ_CALLING_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x03)
_RJ_CALLED_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x07)
_RJ_LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)  # transient, service provider (presentation)


def caller_allowed(settings: GatewaySettings, calling_ae: str, address: str) -> bool:
    """Is ``calling_ae`` connecting from ``address`` on the allow-list (or is there none)?"""
    if settings.allowed_callers is None:
        return True
    ae = calling_ae.strip()
    return any(
        c.ae_title.strip() == ae and (c.host is None or c.host == address)
        for c in settings.allowed_callers
    )


def _no_pause() -> bool:
    return False


def handle_requested(
    event: Event,
    settings: GatewaySettings,
    paused: Callable[[], bool] = _no_pause,
    on_reject: Callable[[], None] | None = None,
) -> None:
    """EVT_REQUESTED: reject unknown callers / wrong called AE with A-ASSOCIATE-RJ; while an
    operator has paused ingest, refuse transiently so the sender queues and retries."""
    assoc = event.assoc
    request = cast(A_ASSOCIATE, assoc.requestor.primitive)
    calling = request.calling_ae_title
    called = request.called_ae_title
    address = assoc.requestor.address
    reject: tuple[int, int, int] | None = None
    if not caller_allowed(settings, calling, address):
        log.warning("association rejected: calling AE not allowed (from %s)", address)
        reject = _RJ_CALLING_AE_NOT_RECOGNIZED
    elif settings.check_called_ae and called.strip() != settings.ae_title.strip():
        log.warning("association rejected: called AE is not ours (from %s)", address)
        reject = _RJ_CALLED_AE_NOT_RECOGNIZED
    elif paused():
        log.warning("association refused: ingest paused by an operator (from %s)", address)
        reject = _RJ_LOCAL_LIMIT_EXCEEDED
    if reject is not None:
        if on_reject is not None:
            on_reject()  # before kill(): it ends this association's thread
        assoc.acse.send_reject(*reject)
        assoc.kill()  # as pynetdicom's own ACSE does after a reject: flush it, stop the DUL


def counted(handler: Callable[..., Any], on_result: Callable[[Any], None]) -> Callable[..., Any]:
    """Wrap an event handler so its result is also reported (metrics), unchanged."""

    def wrapper(event: Event, *args: Any) -> Any:
        result = handler(event, *args)
        on_result(result)
        return result

    return wrapper


def handle_echo(event: Event) -> Status:
    """C-ECHO: the gateway is alive."""
    return Status.SUCCESS


def handle_store(
    event: Event,
    spool: Spool,
    store: StateStore,
    settings: GatewaySettings,
    trail: AuditTrail | None = None,
) -> Status:
    """C-STORE: validate the identifying UIDs, spool the raw bytes durably, record them."""
    request = cast(C_STORE, event.request)
    syntax = UID(event.context.transfer_syntax)
    try:
        if syntax.is_deflated:  # pynetdicom inflates
            ds = event.dataset
            uids = str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(ds.SOPClassUID)
        else:  # header walk without copying Pixel Data (gateway.wire)
            uids = identity(cast(BytesIO, request.DataSet), syntax)
        series_uid, sop_uid = safe_uid(uids[0]), safe_uid(uids[1])
        sop_class = uids[2]
    except (AttributeError, KeyError, ValueError) as exc:
        log.warning("C-STORE refused: identifying UIDs missing or invalid (%s)", type(exc).__name__)
        return Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    except Exception as exc:  # pydicom raises many types on corrupt input
        log.warning("C-STORE refused: undecodable dataset (%s)", type(exc).__name__)
        return Status.CANNOT_UNDERSTAND
    if sop_uid != str(request.AffectedSOPInstanceUID).strip() or sop_class != str(
        request.AffectedSOPClassUID
    ).strip("\0 "):
        log.warning("C-STORE refused: dataset UIDs disagree with the request")
        return Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    if not store.admits(series_uid, settings.max_pending_series):
        log.warning("C-STORE refused: %d series pending (backpressure)", store.pending_count())
        return Status.OUT_OF_RESOURCES
    try:
        header = part10_header(sop_class, sop_uid, syntax)
        arrived = request.DataSet
        if isinstance(arrived, ArrivedDataSet) and arrived.header == header:
            outcome = spool.commit(arrived.path, arrived.fd, series_uid, sop_uid)
        else:
            dataset = cast(BytesIO, arrived).getvalue()
            outcome = spool.store(series_uid, sop_uid, header + dataset)
    except SpoolFullError:
        log.error("C-STORE refused: spool below its free-space floor or disk full")
        return Status.OUT_OF_RESOURCES
    except OSError as exc:
        log.error("C-STORE refused: spool write failed (%s)", type(exc).__name__)
        return Status.OUT_OF_RESOURCES
    kind = Kind.CT if sop_class in CT_SOP_CLASSES else Kind.OTHER
    try:
        received = store.record_instance(
            series_uid,
            kind=kind,
            changed=outcome is not StoreOutcome.DUPLICATE,
            new_instance=outcome is StoreOutcome.NEW,
        )
    except sqlite3.Error as exc:  # e.g. locked for longer than the timeout: sender retries
        log.error("C-STORE refused: state database error (%s)", type(exc).__name__)
        return Status.OUT_OF_RESOURCES
    if trail is not None and (received.new_series or received.superseded):
        trail.record(
            series_uid,
            "received",
            generation=received.generation,
            calling_ae=str(event.assoc.requestor.ae_title).strip(),
            transfer_syntax=str(event.context.transfer_syntax),
        )
    if received.new_series:
        log.info("series %s: first instance received", log_id(series_uid))
    elif received.superseded:
        log.info(
            "series %s: instance after processing started → job %d supersedes the previous",
            log_id(series_uid),
            received.generation,
        )
    return Status.SUCCESS


# Longest an idle association thread blocks before it re-checks timers, release and abort
# (pynetdicom polls every 1 ms instead; this only bounds how late those checks run).
IDLE_WAIT_S = 0.01


class _WakeableSocket(AssociationSocket):
    """pynetdicom's association socket, event-driven instead of polled.

    pynetdicom's DUL thread loops "sleep 1 ms, send one queued PDU or read one PDU", and
    the association thread "sleep 1 ms, look for a decoded message": every instance waits
    out several of those sleeps (and each sleep is longer on a loaded host). Here
    :attr:`ready` *blocks* in ``select`` on the connection and on a wake-up socket pair
    that :func:`_event_driven` pokes whenever a PDU is queued for sending, so the DUL
    reacts at once to either; the DUL's own sleep is set to 0 on this association only.
    :meth:`recv` reads a whole PDU with ``recv_into`` rather than 4 KiB ``recv`` calls.
    """

    _wake_r: socket.socket
    _wake_w: socket.socket

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # BlockingIOError (already woken) or closed
            self._wake_w.send(b"\0")

    def _drain(self) -> None:
        with contextlib.suppress(OSError):  # BlockingIOError: drained
            while self._wake_r.recv(4096):
                pass

    @property
    def ready(self) -> bool:
        if self.socket is None or self._is_connected is False:
            time.sleep(0.001)  # as pynetdicom's loop would: no busy loop once closed
            return False
        if isinstance(self.socket, ssl.SSLSocket) and self.socket.pending():
            return True  # TLS may hold decrypted bytes select() cannot see (pynetdicom #528)
        try:
            readable, _, _ = select.select([self.socket, self._wake_r], [], [], IDLE_WAIT_S)
        except (OSError, TimeoutError, ValueError):
            self.event_queue.put("Evt17")  # transport connection closed
            return False
        if self._wake_r in readable:
            self._drain()
        return self.socket in readable

    def recv(self, nr_bytes: int) -> bytearray:
        sock = cast(socket.socket, self.socket)
        data = bytearray(nr_bytes)
        view = memoryview(data)
        nr_read = 0
        try:
            while nr_read < nr_bytes:
                got = sock.recv_into(view[nr_read:], nr_bytes - nr_read)
                if not got:  # connection broken: return what we have, as pynetdicom does
                    break
                nr_read += got
        finally:
            view.release()
        del data[nr_read:]
        return data

    def close_wake(self) -> None:
        """Close the wake-up pair; only once neither thread can use it (a send racing a
        close could write into a reused descriptor)."""
        self._wake_r.close()
        self._wake_w.close()


def _event_driven(assoc: Association, incoming: IncomingFiles | None = None) -> None:
    """Make one accepted association event-driven (see :class:`_WakeableSocket`).

    Only this association's objects are changed (instance attributes), never pynetdicom's
    module or class state, so other AEs in the process (the forwarder's SCU) are untouched.
    """
    cast(AssociationSocket, assoc.dul.socket).__class__ = _WakeableSocket  # same state
    sock = cast(_WakeableSocket, assoc.dul.socket)
    sock._wake_r, sock._wake_w = socket.socketpair()
    sock._wake_r.setblocking(False)
    sock._wake_w.setblocking(False)
    dul = assoc.dul
    dul._run_loop_delay = 0.0  # the wait happens in _WakeableSocket.ready
    queue_pdu = dul.send_pdu

    def send_pdu(primitive: Any) -> None:
        queue_pdu(primitive)
        sock.wake()

    dul.send_pdu = send_pdu  # type: ignore[method-assign]
    dimse = assoc.dimse
    get_msg = dimse.get_msg

    def get_msg_waiting(block: bool = False) -> Any:
        # The association reactor polls with block=False after a 1 ms sleep; wait on the
        # queue instead so a decoded C-STORE is served the moment the DUL queues it.
        if block:
            return get_msg(block=True)
        try:
            return dimse.msg_queue.get(block=True, timeout=IDLE_WAIT_S)
        except queue.Empty:
            return None, None

    dimse.get_msg = get_msg_waiting  # type: ignore[method-assign]
    _lean(assoc)
    if not any(assoc.get_handlers(e) for e in _LANE_BYPASSES):
        StoreLane(assoc, incoming).install()


#: Notifications the C-STORE lane does not raise: with a subscriber, pynetdicom's path is kept.
_LANE_BYPASSES = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV, evt.EVT_DIMSE_RECV, evt.EVT_FSM_TRANSITION)


#: pynetdicom's logging handlers, bound to every association: they format every PDU and
#: DIMSE message even when nothing is logged at DEBUG.
_STANDARD_LOG_HANDLERS = (
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
)


def _lean(assoc: Association) -> None:
    """Unbind pynetdicom's standard logging handlers from one accepted association unless its
    logger is at DEBUG: they format every PDU and message (and their presence keeps the
    C-STORE lane out, see :data:`_LANE_BYPASSES`)."""
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
        for event, handler in _STANDARD_LOG_HANDLERS:
            assoc.unbind(event, handler)


class _EventDrivenAssociation(Association):
    """An acceptor whose reactor loop does not sleep 1 ms per turn: its ``dimse.get_msg``
    already waits (up to :data:`IDLE_WAIT_S`) for the next message (:func:`_event_driven`).

    The loop is pynetdicom 3.0's ``Association._run_reactor`` without its leading
    ``time.sleep(0.001)``; the same checks run in the same order.
    """

    def _run_reactor(self) -> None:
        try:
            self._serve_until_done()
        finally:
            if not self.dul.is_alive():  # kill() joined the DUL: nobody uses the pair now
                cast(_WakeableSocket, self.dul.socket).close_wake()

    def _serve_until_done(self) -> None:
        self._is_paused = False
        while not self._kill:
            # Pause point for the send_*() methods, as in pynetdicom.
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)  # waits ≤ IDLE_WAIT_S
            if msg:
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                log.debug("association released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log.debug("association aborted")
                self.dul.receive_pdu(wait=False)  # so EVT_ACSE_RECV fires for subscribers
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                log.error("network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class _EventDrivenHandler(RequestHandler):
    def _create_association(self) -> Association:
        assoc = super()._create_association()
        _event_driven(assoc, cast(_NoDelayServer, self.server).incoming)
        assoc.__class__ = _EventDrivenAssociation  # same state, loop without the sleep
        return assoc


class _NoDelayServer(ThreadedAssociationServer):
    """pynetdicom's server with TCP_NODELAY on accepted sockets (without it every small
    PDU, the C-STORE response, waits for Linux's 40 ms delayed ACK) and event-driven
    associations (:func:`_event_driven`)."""

    def __init__(self, *args: Any, incoming: IncomingFiles | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("request_handler", _EventDrivenHandler)
        self.incoming = incoming  # spool files the C-STORE lane writes data sets into
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = cast(socket.socket, self.socket).accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True)
        return client, address


def server_ssl_context(settings: GatewaySettings) -> ssl.SSLContext | None:
    """TLS context of the listening port, or None for plain DICOM."""
    tls = settings.tls
    if tls is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=tls.cert_file, keyfile=tls.key_file)
    if tls.ca_file is not None:
        ctx.load_verify_locations(cafile=tls.ca_file)
    if tls.require_client_cert:
        if tls.ca_file is None:
            raise ValueError("gateway.tls.require_client_cert needs gateway.tls.ca_file")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def build_ae(settings: GatewaySettings) -> AE:
    """An AE with our contexts, limits and timeouts (no global pynetdicom config touched)."""
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu
    ae.acse_timeout = settings.acse_timeout_s
    ae.dimse_timeout = settings.dimse_timeout_s
    ae.network_timeout = settings.network_timeout_s
    ae.add_supported_context(VERIFICATION)
    for sop_class in sorted(CT_SOP_CLASSES | QUARANTINED_SOP_CLASSES):
        ae.add_supported_context(UID(sop_class), list(TRANSFER_SYNTAXES))
    return ae


class StorageSCP:
    """The running listener; ``port`` is the bound port (useful with port 0)."""

    def __init__(
        self,
        settings: GatewaySettings,
        spool: Spool,
        store: StateStore,
        paused: Callable[[], bool] = _no_pause,
        on_store: Callable[[Status], None] | None = None,
        on_reject: Callable[[], None] | None = None,
        trail: AuditTrail | None = None,
    ) -> None:
        self.settings = settings
        self.ae = build_ae(settings)
        self.incoming = IncomingFiles(spool)
        store_handler = counted(handle_store, on_store) if on_store else handle_store
        handlers: list[tuple[Any, Callable[..., Any]] | tuple[Any, Callable[..., Any], list]] = [
            (evt.EVT_REQUESTED, handle_requested, [settings, paused, on_reject]),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, store_handler, [spool, store, settings, trail]),
        ]
        self.server = self.ae.make_server(
            (settings.host, settings.port),
            ae_title=settings.ae_title,
            ssl_context=server_ssl_context(settings),
            evt_handlers=handlers,
            server_class=_NoDelayServer,
            incoming=self.incoming,
        )
        self.ae._servers.append(self.server)  # as AE.start_server does; shutdown() expects it
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="defacegate-scp", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> None:
        self._thread.start()
        if self.settings.allowed_callers is None:
            log.warning("no gateway.allowed_callers configured: any calling AE is accepted")
        log.info(
            "C-STORE SCP %s listening on %s:%d%s",
            self.settings.ae_title,
            self.settings.host,
            self.port,
            " (TLS)" if self.settings.tls else "",
        )
        if store_lane.PDATA_RECEIVE is None:
            log.warning(
                "gateway/_pdata.c is not built (no C compiler at install): C-STORE data sets "
                "are read in Python, ingest is slower (docs/gateway.md)"
            )
        elif self.settings.tls:
            log.info("TLS: C-STORE data sets are read in Python (the C data phase is for TCP)")

    def stop(self) -> None:
        if self._thread.is_alive():
            self.server.shutdown()  # blocks until serve_forever returns: only if it runs
            self._thread.join(timeout=10)
        self.server.server_close()
        self.incoming.close()
