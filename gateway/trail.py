"""The per-series audit trail: who sent what, which profile and engine ran, what the privacy
audit said, which destination confirmed — with pseudonymous identifiers only.

Rows live in a table of the gateway's SQLite state file, so the gateway, Celery workers on
the shared spool and the admin API all see one trail; stage latencies for the metrics are
read from it too. Details are restricted to scalars (and lists of scalars) chosen by the
caller from a fixed vocabulary: AE titles, engine and option names, counts, scores, error
types. Never dataset values.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.keys import log_id

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    ts          REAL NOT NULL,
    log_id      TEXT NOT NULL,
    generation  INTEGER,
    event       TEXT NOT NULL,
    stage       TEXT,
    duration_s  REAL,
    detail      TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS events_series ON events(log_id, id);
"""

_SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class Event:
    """One trail entry, as the API and the audit report show it."""

    ts: float
    log_id: str
    generation: int | None
    event: str
    stage: str | None
    duration_s: float | None
    detail: dict[str, Any]


def _check(detail: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in detail.items():
        if isinstance(value, list | tuple):
            if not all(isinstance(v, _SCALARS) for v in value):
                raise TypeError(f"trail detail {key!r} must hold scalars")
            value = list(value)
        elif isinstance(value, dict):
            value = _check(value)
        elif not isinstance(value, _SCALARS):
            raise TypeError(f"trail detail {key!r} must be a scalar, got {type(value).__name__}")
        out[key] = value
    return out


class AuditTrail:
    """Append-only event log of series, next to the state table."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.executescript(_SCHEMA)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            yield db
        finally:
            db.close()

    def record(
        self,
        series_uid: str,
        event: str,
        *,
        generation: int | None = None,
        stage: str | None = None,
        duration_s: float | None = None,
        **detail: Any,
    ) -> None:
        """Append one event; the series is stored by its :func:`log_id` only."""
        payload = json.dumps(_check(detail), sort_keys=True)
        with self._db() as db:
            db.execute(
                "INSERT INTO events (ts, log_id, generation, event, stage, duration_s, detail)"
                " VALUES (?,?,?,?,?,?,?)",
                (time.time(), log_id(series_uid), generation, event, stage, duration_s, payload),
            )

    def events(self, series_log_id: str) -> list[Event]:
        with self._db() as db:
            rows = db.execute(
                "SELECT * FROM events WHERE log_id=? ORDER BY id", (series_log_id,)
            ).fetchall()
        return [
            Event(
                ts=r["ts"],
                log_id=r["log_id"],
                generation=r["generation"],
                event=r["event"],
                stage=r["stage"],
                duration_s=r["duration_s"],
                detail=json.loads(r["detail"]),
            )
            for r in rows
        ]

    def durations(self) -> dict[str, list[float]]:
        """Every recorded stage latency, by stage (for the metrics' histograms)."""
        out: dict[str, list[float]] = {}
        with self._db() as db:
            for r in db.execute(
                "SELECT stage, duration_s FROM events WHERE duration_s IS NOT NULL"
                " AND stage IS NOT NULL"
            ):
                out.setdefault(r["stage"], []).append(float(r["duration_s"]))
        return out

    def count(self, event: str) -> int:
        with self._db() as db:
            (n,) = db.execute("SELECT COUNT(*) FROM events WHERE event=?", (event,)).fetchone()
        return int(n)
