"""The per-series state machine in SQLite: quiet period, claims and leases, superseding jobs,
retries, backpressure, retention, and several processes sharing one file."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from gateway.state import (
    Kind,
    NotRetryableError,
    Stage,
    State,
    StateStore,
    UnknownSeriesError,
)

UID = "1.2.826.0.1.3680043.8.498.7"


def _received(store: StateStore, uid: str = UID, n: int = 3, kind: Kind = Kind.CT) -> None:
    for _ in range(n):
        store.record_instance(uid, kind=kind, changed=True, new_instance=True)


def _to_stable(store: StateStore) -> None:
    store.settle(0.0, now=time.time() + 1)


def test_quiet_period_makes_a_series_stable(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    _received(store)
    rec = store.get(UID)
    assert (rec.state, rec.instances, rec.generation) == (State.RECEIVED, 3, 1)
    assert store.settle(10.0, now=rec.last_received + 5) == []
    (settled,) = store.settle(10.0, now=rec.last_received + 10)
    assert settled.state is State.STABLE
    assert store.undispatched() == [(Stage.DEFACE, store.get(UID))]


def test_identical_duplicate_changes_nothing(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    _received(store, n=1)
    _to_stable(store)
    got = store.record_instance(UID, kind=Kind.CT, changed=False, new_instance=False)
    assert not got.superseded
    rec = store.get(UID)
    assert (rec.state, rec.instances, rec.generation) == (State.STABLE, 1, 1)


def test_non_ct_series_is_quarantined_not_processed(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    _received(store, kind=Kind.OTHER, n=1)
    _to_stable(store)
    rec = store.get(UID)
    assert rec.state is State.QUARANTINED and rec.reason == "non-CT object"
    assert store.undispatched() == []


def test_claim_lease_and_finish(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    _received(store)
    _to_stable(store)
    assert store.claim(UID, 1, Stage.DEFACE, "a", lease_timeout_s=60)
    # A duplicate message with another id finds the series taken.
    assert not store.claim(UID, 1, Stage.DEFACE, "b", lease_timeout_s=60)
    # The same task redelivered (worker child killed) may take it again.
    assert store.claim(UID, 1, Stage.DEFACE, "a", lease_timeout_s=60)
    assert not store.claim(UID, 1, Stage.FORWARD, "a", lease_timeout_s=60)
    assert store.beat(UID, "a") and not store.beat(UID, "b")
    assert not store.finish(UID, 1, "b", State.DEIDENTIFIED)
    assert store.finish(UID, 1, "a", State.DEIDENTIFIED, outputs=3)
    rec = store.get(UID)
    assert (rec.state, rec.owner, rec.outputs) == (State.DEIDENTIFIED, None, 3)
    assert store.undispatched() == [(Stage.FORWARD, rec)]


def test_expired_lease_is_reaped_and_stale_owner_cannot_finish(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    _received(store)
    _to_stable(store)
    assert store.claim(UID, 1, Stage.DEFACE, "dead", lease_timeout_s=60)
    assert store.reap(60.0) == []
    (reaped,) = store.reap(60.0, now=time.time() + 61)
    assert reaped.state is State.STABLE and reaped.dispatched is None
    assert store.claim(UID, 1, Stage.DEFACE, "new", lease_timeout_s=60)
    assert not store.finish(UID, 1, "dead", State.DEIDENTIFIED)


def test_late_instance_supersedes_the_running_job(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    _received(store)
    _to_stable(store)
    assert store.claim(UID, 1, Stage.DEFACE, "a", lease_timeout_s=60)
    got = store.record_instance(UID, kind=Kind.CT, changed=True, new_instance=True)
    assert got.superseded and got.generation == 2
    rec = store.get(UID)
    assert (rec.state, rec.generation, rec.instances, rec.owner) == (State.RECEIVED, 2, 4, None)
    # The old job can neither finish nor be claimed again.
    assert not store.finish(UID, 1, "a", State.DEIDENTIFIED)
    assert not store.claim(UID, 1, Stage.DEFACE, "a", lease_timeout_s=60)
    _to_stable(store)
    assert store.claim(UID, 2, Stage.DEFACE, "b", lease_timeout_s=60)


def test_instance_after_done_starts_a_new_job(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    _received(store)
    _to_stable(store)
    store.claim(UID, 1, Stage.DEFACE, "a", 60)
    store.finish(UID, 1, "a", State.DEIDENTIFIED)
    store.claim(UID, 1, Stage.FORWARD, "f", 60)
    store.confirm(UID, 1, "f", "PACS@h:1", ["1.1", "1.2"])
    assert store.get(UID).confirmed == {"PACS@h:1": ("1.1", "1.2")}
    store.finish(UID, 1, "f", State.DONE)
    got = store.record_instance(UID, kind=Kind.CT, changed=True, new_instance=True)
    rec = store.get(UID)
    assert got.superseded and rec.state is State.RECEIVED and rec.generation == 2
    assert rec.confirmed == {}


def test_retry_of_dead_letter_only(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    with pytest.raises(UnknownSeriesError):
        store.retry(UID, has_outputs=True)
    _received(store)
    _to_stable(store)
    store.claim(UID, 1, Stage.DEFACE, "a", 60)
    store.finish(UID, 1, "a", State.DEIDENTIFIED)
    store.claim(UID, 1, Stage.FORWARD, "f", 60)
    with pytest.raises(NotRetryableError):
        store.retry(UID, has_outputs=True)
    store.finish(UID, 1, "f", State.FAILED, failed_stage="forward", reason="x", attempts=7)
    rec = store.retry(UID, has_outputs=True)
    assert (rec.state, rec.attempts, rec.reason, rec.dispatched) == (
        State.DEIDENTIFIED,
        0,
        None,
        None,
    )
    # Without outputs (or after a deface failure) the whole job runs again.
    store.claim(UID, 1, Stage.FORWARD, "f2", 60)
    store.finish(UID, 1, "f2", State.FAILED, failed_stage="forward")
    assert store.retry(UID, has_outputs=False).state is State.STABLE


def test_quarantined_series_is_never_retried(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    _received(store, kind=Kind.OTHER)
    _to_stable(store)
    with pytest.raises(NotRetryableError, match="quarantined"):
        store.retry(UID, has_outputs=False)


def test_backpressure_admits_pending_series_but_not_new_ones(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    for i in range(3):
        _received(store, uid=f"1.2.{i}", n=1)
    assert store.pending_count() == 3
    assert store.admits("1.2.0", max_pending=3)  # already pending: never cut in half
    assert not store.admits("1.2.99", max_pending=3)
    assert store.admits("1.2.99", max_pending=4)


def test_scheduled_retry_waits_until_due(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    _received(store)
    _to_stable(store)
    store.claim(UID, 1, Stage.DEFACE, "a", 60)
    store.finish(UID, 1, "a", State.DEIDENTIFIED)
    store.claim(UID, 1, Stage.FORWARD, "f", 60)
    store.finish(UID, 1, "f", State.DEIDENTIFIED, attempts=1, next_attempt=time.time() + 30)
    assert store.undispatched() == []
    assert [s for s, _ in store.undispatched(now=time.time() + 31)] == [Stage.FORWARD]
    assert store.mark_dispatched(UID, 1, Stage.FORWARD)
    assert store.undispatched(now=time.time() + 31) == []
    store.forget_dispatches()
    assert len(store.undispatched(now=time.time() + 31)) == 1


def test_retention_lists_done_series_once(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    _received(store)
    _to_stable(store)
    store.claim(UID, 1, Stage.DEFACE, "a", 60)
    store.finish(UID, 1, "a", State.DEIDENTIFIED)
    store.claim(UID, 1, Stage.FORWARD, "f", 60)
    store.finish(UID, 1, "f", State.DONE)
    assert store.expired(3600.0) == []
    assert [r.series_uid for r in store.expired(3600.0, now=time.time() + 3601)] == [UID]
    store.mark_purged(UID)
    assert store.expired(0.0, now=time.time() + 1) == []


def test_adopt_registers_a_spooled_series_once(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    assert store.adopt(UID, 5)
    assert not store.adopt(UID, 5)
    assert store.get(UID).instances == 5


def _hammer(path: str, owner: str, n: int) -> None:
    store = StateStore(Path(path))
    for _ in range(n):
        store.record_instance(UID, kind=Kind.CT, changed=True, new_instance=True)
        store.claim(UID, store.get(UID).generation, Stage.DEFACE, owner, 60)


def test_processes_share_the_file_without_lost_updates(tmp_path: Path) -> None:
    """Two processes record instances concurrently; every increment survives."""
    path = tmp_path / "s.db"
    StateStore(path)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(str(path), f"p{i}", 50)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert StateStore(path).get(UID).instances == 100


def test_operator_release_and_discard(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    _received(store)
    _to_stable(store)
    store.claim(UID, 1, Stage.DEFACE, "a", 60)
    with pytest.raises(NotRetryableError, match="not quarantined"):
        store.release(UID, has_outputs=True)
    store.finish(UID, 1, "a", State.QUARANTINED, reason="AuditRejected")
    with pytest.raises(NotRetryableError, match="nothing to release"):
        store.release(UID, has_outputs=False)
    released = store.release(UID, has_outputs=True)
    assert (released.state, released.reason, released.dispatched) == (
        State.DEIDENTIFIED,
        None,
        None,
    )
    with pytest.raises(NotRetryableError):
        store.discard(UID)
    store.claim(UID, 1, Stage.FORWARD, "f", 60)
    store.finish(UID, 1, "f", State.FAILED, failed_stage="forward")
    assert store.discard(UID).state is State.DISCARDED
    assert store.pending_count() == 0 and store.expired(0.0, now=time.time() + 1) == []
