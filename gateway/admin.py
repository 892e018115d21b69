"""HTTP admin API and dashboard (FastAPI), served by the gateway process.

Series are addressed by their log id (a short hash of the Series Instance UID), the same id
the logs, metrics and audit trail use, so the API never shows an original identifier.
Bound to 127.0.0.1 by default; bound anywhere else it requires a bearer token
(settings ``admin.token``). The OpenAPI schema is at ``/openapi.json``, docs at ``/docs``.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from pydantic import BaseModel

from gateway import operator
from gateway.controls import IngestControls
from gateway.metrics import Metrics
from gateway.spool import Spool
from gateway.state import (
    NotRetryableError,
    SeriesRecord,
    State,
    StateStore,
    UnknownSeriesError,
)
from gateway.trail import AuditTrail

_PNG = "image/png"


@dataclass(frozen=True)
class AdminContext:
    """What the API reads and acts on; the gateway builds it once."""

    store: StateStore
    trail: AuditTrail
    spool: Spool
    controls: IngestControls
    metrics: Metrics
    token: str | None
    #: Readiness probes: name → callable returning None when fine or a reason string.
    probes: dict[str, Callable[[], str | None]]


class SeriesSummary(BaseModel):
    id: str
    state: State
    generation: int
    kind: str
    instances: int
    outputs: int | None
    attempts: int
    reason: str | None
    last_received: float
    timings: dict[str, float]


class SeriesDetail(SeriesSummary):
    events: list[dict[str, Any]]
    audit: dict[str, Any] | None
    renders: list[str]


class ActionResult(BaseModel):
    id: str
    state: State


class IngestState(BaseModel):
    paused: bool


def _authorize(request: Request) -> None:
    """Bearer-token check (constant time) when the admin API has a token."""
    token = request.app.state.admin.token
    if token is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise HTTPException(401, "missing or wrong bearer token")


# Module level: FastAPI resolves these annotations from the module's globals.
Auth = Annotated[None, Depends(_authorize)]


def audit_dir(spool: Spool, series_uid: str, generation: int) -> Path:
    """Where the privacy audit of one job keeps its report and renders."""
    return spool.series_dir(series_uid) / "audit" / str(generation)


def create_app(ctx: AdminContext) -> FastAPI:
    app = FastAPI(
        title="defacegate admin API",
        version="0.1.0",
        description="Series states, audit reports and operator actions of a defacegate gateway.",
    )

    app.state.admin = ctx

    def record(series_id: str) -> SeriesRecord:
        try:
            return operator.find(ctx.store, series_id)
        except UnknownSeriesError:
            raise HTTPException(404, "unknown series") from None

    def timings(rec: SeriesRecord) -> dict[str, float]:
        out: dict[str, float] = {}
        for ev in ctx.trail.events(rec.log_id):
            if ev.stage and ev.duration_s is not None and ev.generation == rec.generation:
                out[ev.stage] = round(out.get(ev.stage, 0.0) + ev.duration_s, 3)
        return out

    def summary(rec: SeriesRecord) -> dict[str, Any]:
        return {
            "id": rec.log_id,
            "state": rec.state,
            "generation": rec.generation,
            "kind": rec.kind.value,
            "instances": rec.instances,
            "outputs": rec.outputs,
            "attempts": rec.attempts,
            "reason": rec.reason,
            "last_received": rec.last_received,
            "timings": timings(rec),
        }

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz(response: Response) -> dict[str, Any]:
        """Readiness: state database, spool space, SCP and (distributed) broker."""
        problems = {}
        for name, probe in ctx.probes.items():
            try:
                reason = probe()
            except Exception as exc:  # a probe that fails is a "not ready", not a 500
                reason = type(exc).__name__
            if reason:
                problems[name] = reason
        response.status_code = 503 if problems else 200
        return {"ready": not problems, "problems": problems}

    @app.get("/metrics", tags=["health"])
    def metrics(_: Auth) -> Response:
        return Response(ctx.metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/api/series", response_model=list[SeriesSummary], tags=["series"])
    def list_series(_: Auth, state: State | None = None, limit: int = 200) -> list[dict[str, Any]]:
        records = ctx.store.find(state) if state else ctx.store.find(*State)
        records = sorted(records, key=lambda r: r.last_received, reverse=True)[:limit]
        return [summary(r) for r in records]

    @app.get("/api/series/{series_id}", response_model=SeriesDetail, tags=["series"])
    def series_detail(series_id: str, _: Auth) -> dict[str, Any]:
        rec = record(series_id)
        folder = audit_dir(ctx.spool, rec.series_uid, rec.generation)
        report_file = folder / "report.json"
        report = json.loads(report_file.read_text()) if report_file.is_file() else None
        renders = sorted(p.name for p in folder.glob("*.png")) if folder.is_dir() else []
        events = [
            {
                "ts": e.ts,
                "generation": e.generation,
                "event": e.event,
                "stage": e.stage,
                "duration_s": e.duration_s,
                "detail": e.detail,
            }
            for e in ctx.trail.events(rec.log_id)
        ]
        return {**summary(rec), "events": events, "audit": report, "renders": renders}

    @app.get("/api/series/{series_id}/renders/{name}", tags=["series"])
    def render(series_id: str, name: str, _: Auth) -> FileResponse:
        rec = record(series_id)
        folder = audit_dir(ctx.spool, rec.series_uid, rec.generation)
        path = folder / name
        if "/" in name or not name.endswith(".png") or not path.is_file():
            raise HTTPException(404, "no such render")
        return FileResponse(path, media_type=_PNG)

    def act(series_id: str, action: Callable[..., SeriesRecord]) -> Any:
        rec = record(series_id)
        try:
            new = action(ctx.store, ctx.spool, ctx.trail, rec, by="admin-api")
        except NotRetryableError as exc:
            raise HTTPException(409, str(exc)) from None
        except UnknownSeriesError:
            raise HTTPException(404, "unknown series") from None
        return {"id": new.log_id, "state": new.state}

    @app.post("/api/series/{series_id}/retry", response_model=ActionResult, tags=["actions"])
    def retry(series_id: str, _: Auth) -> Any:
        """Re-queue a dead-lettered (failed) series."""
        return act(series_id, operator.retry)

    @app.post("/api/series/{series_id}/release", response_model=ActionResult, tags=["actions"])
    def release(series_id: str, _: Auth) -> Any:
        """Forward a quarantined series after review. Only series whose defaced,
        de-identified outputs exist (quarantined by the privacy audit) can be released."""
        return act(series_id, operator.release)

    @app.post("/api/series/{series_id}/discard", response_model=ActionResult, tags=["actions"])
    def discard(series_id: str, _: Auth) -> Any:
        """Delete a quarantined or failed series from the spool; nothing is forwarded."""
        return act(series_id, operator.discard)

    @app.get("/api/ingest", response_model=IngestState, tags=["actions"])
    def ingest_state(_: Auth) -> dict[str, bool]:
        return {"paused": ctx.controls.paused}

    @app.post("/api/ingest/pause", response_model=IngestState, tags=["actions"])
    def pause(_: Auth) -> dict[str, bool]:
        """New associations are refused (transient) until resumed."""
        ctx.controls.pause()
        return {"paused": True}

    @app.post("/api/ingest/resume", response_model=IngestState, tags=["actions"])
    def resume(_: Auth) -> dict[str, bool]:
        ctx.controls.resume()
        return {"paused": False}

    @app.get("/api/queues", tags=["series"])
    def queues(_: Auth) -> dict[str, Any]:
        records = ctx.store.find(State.STABLE, State.DEIDENTIFIED)
        return {
            "deface": sum(r.state is State.STABLE for r in records),
            "forward": sum(r.state is State.DEIDENTIFIED for r in records),
            "time": time.time(),
        }

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> str:
        return (files("gateway") / "static" / "dashboard.html").read_text()

    return app


class AdminServer:
    """uvicorn in a thread on a pre-bound socket (so port 0 works and the port is known)."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        import socket

        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.host = host
        self.port = int(self.socket.getsockname()[1])
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run,
            kwargs={"sockets": [self.socket]},
            name="defacegate-admin",
            daemon=True,
        )

    def start(self, timeout: float = 20.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("admin API did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self.socket.close()
