"""Operator actions on a series, shared by the CLI and the admin API.

Each action changes the state (fail closed: only what the state machine allows), touches the
spool where needed, and leaves an entry in the audit trail.
"""

from __future__ import annotations

import shutil

from gateway.spool import Spool
from gateway.state import SeriesRecord, State, StateStore, UnknownSeriesError
from gateway.trail import AuditTrail


def find(store: StateStore, series: str) -> SeriesRecord:
    """A series by its log id (as logs, metrics and the API show it) or its UID."""
    for rec in store.find(*State):
        if series in (rec.log_id, rec.series_uid):
            return rec
    raise UnknownSeriesError("unknown series")


def _has_outputs(spool: Spool, rec: SeriesRecord) -> bool:
    return bool(spool.output_paths(rec.series_uid, rec.generation))


def retry(
    store: StateStore, spool: Spool, trail: AuditTrail, rec: SeriesRecord, by: str
) -> SeriesRecord:
    """Re-queue a dead-lettered (failed) series."""
    new = store.retry(rec.series_uid, has_outputs=_has_outputs(spool, rec))
    trail.record(rec.series_uid, "retried", generation=new.generation, by=by)
    return new


def release(
    store: StateStore, spool: Spool, trail: AuditTrail, rec: SeriesRecord, by: str
) -> SeriesRecord:
    """Forward a quarantined series after review; only one whose defaced, de-identified
    outputs exist (held by the privacy audit) can be released."""
    new = store.release(rec.series_uid, has_outputs=_has_outputs(spool, rec))
    trail.record(rec.series_uid, "released", generation=new.generation, by=by)
    return new


def discard(
    store: StateStore, spool: Spool, trail: AuditTrail, rec: SeriesRecord, by: str
) -> SeriesRecord:
    """Delete a quarantined or failed series from the spool; nothing is forwarded."""
    new = store.discard(rec.series_uid)
    shutil.rmtree(spool.series_dir(rec.series_uid), ignore_errors=True)
    trail.record(rec.series_uid, "discarded", generation=new.generation, by=by)
    return new
