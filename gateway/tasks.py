"""The two jobs of the gateway, as plain functions run by a Celery worker or by the embedded
worker thread of ``defacegate serve`` alike (thin adapters live in :mod:`gateway.celery_app`
and :mod:`gateway.service`).

Messages carry a series UID and a generation, never pixel data: the files are on the
shared spool. Every job is idempotent (STYLE §8): it re-reads the state, claims the series
for its stage (or finds nothing to do), renews its lease while it works, and commits its
result only if the series still belongs to it and to the same generation.

Fail closed: :class:`~inference.errors.SeriesError`, :class:`~inference.errors.FacemaskError`
and ``anonymizer.DeidentificationError`` quarantine the series (files kept, never forwarded);
any other error dead-letters it (``failed``; ``defacegate retry`` re-queues). Logs name series
by :func:`gateway.keys.log_id` and errors by type only: exception messages may quote data.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from gateway.config import DefaceSettings, Settings
from gateway.keys import log_id
from gateway.spool import Spool
from gateway.state import Stage, State, StateStore
from gateway.trail import AuditTrail
from inference.engines import FacemaskEngine
from inference.errors import FacemaskError, SeriesError

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    """What a job did (returned to Celery as the task result, logged in embedded mode)."""

    NOTHING_TO_DO = "nothing-to-do"  # duplicate message, wrong generation, or owned elsewhere
    SUPERSEDED = "superseded"  # a newer job of the series started meanwhile: output dropped
    DEIDENTIFIED = "deidentified"
    QUARANTINED = "quarantined"
    RETRY_LATER = "retry-later"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class Context:
    """What a job needs; built once per process from the settings.

    ``engine`` returns the facemask engine (default: :func:`get_engine`, loaded once per
    process); tests inject a small engine here instead of patching globals.
    """

    settings: Settings
    spool: Spool
    store: StateStore
    engine: Callable[[], FacemaskEngine] | None = None
    trail: AuditTrail = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.trail is None:
            object.__setattr__(self, "trail", AuditTrail(self.store.path))

    @classmethod
    def from_settings(
        cls, settings: Settings, engine: Callable[[], FacemaskEngine] | None = None
    ) -> Context:
        gw = settings.gateway
        return cls(
            settings=settings,
            spool=Spool(gw.spool_dir, fsync=gw.fsync, free_space_floor_mb=gw.free_space_floor_mb),
            store=StateStore(gw.state_path),
            engine=engine,
        )

    def get_engine(self) -> FacemaskEngine:
        return self.engine() if self.engine is not None else get_engine(self.settings.deface)


# -- the engine: loaded once per process ----------------------------------------------------
_engines: dict[str, FacemaskEngine] = {}
_engines_lock = threading.Lock()


def get_engine(deface: DefaceSettings) -> FacemaskEngine:
    """The facemask engine for these settings, loaded on first use and kept for the life of
    the process (a Celery worker child or the embedded worker thread)."""
    key = deface.model_dump_json()
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            from gateway.pipeline import engine_from_settings  # torch only when nnunet

            started = time.monotonic()
            engine = engine_from_settings(deface)
            _engines[key] = engine
            log.info("engine %s loaded in %.1f s", engine.name, time.monotonic() - started)
        return engine


def _quarantine_errors() -> tuple[type[BaseException], ...]:
    from anonymizer import DeidentificationError

    return (SeriesError, FacemaskError, DeidentificationError)


def deface_results(ctx: Context, paths: Sequence[Path]) -> list[Any]:
    """Run the offline pipeline (with the privacy audit) on one spooled series.

    Returns ``gateway.pipeline.SeriesResult`` objects; raises the pipeline's original
    exception (unwrapped from its ``StageError``) so the caller decides quarantine vs
    dead-letter by type.
    """
    from gateway.pipeline import StageError, process_series, profile_from_settings

    settings = ctx.settings
    try:
        return process_series(
            list(paths), ctx.get_engine(), profile_from_settings(settings.deid), settings
        )
    except StageError as exc:
        raise exc.error from None


def write_audit(ctx: Context, series_uid: str, generation: int, outcome: Any) -> None:
    """Keep the audit report and renders with the series (admin API, quarantine review)."""
    from gateway.admin import audit_dir
    from gateway.commands.audit import write_report

    if outcome is not None:
        folder = audit_dir(ctx.spool, series_uid, generation)
        write_report(outcome.report, outcome.decision, folder)


# -- the lease -------------------------------------------------------------------------------
@contextmanager
def leased(store: StateStore, series_uid: str, owner: str, interval_s: float) -> Iterator[None]:
    """Renew the claim every ``interval_s`` while the body runs, so a live task is never
    mistaken for a dead one however long inference takes."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval_s):
            if not store.beat(series_uid, owner):
                return

    thread = threading.Thread(target=beat, name="defacegate-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _lease_interval(settings: Settings) -> float:
    return max(0.2, settings.gateway.lease_timeout_s / 4)


# -- the jobs --------------------------------------------------------------------------------
def run_deface(ctx: Context, series_uid: str, generation: int, owner: str) -> Outcome:
    """Deface + de-identify one generation of a series into ``out/<generation>``."""
    store, spool, settings = ctx.store, ctx.spool, ctx.settings
    lid = log_id(series_uid)
    if not store.claim(
        series_uid, generation, Stage.DEFACE, owner, settings.gateway.lease_timeout_s
    ):
        log.info("series %s job %d: deface has nothing to do", lid, generation)
        return Outcome.NOTHING_TO_DO
    started = time.monotonic()
    log.info("series %s job %d: defacing", lid, generation)
    quarantine = _quarantine_errors()
    with leased(store, series_uid, owner, _lease_interval(settings)):
        try:
            results = deface_results(ctx, spool.instance_paths(series_uid))
            datasets = [ds for result in results for ds in result.datasets]
            if not datasets:
                raise SeriesError("the pipeline produced no instance")
            if store.get(series_uid).generation != generation:
                return _superseded(ctx, series_uid, generation, written=False)
            spool.write_outputs(series_uid, generation, datasets)
            for result in results:
                write_audit(ctx, series_uid, generation, result.audit)
                _trail_stages(ctx, series_uid, generation, result)
        except quarantine as exc:
            write_audit(ctx, series_uid, generation, getattr(exc, "outcome", None))
            ctx.trail.record(
                series_uid, "quarantined", generation=generation, error=type(exc).__name__
            )
            if not store.finish(
                series_uid, generation, owner, State.QUARANTINED, reason=type(exc).__name__
            ):
                return _superseded(ctx, series_uid, generation, written=False)
            log.warning("series %s job %d: quarantined (%s)", lid, generation, type(exc).__name__)
            return Outcome.QUARANTINED
        except Exception as exc:
            log.debug("deface failure", exc_info=True)  # DEBUG only: messages may quote data
            if not store.dead_letter(
                series_uid, generation, owner, Stage.DEFACE, type(exc).__name__
            ):
                return _superseded(ctx, series_uid, generation, written=False)
            log.error("series %s job %d: deface failed (%s)", lid, generation, type(exc).__name__)
            return Outcome.FAILED
    if any(r.quarantined_by_audit for r in results):
        # Defaced and de-identified, but a detector still finds a face: never forwarded
        # unless an operator reviews the renders and releases it.
        reasons = [reason for r in results if r.audit for reason in r.audit.decision.reasons]
        ctx.trail.record(
            series_uid, "quarantined", generation=generation, audit="face", reasons=reasons
        )
        if not store.finish(
            series_uid,
            generation,
            owner,
            State.QUARANTINED,
            outputs=len(datasets),
            reason="FaceStillVisibleError",
        ):
            return _superseded(ctx, series_uid, generation, written=True)
        log.warning("series %s job %d: quarantined by the privacy audit", lid, generation)
        return Outcome.QUARANTINED
    if not store.finish(series_uid, generation, owner, State.DEIDENTIFIED, outputs=len(datasets)):
        return _superseded(ctx, series_uid, generation, written=True)
    log.info(
        "series %s job %d: %d instances defaced and de-identified in %.1f s",
        lid,
        generation,
        len(datasets),
        time.monotonic() - started,
    )
    return Outcome.DEIDENTIFIED


def _trail_stages(ctx: Context, series_uid: str, generation: int, result: Any) -> None:
    """Stage latencies, engine, profile options and audit outcome into the audit trail."""
    t = result.timings
    stages = {
        "assemble": t.get("read", 0.0) + t.get("assemble", 0.0),
        "deface": t.get("mask", 0.0) + t.get("replace", 0.0) + t.get("writeback", 0.0),
        "deidentify": t.get("deidentify", 0.0),
    }
    if "audit" in t:
        stages["audit"] = t["audit"]
    for stage, seconds in stages.items():
        ctx.trail.record(
            series_uid, "stage", generation=generation, stage=stage, duration_s=round(seconds, 3)
        )
    deid = ctx.settings.deid
    summary = result.summary()
    audit = summary.get("audit") or {}
    ctx.trail.record(
        series_uid,
        "deidentified",
        generation=generation,
        engine=ctx.settings.deface.engine,
        bone=audit.get("bone") or ctx.settings.deface.bone,
        profile="PS3.15 E.1-1 basic",
        options=[k for k, v in deid.model_dump().items() if k.startswith("retain_") and v],
        clean_descriptors=deid.clean_descriptors,
        instances=len(result.datasets),
        masked_fraction=summary["masked_fraction"],
        audit=audit.get("verdict"),
    )


def _superseded(ctx: Context, series_uid: str, generation: int, *, written: bool) -> Outcome:
    if written:
        ctx.spool.discard_outputs(series_uid, generation)
    log.info("series %s job %d: superseded by a newer job", log_id(series_uid), generation)
    return Outcome.SUPERSEDED


def run_forward(ctx: Context, series_uid: str, generation: int, owner: str) -> Outcome:
    """C-STORE one generation's outputs to every destination; retry with backoff, then
    dead-letter. Instances a destination confirmed are skipped on the next attempt."""
    from gateway.forward import (
        PermanentForwardError,
        TransientForwardError,
        backoff_delays,
        destination_key,
        forward_series,
    )

    store, spool, settings = ctx.store, ctx.spool, ctx.settings
    fwd = settings.forward
    lid = log_id(series_uid)
    if not store.claim(
        series_uid, generation, Stage.FORWARD, owner, settings.gateway.lease_timeout_s
    ):
        log.info("series %s job %d: forward has nothing to do", lid, generation)
        return Outcome.NOTHING_TO_DO
    record = store.get(series_uid)
    files = spool.output_paths(series_uid, generation)
    started = time.monotonic()
    with leased(store, series_uid, owner, _lease_interval(settings)):
        if not files or not settings.destinations:
            reason = "no output files" if not files else "no destination configured"
            log.error("series %s job %d: cannot forward: %s", lid, generation, reason)
            store.dead_letter(series_uid, generation, owner, Stage.FORWARD, reason)
            return Outcome.FAILED
        for destination in settings.destinations:
            key = destination_key(destination)
            try:
                result = forward_series(files, destination, fwd, skip=record.confirmed.get(key, ()))
            except TransientForwardError as exc:
                store.confirm(series_uid, generation, owner, key, exc.confirmed)
                attempts = record.attempts + 1
                if attempts > fwd.retries:
                    log.error(
                        "series %s job %d: %s unreachable after %d attempts: dead-letter",
                        lid,
                        generation,
                        key,
                        attempts,
                    )
                    store.dead_letter(
                        series_uid,
                        generation,
                        owner,
                        Stage.FORWARD,
                        f"transient: {exc}",
                        attempts=attempts,
                    )
                    return Outcome.FAILED
                delay = backoff_delays(fwd.retries, fwd.backoff_base_s, fwd.backoff_cap_s)[
                    attempts - 1
                ]
                log.warning(
                    "series %s job %d: %s (attempt %d, next in %.0f s)",
                    lid,
                    generation,
                    exc,
                    attempts,
                    delay,
                )
                store.finish(
                    series_uid,
                    generation,
                    owner,
                    State.DEIDENTIFIED,
                    attempts=attempts,
                    next_attempt=time.time() + delay,
                    reason=f"transient: {exc}",
                )
                ctx.trail.record(
                    series_uid,
                    "forward_retry",
                    generation=generation,
                    destination=destination.ae_title,
                    attempt=attempts,
                    delay_s=round(delay, 1),
                )
                return Outcome.RETRY_LATER
            except PermanentForwardError as exc:
                store.confirm(series_uid, generation, owner, key, exc.confirmed)
                log.error("series %s job %d: %s: dead-letter", lid, generation, exc)
                store.dead_letter(
                    series_uid,
                    generation,
                    owner,
                    Stage.FORWARD,
                    f"permanent: {exc}",
                    attempts=record.attempts + 1,
                )
                return Outcome.FAILED
            except Exception as exc:  # a bug or local I/O error: dead-letter, keep files
                log.error(
                    "series %s job %d: forward failed (%s)", lid, generation, type(exc).__name__
                )
                log.debug("forward failure", exc_info=True)
                store.dead_letter(series_uid, generation, owner, Stage.FORWARD, type(exc).__name__)
                return Outcome.FAILED
            store.confirm(series_uid, generation, owner, key, result.confirmed)
            ctx.trail.record(
                series_uid,
                "forwarded",
                generation=generation,
                destination=destination.ae_title,
                confirmed=len(result.confirmed),
                sent=result.sent,
                warnings=len(result.warnings),
            )
    if not store.finish(series_uid, generation, owner, State.DONE, reason=None):
        return _superseded(ctx, series_uid, generation, written=False)
    ctx.trail.record(
        series_uid,
        "done",
        generation=generation,
        stage="forward",
        duration_s=round(time.monotonic() - started, 3),
    )
    log.info(
        "series %s job %d: forwarded to %s",
        lid,
        generation,
        json.dumps([destination_key(d) for d in settings.destinations]),
    )
    return Outcome.DONE


JOBS = {Stage.DEFACE: run_deface, Stage.FORWARD: run_forward}
