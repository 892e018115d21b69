"""The jobs (deface+de-identify, forward) and the service around them, with real peers.

In-process tests drive :mod:`gateway.tasks` against a real dcmtk ``storescp`` destination with a
small box-masking engine injected through :class:`gateway.tasks.Context` (plumbing only; the
real engines are tested in their own suites). The subprocess tests run the real
``defacegate serve`` (embedded) and ``defacegate worker`` (Celery on a private Redis) with the
default anatomical engine on a small phantom, and SIGKILL them mid-flight.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from gateway.config import Settings
from gateway.service import Gateway
from gateway.spool import StoreOutcome
from gateway.state import Kind, State
from gateway.tasks import Context, Outcome, run_deface, run_forward
from inference.dicomgen import make_ct_series
from inference.errors import FacemaskError
from inference.geometry import Geometry
from inference.phantom import PhantomOptions, generate_phantom, write_phantom
from tests.support.gateway import (
    DEFACEGATE,
    TEST_KEY,
    GatewayProcess,
    RedisServer,
    WorkerProcess,
    write_config,
)
from tests.support.pacs import LOCALHOST, StoreSCP, free_port, storescu, wait_for

PHI_NAME = "TASKTEST^PATIENT"
FINAL = ("done", "quarantined", "failed")


class BoxEngine:
    """Masks a fixed corner box; ``before`` runs first (to act mid-job), ``error`` is raised."""

    name = "box"

    def __init__(
        self, before: Callable[[], None] | None = None, error: Exception | None = None
    ) -> None:
        self.before = before
        self.error = error
        self.calls = 0

    def mask(self, hu: np.ndarray, geometry: Geometry) -> np.ndarray:
        self.calls += 1
        if self.before is not None:
            self.before()
        if self.error is not None:
            raise self.error
        mask = np.zeros(hu.shape, bool)
        mask[:, :4, :4] = True
        return mask


def _series(n: int = 6) -> list[Dataset]:
    hu = np.full((n, 16, 16), 40.0, np.float32)
    header = Dataset()
    header.PatientName = PHI_NAME
    header.PatientID = "MRN-77"
    return make_ct_series(
        hu, Geometry(affine=np.diag([2.0, 0.5, 0.5, 1.0]), shape=hu.shape), header=header
    )


def _settings(tmp_path: Path, port: int, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "deid": {"key": TEST_KEY},
        "volume": {"min_slices": 4},
        # Box engines on tiny volumes: the privacy audit would rightly refuse them. The gate
        # is tested in tests/test_pipeline_audit.py, tests/test_ops.py and the e2e tests.
        "audit": {"enabled": False},
        "admin": {"port": 0},
        "gateway": {
            "spool_dir": tmp_path / "spool",
            "free_space_floor_mb": 0,
            "lease_timeout_s": 30.0,
            "quiet_period_s": 0.0,
            "host": LOCALHOST,
            "port": 0,
        },
        "destinations": [{"ae_title": "STORESCP", "host": LOCALHOST, "port": port}],
        "forward": {"retries": 1, "backoff_base_s": 0.1, "backoff_cap_s": 0.1},
    }
    for key, value in extra.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) else value
    return Settings(**values)


@dataclass
class Env:
    ctx: Context
    engine: BoxEngine
    series_uid: str
    datasets: list[Dataset]

    def receive(self, datasets: list[Dataset]) -> None:
        """What the SCP does for each instance (tested in test_scp): spool, then record."""
        for ds in datasets:
            buf = BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            outcome = self.ctx.spool.store(ds.SeriesInstanceUID, ds.SOPInstanceUID, buf.getvalue())
            self.ctx.store.record_instance(
                ds.SeriesInstanceUID,
                kind=Kind.CT,
                changed=outcome is not StoreOutcome.DUPLICATE,
                new_instance=outcome is StoreOutcome.NEW,
            )

    def settle(self) -> int:
        self.ctx.store.settle(0.0, now=time.time() + 1)
        return self.ctx.store.get(self.series_uid).generation

    def state(self) -> State:
        return self.ctx.store.get(self.series_uid).state


def _env(
    tmp_path: Path, port: int, engine: BoxEngine, n: int = 6, held_back: int = 0, **extra: Any
) -> Env:
    """A context whose spool already holds the first ``n - held_back`` of ``n`` slices."""
    settings = _settings(tmp_path, port, **extra)
    ctx = Context.from_settings(settings, engine=lambda: engine)
    datasets = _series(n)
    env = Env(ctx, engine, datasets[0].SeriesInstanceUID, datasets)
    env.receive(datasets[: n - held_back])
    return env


@pytest.fixture
def destination(tmp_path: Path) -> Iterator[StoreSCP]:
    with StoreSCP(tmp_path / "dest", extra_args=["-v"]) as scp:
        scp.start()
        yield scp


def _stores(scp: StoreSCP) -> int:
    """C-STORE requests the destination received (counts duplicates, unlike its files)."""
    log = (scp.root / "storescp.log").read_text(errors="replace")
    return len(re.findall(r"Received Store Request", log))


def test_deface_then_forward_delivers_a_deidentified_defaced_series(
    tmp_path: Path, destination: StoreSCP
) -> None:
    env = _env(tmp_path, destination.port, BoxEngine())
    gen = env.settle()
    assert run_deface(env.ctx, env.series_uid, gen, owner="t1") is Outcome.DEIDENTIFIED
    outputs = env.ctx.spool.output_paths(env.series_uid, gen)
    assert len(outputs) == 6 and env.state() is State.DEIDENTIFIED
    assert run_forward(env.ctx, env.series_uid, gen, owner="t2") is Outcome.DONE
    assert env.state() is State.DONE
    received = destination.received()
    assert len(received) == 6 and _stores(destination) == 6
    originals = {ds.SOPInstanceUID for ds in env.datasets}
    for path in received:
        assert PHI_NAME.encode() not in path.read_bytes()
        ds = dcmread(path)
        assert ds.SOPInstanceUID not in originals
        assert ds.SeriesInstanceUID != env.series_uid
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.all(hu[:4, :4] == -1000) and np.all(hu[8:, 8:] == 40)
    # Inputs stay in the spool until retention removes them.
    assert len(env.ctx.spool.instance_paths(env.series_uid)) == 6
    # Idempotent: duplicates of both messages find nothing to do; nothing is sent twice.
    assert run_deface(env.ctx, env.series_uid, gen, owner="t3") is Outcome.NOTHING_TO_DO
    assert run_forward(env.ctx, env.series_uid, gen, owner="t4") is Outcome.NOTHING_TO_DO
    assert _stores(destination) == 6 and env.engine.calls == 1


@pytest.mark.parametrize(
    ("engine", "n", "reason"),
    [
        (BoxEngine(error=FacemaskError("no face found")), 6, "FacemaskError"),
        (BoxEngine(), 2, "GeometryError"),  # fewer slices than volume.min_slices
    ],
    ids=["facemask-error", "series-error"],
)
def test_failures_of_the_core_quarantine_and_never_forward(
    tmp_path: Path, destination: StoreSCP, engine: BoxEngine, n: int, reason: str
) -> None:
    env = _env(tmp_path, destination.port, engine, n=n)
    gen = env.settle()
    assert run_deface(env.ctx, env.series_uid, gen, owner="t") is Outcome.QUARANTINED
    rec = env.ctx.store.get(env.series_uid)
    assert rec.state is State.QUARANTINED and rec.reason == reason
    assert env.ctx.spool.output_paths(env.series_uid, gen) == []
    assert len(env.ctx.spool.instance_paths(env.series_uid)) == n  # files kept
    assert env.ctx.store.undispatched() == []
    assert run_forward(env.ctx, env.series_uid, gen, owner="f") is Outcome.NOTHING_TO_DO
    assert destination.received() == []


def test_unexpected_error_dead_letters_and_retry_runs_the_job_again(
    tmp_path: Path, destination: StoreSCP
) -> None:
    engine = BoxEngine(error=RuntimeError("bug"))
    env = _env(tmp_path, destination.port, engine)
    gen = env.settle()
    assert run_deface(env.ctx, env.series_uid, gen, owner="t") is Outcome.FAILED
    rec = env.ctx.store.get(env.series_uid)
    assert (rec.state, rec.failed_stage, rec.reason) == (State.FAILED, "deface", "RuntimeError")
    engine.error = None
    assert env.ctx.store.retry(env.series_uid, has_outputs=False).state is State.STABLE
    assert run_deface(env.ctx, env.series_uid, gen, owner="t2") is Outcome.DEIDENTIFIED


def test_a_late_instance_supersedes_the_running_job(tmp_path: Path, destination: StoreSCP) -> None:
    engine = BoxEngine()
    env = _env(tmp_path, destination.port, engine, n=7, held_back=1)
    engine.before = lambda: env.receive(env.datasets[6:])  # arrives while the engine runs
    gen = env.settle()
    assert run_deface(env.ctx, env.series_uid, gen, owner="t") is Outcome.SUPERSEDED
    assert env.ctx.spool.output_paths(env.series_uid, gen) == []
    rec = env.ctx.store.get(env.series_uid)
    assert (rec.state, rec.generation, rec.instances) == (State.RECEIVED, gen + 1, 7)
    engine.before = None
    new_gen = env.settle()
    assert run_deface(env.ctx, env.series_uid, new_gen, owner="t2") is Outcome.DEIDENTIFIED
    assert len(env.ctx.spool.output_paths(env.series_uid, new_gen)) == 7


def test_forward_backs_off_dead_letters_and_retry_delivers(tmp_path: Path) -> None:
    port = free_port()  # nothing listens yet: the destination is down
    env = _env(tmp_path, port, BoxEngine())
    gen = env.settle()
    run_deface(env.ctx, env.series_uid, gen, owner="t")
    assert run_forward(env.ctx, env.series_uid, gen, owner="f1") is Outcome.RETRY_LATER
    rec = env.ctx.store.get(env.series_uid)
    assert rec.state is State.DEIDENTIFIED and rec.attempts == 1
    assert rec.next_attempt is not None and rec.next_attempt > time.time() - 1
    assert run_forward(env.ctx, env.series_uid, gen, owner="f2") is Outcome.FAILED
    rec = env.ctx.store.get(env.series_uid)
    assert (rec.state, rec.failed_stage) == (State.FAILED, "forward")
    assert len(env.ctx.spool.output_paths(env.series_uid, gen)) == 6  # nothing deleted
    # The operator command, by the log id shown in the logs.
    config = write_config(
        tmp_path / "cli",
        gateway={"spool_dir": str(env.ctx.settings.gateway.spool_dir)},
        destinations=[{"ae_title": "STORESCP", "host": LOCALHOST, "port": port}],
    )
    listed = subprocess.run(
        [DEFACEGATE, "--config", str(config), "retry", "--list"], capture_output=True, text=True
    )
    assert listed.returncode == 0 and rec.log_id in listed.stdout
    assert env.series_uid not in listed.stdout
    with StoreSCP(tmp_path / "dest", port=port) as scp:
        scp.start()
        again = subprocess.run(
            [DEFACEGATE, "--config", str(config), "retry", rec.log_id],
            capture_output=True,
            text=True,
        )
        assert again.returncode == 0, again.stderr
        assert env.state() is State.DEIDENTIFIED
        assert run_forward(env.ctx, env.series_uid, gen, owner="f3") is Outcome.DONE
        assert len(scp.received()) == 6
    refused = subprocess.run(
        [DEFACEGATE, "--config", str(config), "retry", env.series_uid],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 1 and "not failed" in refused.stderr


def test_permanent_rejection_dead_letters_at_once(tmp_path: Path) -> None:
    port = free_port()
    env = _env(tmp_path, port, BoxEngine(), forward={"retries": 5})
    # dcmtk storescp --refuse answers every association with A-ASSOCIATE-RJ (permanent).
    refusing = subprocess.Popen(
        ["storescp", "--refuse", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    try:
        wait_for(lambda: _listening(port), 10, "storescp --refuse")
        gen = env.settle()
        run_deface(env.ctx, env.series_uid, gen, owner="t")
        # storescp --refuse occasionally drops the first connection after the readiness
        # probe instead of rejecting it: that is a transient error, retried as the scheduler
        # would. The rejection itself must dead-letter at once, not after the 5 retries.
        for attempt in range(3):
            outcome = run_forward(env.ctx, env.series_uid, gen, owner=f"f{attempt}")
            if outcome is not Outcome.RETRY_LATER:
                break
        assert outcome is Outcome.FAILED
        rec = env.ctx.store.get(env.series_uid)
        assert rec.state is State.FAILED and rec.attempts <= attempt + 1 < 5
        assert rec.reason is not None and rec.reason.startswith("permanent")
    finally:
        refusing.terminate()
        refusing.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((LOCALHOST, port)) == 0


def test_scheduler_settles_dispatches_and_purges_in_process(
    tmp_path: Path, destination: StoreSCP
) -> None:
    """The embedded service end to end without a subprocess: SCP-less receive, one tick at a
    time, retention 0 removes the finished series from the spool."""
    settings = _settings(tmp_path, destination.port, gateway={"retention_hours": 0.0})
    gateway = Gateway(settings, ctx=Context.from_settings(settings, engine=BoxEngine))
    datasets = _series()
    env = Env(gateway.ctx, BoxEngine(), datasets[0].SeriesInstanceUID, datasets)
    env.receive(datasets)
    gateway.dispatcher.start()
    try:

        def advanced() -> bool:
            gateway.tick()
            rec = gateway.ctx.store.get(env.series_uid)
            return rec.state is State.DONE and not gateway.ctx.spool.instance_paths(env.series_uid)

        wait_for(advanced, 60, "series done and purged", interval=0.1)
    finally:
        gateway.dispatcher.stop()
        gateway.scp.stop()
    assert len(destination.received()) == 6


# -- subprocesses: the real commands, the real engine, SIGKILL ---------------------------------
@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    phantom = generate_phantom(PhantomOptions(matrix=64, fov="head", slice_thickness=5.0, phi=True))
    return write_phantom(phantom, tmp_path_factory.mktemp("phantom"))


def _series_uid(directory: Path) -> str:
    return str(dcmread(next(directory.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)


def test_embedded_serve_survives_sigkill_after_acknowledged_stores(
    tmp_path: Path, destination: StoreSCP, phantom_dir: Path
) -> None:
    config = write_config(
        tmp_path / "gw",
        gateway={"quiet_period_s": 3.0},
        destinations=[{"ae_title": "STORESCP", "host": LOCALHOST, "port": destination.port}],
    )
    series_uid = _series_uid(phantom_dir)
    n = len(list(phantom_dir.glob("*.dcm")))
    gw = GatewayProcess(config).start()
    try:
        storescu([phantom_dir], gw.port, gw.ae_title)  # every store acknowledged
        gw.kill()  # within the quiet period: nothing processed yet
        assert gw.state(series_uid) == "received"
        gw.start()
        wait_for(lambda: gw.state(series_uid) in FINAL, 120, "series finished after restart")
        assert gw.state(series_uid) == "done"
    finally:
        gw.stop()
    assert len(destination.received()) == n and _stores(destination) == n
    planted = [s.encode() for s in _planted(phantom_dir)]
    leaked = [p.name for p in destination.received() if any(s in p.read_bytes() for s in planted)]
    assert leaked == []
    log = (config.parent / "gateway.log").read_text()
    assert series_uid not in log and not any(s.decode() in log for s in planted)


def _planted(phantom_dir: Path) -> list[str]:
    ds = dcmread(next(phantom_dir.glob("*.dcm")), stop_before_pixels=True)
    return [str(ds.PatientName), str(ds.PatientID)]


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["pool-child", "whole-worker"])
def test_distributed_worker_sigkilled_mid_task_completes_once(
    tmp_path: Path, destination: StoreSCP, phantom_dir: Path, victim: str
) -> None:
    """pool-child: Celery redelivers the task at once (reject_on_worker_lost) and the claim
    accepts the same task id. whole-worker: the message stays unacked in Redis until the
    visibility timeout, so the gateway's lease reaper re-queues the series for a new worker."""
    series_uid = _series_uid(phantom_dir)
    n = len(list(phantom_dir.glob("*.dcm")))
    with RedisServer(tmp_path / "redis") as redis:
        config = write_config(
            tmp_path / "gw",
            celery={"broker_url": redis.url},
            gateway={"quiet_period_s": 1.0, "lease_timeout_s": 6.0},
            destinations=[{"ae_title": "STORESCP", "host": LOCALHOST, "port": destination.port}],
        )
        with GatewayProcess(config) as gw, WorkerProcess(config) as worker:
            storescu([phantom_dir], gw.port, gw.ae_title)
            wait_for(lambda: gw.state(series_uid) == "defacing", 60, "deface task running")
            if victim == "pool-child":
                children = worker.child_pids()
                assert children, "prefork pool child not found"
                for pid in children:
                    os.kill(pid, signal.SIGKILL)
            else:
                worker.kill()
                assert gw.state(series_uid) == "defacing"
                worker.start()
            wait_for(lambda: gw.state(series_uid) in FINAL, 180, "series finished after SIGKILL")
            assert gw.state(series_uid) == "done"
            if victim == "pool-child":
                assert "WorkerLostError" in worker.log_text()
            else:
                assert "lease expired" in gw.log_text()
            logs = gw.log_text() + worker.log_text()
    assert len(destination.received()) == n
    assert _stores(destination) == n  # forwarded exactly once
    # Neither process logged the series UID (task arguments) or the planted identity.
    assert series_uid not in logs and not any(s in logs for s in _planted(phantom_dir))


