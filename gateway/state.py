"""Per-series state machine, persisted in SQLite (mercure's router, STYLE §4).

States and transitions::

    received --quiet period--> stable --claim--> defacing --> deidentified
    deidentified --claim--> forwarding --> done
    forwarding --transient error--> deidentified (retry after backoff) | failed (retries used)
    received (non-CT objects) / defacing (Series/Facemask/Deidentification error) --> quarantined
    defacing / forwarding --unexpected or permanent error--> failed (dead letter)
    any state --new or changed instance--> received, generation + 1

Each series row carries a *generation*: a new or changed instance arriving after the
series left ``received`` starts a new job (generation + 1, back to ``received``); a task
still working on the old generation finds the generation changed when it tries to finish
and discards its output. Work is claimed with an owner id and kept alive with a heartbeat
(the lease); a series whose owner stopped beating for ``lease_timeout`` is presumed
abandoned (e.g. its worker was SIGKILLed) and handed out again. ``dispatched`` records that
a task was queued for the current state, so the scheduler queues each step once.

Every read-modify-write runs in a ``BEGIN IMMEDIATE`` transaction, so several processes
(the gateway and Celery workers on a shared spool) can use the same file.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from gateway.keys import log_id


class State(StrEnum):
    RECEIVED = "received"
    STABLE = "stable"
    DEFACING = "defacing"
    DEIDENTIFIED = "deidentified"
    FORWARDING = "forwarding"
    DONE = "done"
    QUARANTINED = "quarantined"
    FAILED = "failed"  # dead letter: files kept, `defacegate retry` re-queues
    DISCARDED = "discarded"  # an operator deleted a quarantined or failed series' files


class Stage(StrEnum):
    """The two kinds of task; each starts from one state and works in another."""

    DEFACE = "deface"
    FORWARD = "forward"

    @property
    def ready_state(self) -> State:
        return State.STABLE if self is Stage.DEFACE else State.DEIDENTIFIED

    @property
    def working_state(self) -> State:
        return State.DEFACING if self is Stage.DEFACE else State.FORWARDING


PENDING = (State.RECEIVED, State.STABLE, State.DEFACING, State.DEIDENTIFIED, State.FORWARDING)
FINISHED = (State.DONE, State.QUARANTINED, State.FAILED, State.DISCARDED)


class Kind(StrEnum):
    CT = "ct"
    OTHER = "other"  # a non-CT image object: kept and quarantined, never processed


_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    series_uid    TEXT PRIMARY KEY,
    log_id        TEXT NOT NULL,
    state         TEXT NOT NULL,
    generation    INTEGER NOT NULL DEFAULT 1,
    kind          TEXT NOT NULL DEFAULT 'ct',
    instances     INTEGER NOT NULL DEFAULT 0,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    updated       REAL NOT NULL,
    owner         TEXT,
    heartbeat     REAL,
    dispatched    REAL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_attempt  REAL,
    confirmed     TEXT NOT NULL DEFAULT '{}',
    failed_stage  TEXT,
    reason        TEXT,
    outputs       INTEGER,
    purged        INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS series_state ON series(state);
"""


class UnknownSeriesError(LookupError):
    """No series with that UID is known to the state store."""


class NotRetryableError(ValueError):
    """The series is not in the dead-letter state (quarantined series are never retried)."""


@dataclass(frozen=True)
class SeriesRecord:
    """One row of the state table."""

    series_uid: str
    log_id: str
    state: State
    generation: int
    kind: Kind
    instances: int
    last_received: float
    owner: str | None
    heartbeat: float | None
    dispatched: float | None
    attempts: int
    next_attempt: float | None
    #: destination key → SOP Instance UIDs it confirmed (current generation).
    confirmed: dict[str, tuple[str, ...]]
    failed_stage: str | None
    reason: str | None
    outputs: int | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> SeriesRecord:
        return cls(
            series_uid=row["series_uid"],
            log_id=row["log_id"],
            state=State(row["state"]),
            generation=row["generation"],
            kind=Kind(row["kind"]),
            instances=row["instances"],
            last_received=row["last_received"],
            owner=row["owner"],
            heartbeat=row["heartbeat"],
            dispatched=row["dispatched"],
            attempts=row["attempts"],
            next_attempt=row["next_attempt"],
            confirmed={k: tuple(v) for k, v in json.loads(row["confirmed"]).items()},
            failed_stage=row["failed_stage"],
            reason=row["reason"],
            outputs=row["outputs"],
        )


@dataclass(frozen=True)
class Received:
    """What recording an instance did to its series."""

    generation: int
    new_series: bool
    superseded: bool  # a job had started (or finished) and is now replaced by a new one


