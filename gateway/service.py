"""The running gateway: SCP + scheduler + (embedded mode) an in-process worker.

The scheduler is the only place that decides what runs next; it reads SQLite every
``poll_interval_s``:

1. ``received`` series quiet for ``quiet_period_s`` become ``stable`` (non-CT: quarantined);
2. work whose lease expired (its worker died) is handed back;
3. every ``stable`` / ``deidentified`` series not yet queued (and whose retry is due) is
   queued — to Celery in distributed mode, to the in-process worker threads in embedded mode;
4. finished series older than the retention period are removed from the spool.

Start-up recovery: series found in the spool but not in the table are adopted; every
ready series is queued again (duplicate messages are harmless); in embedded mode every claim
of the previous process is void (it died with it). In distributed mode expired leases cover
workers that died.
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from gateway.admin import AdminContext, AdminServer
from gateway.admin import create_app as create_admin_app
from gateway.config import Settings
from gateway.controls import IngestControls
from gateway.keys import log_id
from gateway.metrics import Metrics
from gateway.scp import StorageSCP
from gateway.state import Stage, State
from gateway.tasks import JOBS, Context

log = logging.getLogger(__name__)


class Dispatcher(Protocol):
    """Queues one job; must not block on the job itself."""

    def dispatch(self, stage: Stage, series_uid: str, generation: int) -> None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class CeleryDispatcher:
    """Distributed mode: jobs go to the broker; workers elsewhere run them."""

    def __init__(self, settings: Settings) -> None:
        from gateway.celery_app import create_app

        self.app = create_app(settings)

    def dispatch(self, stage: Stage, series_uid: str, generation: int) -> None:
        from gateway.celery_app import send

        send(self.app, stage, series_uid, generation)

    def start(self) -> None:
        return None

    def stop(self) -> None:
        self.app.close()


class EmbeddedDispatcher:
    """Embedded mode: one worker thread per stage runs the same job functions in-process,
    so a series can be forwarded while the next one is defaced."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.queues: dict[Stage, queue.Queue[tuple[str, int] | None]] = {
            stage: queue.Queue() for stage in Stage
        }
        self.threads = [
            threading.Thread(target=self._work, args=(stage,), name=f"defacegate-{stage}")
            for stage in Stage
        ]
        self.busy = threading.Event()

    def dispatch(self, stage: Stage, series_uid: str, generation: int) -> None:
        self.queues[stage].put((series_uid, generation))

    def _work(self, stage: Stage) -> None:
        job = JOBS[stage]
        q = self.queues[stage]
        while (item := q.get()) is not None:
            series_uid, generation = item
            try:
                job(self.ctx, series_uid, generation, owner=f"embedded-{uuid.uuid4().hex}")
            except Exception as exc:  # a bug: keep the worker alive; the lease reaper retries
                log.error(
                    "series %s: %s job crashed (%s)", log_id(series_uid), stage, type(exc).__name__
                )
                log.debug("job crash", exc_info=True)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        """Finish the jobs in progress; queued ones are dropped (re-queued at start-up)."""
        for q in self.queues.values():
            with q.mutex:
                q.queue.clear()
            q.put(None)
        for t in self.threads:
            t.join()


