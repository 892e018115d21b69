"""Start real gateways for tests: ``defacegate serve`` / ``defacegate worker`` subprocesses
and a private ``redis-server``, each on a free port with its files under tmp_path.

Typical use (embedded mode, forwarding to a destination)::

    cfg = write_config(tmp_path, destinations=[{"ae_title": "ORTHANC", "host": LOCALHOST,
                                                "port": orthanc.dicom_port}])
    with GatewayProcess(cfg) as gw:              # waits until it answers C-ECHO
        storescu([series_dir], gw.port, gw.ae_title)
        wait_for(lambda: gw.state(series_uid) == "done", 60, "series done")

Distributed mode: ``with RedisServer(tmp_path) as redis:`` then
``write_config(tmp_path, celery={"broker_url": redis.url})`` and start a
``WorkerProcess(cfg)`` beside the gateway. ``kill()`` sends SIGKILL (crash tests),
``stop()`` SIGTERM; both processes can be started again with ``start()``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from gateway.config import load_settings
from gateway.state import SeriesRecord, StateStore, UnknownSeriesError
from tests.support.pacs import LOCALHOST, c_echo, free_port, wait_for

DEFACEGATE = str(Path(sys.executable).with_name("defacegate"))
TEST_KEY = "defacegate-test-key-0123456789abcdef"


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def write_config(root: Path, **sections: Any) -> Path:
    """A YAML config for a test gateway under ``root``; ``sections`` are merged over defaults
    (e.g. ``gateway={"quiet_period_s": 2}``, ``destinations=[...]``,
    ``celery={"broker_url": url}``). Validated by loading it before it is returned."""
    root.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "log_level": "INFO",
        "deid": {"key": TEST_KEY},
        "gateway": {
            "ae_title": "DEFACEGATE",
            "host": LOCALHOST,
            "port": 0,
            "spool_dir": str(root / "spool"),
            "quiet_period_s": 1.0,
            "poll_interval_s": 0.2,
            "free_space_floor_mb": 0,
            "lease_timeout_s": 10.0,
        },
        "forward": {"retries": 3, "backoff_base_s": 1.0, "backoff_cap_s": 5.0},
        "admin": {"port": 0},  # ephemeral: several test gateways may run at once
    }
    config = _merge(config, sections)
    path = root / "defacegate.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    load_settings(path)  # fail here, not in the subprocess, on a bad config
    return path


class _Process:
    """A ``defacegate`` subprocess with its log under the config's directory."""

    name = "process"

    def __init__(self, config: Path, *extra_args: str, env: Mapping[str, str] | None = None):
        self.config = Path(config)
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.process: subprocess.Popen[bytes] | None = None
        self.log = self.config.parent / f"{self.name}.log"

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _launch(self) -> None:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"{self.name} is already running")
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self._argv(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=True,
            )

    def check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited; log:\n{self.log_text()[-4000:]}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM and wait (graceful: the job in progress completes)."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash: no clean-up runs)."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class GatewayProcess(_Process):
    """``defacegate serve`` on a free port; ``start()`` waits until it answers C-ECHO."""

    name = "gateway"

    def __init__(self, config: Path, *extra_args: str, env: Mapping[str, str] | None = None):
        super().__init__(config, *extra_args, env=env)
        self.settings = load_settings(self.config)
        self.port = self.settings.gateway.port or free_port()
        self.ae_title = self.settings.gateway.ae_title

    def _argv(self) -> list[str]:
        return [DEFACEGATE, "--config", str(self.config), "serve", "--port", str(self.port)]

    def start(self, timeout: float = 60.0) -> GatewayProcess:
        offset = len(self.log_text())  # a restart appends to the same log
        self._launch()
        callers = self.settings.gateway.allowed_callers
        calling = callers[0].ae_title if callers else "PROBE"

        def ready() -> bool:
            self.check_alive()
            if self.settings.gateway.tls is not None:
                return "listening on" in self.log_text()[offset:]
            return c_echo(self.port, self.ae_title, calling_aet=calling, timeout=2.0) == 0

        try:
            wait_for(ready, timeout, "the gateway to answer C-ECHO", interval=0.1)
        except BaseException:
            self.kill()
            raise
        return self

    def __enter__(self) -> GatewayProcess:
        return self.start() if self.process is None else self

    # -- state -----------------------------------------------------------------------------
    def store(self) -> StateStore:
        return StateStore(self.settings.gateway.state_path)

    def record(self, series_uid: str) -> SeriesRecord | None:
        try:
            return self.store().get(series_uid)
        except UnknownSeriesError:
            return None

    def state(self, series_uid: str) -> str | None:
        rec = self.record(series_uid)
        return None if rec is None else str(rec.state)

    def retry(self, series: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [DEFACEGATE, "--config", str(self.config), "retry", series],
            capture_output=True,
            text=True,
            timeout=60,
        )


class WorkerProcess(_Process):
    """``defacegate worker`` (Celery, prefork, concurrency 1) on the config's broker."""

    name = "worker"

    def __init__(
        self,
        config: Path,
        queues: str = "deface,forward",
        *extra_args: str,
        env: Mapping[str, str] | None = None,
    ):
        super().__init__(config, *extra_args, env=env)
        self.queues = queues

    def _argv(self) -> list[str]:
        return [
            DEFACEGATE,
            "--config",
            str(self.config),
            "worker",
            "--queues",
            self.queues,
            *self.extra_args,
        ]

    def start(self, timeout: float = 60.0) -> WorkerProcess:
        """Start and wait until Celery reports ready."""
        self._launch()
        offset = len(self.log_text())

        def ready() -> bool:
            self.check_alive()
            return " ready." in self.log_text()[offset:]

        try:
            wait_for(ready, timeout, "the Celery worker to be ready", interval=0.2)
        except BaseException:
            self.kill()
            raise
        return self

    def __enter__(self) -> WorkerProcess:
        return self.start() if self.process is None else self

    def child_pids(self) -> list[int]:
        """PIDs of the prefork pool children (where tasks run)."""
        if self.process is None:
            return []
        out = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True
        ).stdout
        return [int(p) for p in out.split()]


class RedisServer:
    """A private ``redis-server`` on a free port, no persistence, data dir under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.port}/0"

    def start(self, timeout: float = 20.0) -> RedisServer:
        import redis

        self.root.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                LOCALHOST,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.root),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_timeout=1)

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError("redis-server exited")
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_for(ready, timeout, "redis-server", interval=0.05)
        return self

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)

    def __enter__(self) -> RedisServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A running private Redis; ``redis_server.url`` is the broker URL."""
    with RedisServer(tmp_path / "redis") as server:
        yield server