class StateStore:
    """The state table; one connection per thread, a transaction per operation."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._db() as db:
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection (one per thread and process: a C-STORE costs no
        connect; a forked Celery child never reuses its parent's)."""
        local = self._local
        db: sqlite3.Connection | None = getattr(local, "db", None)
        if db is None or getattr(local, "pid", None) != os.getpid():
            db = self._connect()
            local.db, local.pid = db, os.getpid()
        yield db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: serialised against every other writer."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # -- reads ---------------------------------------------------------------------------
    def get(self, series_uid: str) -> SeriesRecord:
        with self._db() as db:
            row = db.execute("SELECT * FROM series WHERE series_uid=?", (series_uid,)).fetchone()
        if row is None:
            raise UnknownSeriesError("unknown series")
        return SeriesRecord.from_row(row)

    def find(self, *states: State) -> list[SeriesRecord]:
        marks = ",".join("?" * len(states))
        with self._db() as db:
            rows = db.execute(
                f"SELECT * FROM series WHERE state IN ({marks}) ORDER BY last_received",
                [str(s) for s in states],
            ).fetchall()
        return [SeriesRecord.from_row(r) for r in rows]

    def pending_count(self) -> int:
        marks = ",".join("?" * len(PENDING))
        with self._db() as db:
            (n,) = db.execute(
                f"SELECT COUNT(*) FROM series WHERE state IN ({marks})", [str(s) for s in PENDING]
            ).fetchone()
        return int(n)

    def admits(self, series_uid: str, max_pending: int) -> bool:
        """Backpressure: instances of a series already pending are always admitted (so no
        series is cut in half); a new series only while fewer than ``max_pending`` wait."""
        with self._db() as db:
            row = db.execute(
                "SELECT state FROM series WHERE series_uid=?", (series_uid,)
            ).fetchone()
        if row is not None and State(row["state"]) in PENDING:
            return True
        return self.pending_count() < max_pending

    # -- ingest --------------------------------------------------------------------------
    def record_instance(
        self, series_uid: str, *, kind: Kind, changed: bool, new_instance: bool
    ) -> Received:
        """Note a spooled instance. ``changed`` is False for an identical duplicate."""
        now = time.time()
        if changed:
            # Common case, one autocommit statement: another instance of a series that is
            # still being received (a quarter of the per-instance SQL cost of the
            # transaction below, which handles everything else).
            with self._db() as db:
                rows = db.execute(
                    "UPDATE series SET instances=instances+?, last_received=?, updated=?,"
                    " kind=CASE WHEN ?='other' THEN 'other' ELSE kind END"
                    " WHERE series_uid=? AND state=? RETURNING generation",
                    (1 if new_instance else 0, now, now, kind, series_uid, State.RECEIVED),
                ).fetchall()  # exhausted: the statement ends and its implicit transaction commits
            if rows:
                return Received(generation=int(rows[0][0]), new_series=False, superseded=False)
        with self._tx() as db:
            row = db.execute("SELECT * FROM series WHERE series_uid=?", (series_uid,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO series (series_uid, log_id, state, kind, instances,"
                    " first_received, last_received, updated) VALUES (?,?,?,?,?,?,?,?)",
                    (series_uid, log_id(series_uid), State.RECEIVED, kind, 1, now, now, now),
                )
                return Received(generation=1, new_series=True, superseded=False)
            gen = int(row["generation"])
            if not changed:
                return Received(generation=gen, new_series=False, superseded=False)
            new_kind = Kind.OTHER if kind is Kind.OTHER else Kind(row["kind"])
            added = 1 if new_instance else 0
            if State(row["state"]) is State.RECEIVED:
                db.execute(
                    "UPDATE series SET instances=instances+?, last_received=?, updated=?, kind=?"
                    " WHERE series_uid=?",
                    (added, now, now, new_kind, series_uid),
                )
                return Received(generation=gen, new_series=False, superseded=False)
            db.execute(
                "UPDATE series SET instances=instances+?, last_received=?, updated=?, kind=?,"
                " state=?, generation=generation+1, owner=NULL, heartbeat=NULL,"
                " dispatched=NULL, attempts=0, next_attempt=NULL, confirmed='{}',"
                " failed_stage=NULL, reason=NULL, outputs=NULL, purged=0 WHERE series_uid=?",
                (added, now, now, new_kind, State.RECEIVED, series_uid),
            )
            return Received(generation=gen + 1, new_series=False, superseded=True)

    def adopt(self, series_uid: str, instances: int) -> bool:
        """Register a series found in the spool but missing from the table (the gateway died
        between the fsync and the insert). Returns True if it was added."""
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO series (series_uid, log_id, state, instances,"
                " first_received, last_received, updated) VALUES (?,?,?,?,?,?,?)",
                (series_uid, log_id(series_uid), State.RECEIVED, instances, now, now, now),
            )
            return cur.rowcount == 1

    # -- scheduling ----------------------------------------------------------------------
    def settle(self, quiet_period_s: float, now: float | None = None) -> list[SeriesRecord]:
        """``received`` series quiet for ``quiet_period_s`` → ``stable`` (CT) or
        ``quarantined`` (other objects). Returns the rows that changed."""
        now = time.time() if now is None else now
        changed: list[str] = []
        with self._tx() as db:
            rows = db.execute(
                "SELECT series_uid, kind FROM series WHERE state=? AND last_received<=?",
                (State.RECEIVED, now - quiet_period_s),
            ).fetchall()
            for row in rows:
                if Kind(row["kind"]) is Kind.CT:
                    db.execute(
                        "UPDATE series SET state=?, dispatched=NULL, updated=? WHERE series_uid=?",
                        (State.STABLE, now, row["series_uid"]),
                    )
                else:
                    db.execute(
                        "UPDATE series SET state=?, reason=?, updated=? WHERE series_uid=?",
                        (State.QUARANTINED, "non-CT object", now, row["series_uid"]),
                    )
                changed.append(row["series_uid"])
        return [self.get(uid) for uid in changed]

    def reap(self, lease_timeout_s: float, now: float | None = None) -> list[SeriesRecord]:
        """Hand back work whose owner stopped heart-beating (worker killed, host lost)."""
        now = time.time() if now is None else now
        reaped: list[str] = []
        with self._tx() as db:
            for stage in Stage:
                rows = db.execute(
                    "SELECT series_uid FROM series WHERE state=? AND COALESCE(heartbeat, 0) < ?",
                    (stage.working_state, now - lease_timeout_s),
                ).fetchall()
                for row in rows:
                    db.execute(
                        "UPDATE series SET state=?, owner=NULL, heartbeat=NULL, dispatched=NULL,"
                        " updated=? WHERE series_uid=?",
                        (stage.ready_state, now, row["series_uid"]),
                    )
                    reaped.append(row["series_uid"])
        return [self.get(uid) for uid in reaped]

    def undispatched(self, now: float | None = None) -> list[tuple[Stage, SeriesRecord]]:
        """Series ready for a task that has not been queued yet (and whose retry is due)."""
        now = time.time() if now is None else now
        out: list[tuple[Stage, SeriesRecord]] = []
        for stage in Stage:
            for rec in self.find(stage.ready_state):
                if rec.dispatched is None and (rec.next_attempt is None or rec.next_attempt <= now):
                    out.append((stage, rec))
        return out

    def mark_dispatched(self, series_uid: str, generation: int, stage: Stage) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE series SET dispatched=? WHERE series_uid=? AND generation=? AND state=?",
                (time.time(), series_uid, generation, stage.ready_state),
            )
            return cur.rowcount == 1

    def forget_dispatches(self) -> None:
        """An in-process queue died with its process: everything ready must be queued again."""
        with self._tx() as db:
            db.execute("UPDATE series SET dispatched=NULL")

    # -- task side -----------------------------------------------------------------------
    def claim(
        self, series_uid: str, generation: int, stage: Stage, owner: str, lease_timeout_s: float
    ) -> bool:
        """Take the series for ``stage`` if it is ready, abandoned, or already ours (a
        redelivered message carries the same owner id). False: nothing for us to do."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT * FROM series WHERE series_uid=?", (series_uid,)).fetchone()
            if row is None or int(row["generation"]) != generation:
                return False
            state = State(row["state"])
            if state is stage.working_state:
                stale = (row["heartbeat"] or 0.0) < now - lease_timeout_s
                if row["owner"] != owner and not stale:
                    return False
            elif state is not stage.ready_state:
                return False
            db.execute(
                "UPDATE series SET state=?, owner=?, heartbeat=?, updated=? WHERE series_uid=?",
                (stage.working_state, owner, now, now, series_uid),
            )
            return True

    def beat(self, series_uid: str, owner: str) -> bool:
        """Renew the lease; False if we no longer own the series."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE series SET heartbeat=? WHERE series_uid=? AND owner=? AND state IN (?,?)",
                (time.time(), series_uid, owner, State.DEFACING, State.FORWARDING),
            )
            return cur.rowcount == 1

    def finish(
        self,
        series_uid: str,
        generation: int,
        owner: str,
        state: State,
        **fields: object,
    ) -> bool:
        """Move the series we own to ``state``; False if it was superseded or taken over."""
        allowed = {"attempts", "next_attempt", "failed_stage", "reason", "outputs"}
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"unknown state fields: {sorted(unknown)}")
        sets = "".join(f", {k}=?" for k in fields)
        with self._tx() as db:
            cur = db.execute(
                "UPDATE series SET state=?, owner=NULL, heartbeat=NULL, dispatched=NULL,"
                f" updated=?{sets} WHERE series_uid=? AND generation=? AND owner=?",
                (state, time.time(), *fields.values(), series_uid, generation, owner),
            )
            return cur.rowcount == 1

    def dead_letter(
        self,
        series_uid: str,
        generation: int,
        owner: str,
        stage: Stage,
        reason: str,
        **fields: object,
    ) -> bool:
        """Move the series we own to the dead-letter state (``failed``) for ``stage``: files
        are kept and ``defacegate retry`` re-queues it. False if superseded or taken over."""
        return self.finish(
            series_uid,
            generation,
            owner,
            State.FAILED,
            failed_stage=stage.value,
            reason=reason,
            **fields,
        )

    def confirm(
        self,
        series_uid: str,
        generation: int,
        owner: str,
        destination: str,
        sop_uids: Iterable[str],
    ) -> None:
        """Record the instances ``destination`` confirmed, so a retry can skip them."""
        with self._tx() as db:
            row = db.execute(
                "SELECT confirmed FROM series WHERE series_uid=? AND generation=? AND owner=?",
                (series_uid, generation, owner),
            ).fetchone()
            if row is None:
                return
            done = json.loads(row["confirmed"])
            done[destination] = sorted(set(done.get(destination, ())) | set(sop_uids))
            db.execute(
                "UPDATE series SET confirmed=?, heartbeat=? WHERE series_uid=?",
                (json.dumps(done), time.time(), series_uid),
            )

    # -- operator ------------------------------------------------------------------------
    def retry(self, series_uid: str, *, has_outputs: bool) -> SeriesRecord:
        """Re-queue a dead-lettered series: forwarding again if its outputs exist, else the
        whole job. Quarantined series stay quarantined (fail closed)."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM series WHERE series_uid=?", (series_uid,)).fetchone()
            if row is None:
                raise UnknownSeriesError("unknown series")
            if State(row["state"]) is not State.FAILED:
                raise NotRetryableError(f"series is {row['state']}, not failed")
            target = (
                State.DEIDENTIFIED
                if row["failed_stage"] == Stage.FORWARD and has_outputs
                else State.STABLE
            )
            db.execute(
                "UPDATE series SET state=?, attempts=0, next_attempt=NULL, dispatched=NULL,"
                " owner=NULL, heartbeat=NULL, failed_stage=NULL, reason=NULL, updated=?"
                " WHERE series_uid=?",
                (target, time.time(), series_uid),
            )
        return self.get(series_uid)

    def release(self, series_uid: str, *, has_outputs: bool) -> SeriesRecord:
        """An operator reviewed a quarantined series whose defaced, de-identified outputs
        exist (quarantined after de-identification, e.g. by the privacy audit) and lets it be
        forwarded. A series quarantined before de-identification has nothing to release."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM series WHERE series_uid=?", (series_uid,)).fetchone()
            if row is None:
                raise UnknownSeriesError("unknown series")
            if State(row["state"]) is not State.QUARANTINED:
                raise NotRetryableError(f"series is {row['state']}, not quarantined")
            if not has_outputs:
                raise NotRetryableError("quarantined before de-identification: nothing to release")
            db.execute(
                "UPDATE series SET state=?, attempts=0, next_attempt=NULL, dispatched=NULL,"
                " owner=NULL, heartbeat=NULL, reason=NULL, updated=? WHERE series_uid=?",
                (State.DEIDENTIFIED, time.time(), series_uid),
            )
        return self.get(series_uid)

    def discard(self, series_uid: str) -> SeriesRecord:
        """Mark a quarantined or failed series discarded (the caller deletes its files)."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM series WHERE series_uid=?", (series_uid,)).fetchone()
            if row is None:
                raise UnknownSeriesError("unknown series")
            if State(row["state"]) not in (State.QUARANTINED, State.FAILED):
                raise NotRetryableError(f"series is {row['state']}, not quarantined or failed")
            db.execute(
                "UPDATE series SET state=?, purged=1, owner=NULL, dispatched=NULL, updated=?"
                " WHERE series_uid=?",
                (State.DISCARDED, time.time(), series_uid),
            )
        return self.get(series_uid)

    def expired(self, retention_s: float, now: float | None = None) -> list[SeriesRecord]:
        """Finished-and-forwarded series older than the retention period, not yet purged."""
        now = time.time() if now is None else now
        with self._db() as db:
            rows = db.execute(
                "SELECT * FROM series WHERE state=? AND purged=0 AND updated<=?",
                (State.DONE, now - retention_s),
            ).fetchall()
        return [SeriesRecord.from_row(r) for r in rows]

    def mark_purged(self, series_uid: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE series SET purged=1 WHERE series_uid=? AND state=?",
                (series_uid, State.DONE),
            )