def test_start_up_adopts_series_spooled_but_not_recorded(tmp_path: Path) -> None:
    """A crash between the spool's fsync and the state insert: the start-up scan finds the
    files, registers the series and it goes through the normal quiet period."""
    settings = _settings(tmp_path, free_port())
    ctx = Context.from_settings(settings, engine=BoxEngine)
    datasets = _series(4)
    series_uid = datasets[0].SeriesInstanceUID
    for ds in datasets:
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        ctx.spool.store(series_uid, ds.SOPInstanceUID, buf.getvalue())
    gateway = Gateway(settings, ctx=ctx)
    try:
        gateway.recover()
        rec = ctx.store.get(series_uid)
        assert (rec.state, rec.instances) == (State.RECEIVED, 4)
        assert ctx.store.settle(0.0, now=time.time() + 1)[0].state is State.STABLE
    finally:
        gateway.scp.stop()


def test_serve_refuses_to_start_without_key_or_destination(tmp_path: Path) -> None:
    no_destination = write_config(tmp_path / "a")
    done = subprocess.run(
        [DEFACEGATE, "--config", str(no_destination), "serve"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "no destinations" in done.stderr
    no_key = write_config(
        tmp_path / "b",
        deid={"key": None},
        destinations=[{"ae_title": "X", "host": LOCALHOST, "port": 104}],
    )
    done = subprocess.run(
        [DEFACEGATE, "--config", str(no_key), "serve"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "deid.key is required" in done.stderr