class Gateway:
    """One gateway process. ``start()`` returns once the SCP listens; ``stop()`` is graceful
    (the job in progress completes)."""

    def __init__(self, settings: Settings, ctx: Context | None = None) -> None:
        self.settings = settings
        self.ctx = ctx or Context.from_settings(settings)
        self.embedded = settings.celery.broker_url is None
        self.dispatcher: Dispatcher = (
            EmbeddedDispatcher(self.ctx) if self.embedded else CeleryDispatcher(settings)
        )
        self.controls = IngestControls(settings.gateway.state_path)
        self.metrics = Metrics(self.ctx.store, self.ctx.trail, self.ctx.spool.root)
        self.scp = StorageSCP(
            settings.gateway,
            self.ctx.spool,
            self.ctx.store,
            paused=lambda: self.controls.paused,
            on_store=lambda status: self.metrics.instances.labels(status.name.lower()).inc(),
            on_reject=self.metrics.associations_rejected.inc,
            trail=self.ctx.trail,
        )
        self.admin: AdminServer | None = None
        if settings.admin.enabled:
            self.admin = AdminServer(self._admin_app(), settings.admin.host, settings.admin.port)
        self._stop = threading.Event()
        self._scheduler = threading.Thread(target=self._loop, name="defacegate-scheduler")

    @property
    def port(self) -> int:
        return self.scp.port

    def _admin_app(self) -> Any:
        token = self.settings.admin.token
        return create_admin_app(
            AdminContext(
                store=self.ctx.store,
                trail=self.ctx.trail,
                spool=self.ctx.spool,
                controls=self.controls,
                metrics=self.metrics,
                token=None if token is None else token.get_secret_value(),
                probes=self._probes(),
            )
        )

    def _probes(self) -> dict[str, Callable[[], str | None]]:
        """Readiness: the state database answers, the spool has room, the SCP listens, and
        (distributed mode) the broker answers."""

        def state() -> str | None:
            self.ctx.store.pending_count()
            return None

        def spool() -> str | None:
            try:
                self.ctx.spool.check_free_space()
            except OSError:
                return "spool below its free-space floor"
            return None

        def scp() -> str | None:
            return None if self.scp._thread.is_alive() else "SCP not listening"

        probes = {"state": state, "spool": spool, "scp": scp}
        if not self.embedded:
            url = self.settings.celery.broker_url

            def broker() -> str | None:
                import redis

                redis.Redis.from_url(url, socket_timeout=2).ping()  # type: ignore[arg-type]
                return None

            probes["broker"] = broker
        return probes

    def recover(self) -> None:
        """Drop partly received instances, adopt spooled series the table lacks; in embedded
        mode void the dead process's claims and queue entries."""
        store, spool = self.ctx.store, self.ctx.spool
        if removed := spool.clear_incoming():
            log.info("removed %d partly received instances (never acknowledged)", removed)
        for series_uid in spool.series_on_disk():
            if store.adopt(series_uid, len(spool.instance_paths(series_uid))):
                log.warning("series %s: found in the spool only; adopted", log_id(series_uid))
        if self.embedded:
            store.reap(lease_timeout_s=-1.0)
        # Queue every ready series again: an in-process queue died with its process, and a
        # broker may have lost messages (a Redis without persistence restarted). Duplicates
        # are harmless: the claim lets only one task work on a series.
        store.forget_dispatches()
        unfinished = store.find(
            State.RECEIVED, State.STABLE, State.DEFACING, State.DEIDENTIFIED, State.FORWARDING
        )
        if unfinished:
            log.info("resuming %d unfinished series", len(unfinished))

    def tick(self) -> None:
        """One scheduler pass (see the module docstring)."""
        gw = self.settings.gateway
        store, spool = self.ctx.store, self.ctx.spool
        for rec in store.settle(gw.quiet_period_s):
            log.info("series %s job %d: %s", rec.log_id, rec.generation, rec.state)
        for rec in store.reap(gw.lease_timeout_s):
            log.warning("series %s: lease expired, re-queued as %s", rec.log_id, rec.state)
        for stage, rec in store.undispatched():
            self.dispatcher.dispatch(stage, rec.series_uid, rec.generation)
            store.mark_dispatched(rec.series_uid, rec.generation, stage)
        if gw.retention_hours is not None:
            for rec in store.expired(gw.retention_hours * 3600):
                spool.remove_series(rec.series_uid)
                store.mark_purged(rec.series_uid)
                log.info("series %s: retention over, removed from the spool", rec.log_id)

    def _loop(self) -> None:
        interval = self.settings.gateway.poll_interval_s
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # keep scheduling; SQLite busy or broker down is transient
                log.error("scheduler pass failed (%s)", type(exc).__name__)
                log.debug("scheduler failure", exc_info=True)
            self._stop.wait(interval)

    def start(self) -> None:
        self.recover()
        self.dispatcher.start()
        if self.admin is not None:  # up before the SCP answers, so readiness can be asked
            self.admin.start()
            log.info("admin API on http://%s:%d", self.admin.host, self.admin.port)
        self.scp.start()
        self._scheduler.start()
        log.info("gateway running (%s mode)", "embedded" if self.embedded else "distributed")

    def stop(self) -> None:
        if self.admin is not None:
            self.admin.stop()
        self.scp.stop()
        self._stop.set()
        if self._scheduler.is_alive():
            self._scheduler.join()
        self.dispatcher.stop()

    def run_until(self, stop: threading.Event) -> None:
        """Block until ``stop`` is set (by a signal handler), then shut down."""
        while not stop.wait(1.0):
            pass
        self.stop()
