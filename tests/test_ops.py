"""Operations: admin API, metrics, audit trail and dashboard over real jobs.

A spool is populated by the real deface and forward jobs (the same functions a Celery worker
runs) on a phantom whose header carries planted PHI: one series defaced by the anatomical
engine and forwarded to a real dcmtk storescp, two series a deliberately broken engine left
with a visible face (quarantined by the privacy audit, with outputs: releasable), and one whose
mask is implausible (quarantined without outputs). The dashboard is driven in Debian's
chromium through Playwright.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from pydantic import SecretStr

from gateway.admin import AdminContext, create_app
from gateway.config import AdminSettings, Settings
from gateway.controls import IngestControls
from gateway.metrics import Metrics
from gateway.spool import StoreOutcome
from gateway.state import Kind, State
from gateway.tasks import Context, Outcome, run_deface, run_forward
from inference.dicomgen import make_ct_series
from inference.engines.anatomical import AnatomicalEngine
from inference.geometry import Geometry
from tests.support.engines import CornerEngine, TinyEngine
from tests.support.pacs import LOCALHOST, StoreSCP, free_port, storescu, wait_for
from tests.support.phantom import cached_phantom

KEY = "ops-test-key-0123456789abcdef"
PHANTOM = {"matrix": 192, "slice_thickness": 2.0, "phi": True, "seed": 3}


@dataclass
class Populated:
    ctx: Context
    destination: StoreSCP
    planted: list[str]
    series: dict[str, str]  # role → original series UID
    log_text: str

    def log_id(self, role: str) -> str:
        return self.ctx.store.get(self.series[role]).log_id


def _receive(ctx: Context, datasets: list[Any]) -> str:
    for ds in datasets:
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        outcome = ctx.spool.store(ds.SeriesInstanceUID, ds.SOPInstanceUID, buf.getvalue())
        ctx.store.record_instance(
            ds.SeriesInstanceUID,
            kind=Kind.CT,
            changed=outcome is not StoreOutcome.DUPLICATE,
            new_instance=outcome is StoreOutcome.NEW,
        )
    return str(datasets[0].SeriesInstanceUID)


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Populated]:
    root = tmp_path_factory.mktemp("ops")
    phantom = cached_phantom(**PHANTOM)
    with StoreSCP(root / "dest") as destination:
        destination.start()
        settings = Settings(
            deid={"key": KEY},
            gateway={"spool_dir": root / "spool", "free_space_floor_mb": 0},
            destinations=[{"ae_title": "STORESCP", "host": LOCALHOST, "port": destination.port}],
            forward={"retries": 2, "backoff_base_s": 0.1, "backoff_cap_s": 0.1},
        )
        engines = {
            "done": AnatomicalEngine(),
            "held": CornerEngine(),
            "held2": CornerEngine(),
            "held3": CornerEngine(),
            "implausible": TinyEngine(),
        }
        series: dict[str, str] = {}
        records = logging.getLogger()
        stream = BytesIO()
        handler = logging.StreamHandler(_Utf8(stream))
        handler.setLevel(logging.DEBUG)
        records.addHandler(handler)
        old_level = records.level
        records.setLevel(logging.DEBUG)
        try:
            for role, engine in engines.items():
                ctx = Context.from_settings(settings, engine=lambda e=engine: e)
                dss = make_ct_series(phantom.hu, phantom.geometry, header=phantom.header)
                uid = series[role] = _receive(ctx, dss)
                ctx.store.settle(0.0, now=time.time() + 1)
                outcome = run_deface(ctx, uid, 1, owner=f"test-{role}")
                expected = Outcome.DEIDENTIFIED if role == "done" else Outcome.QUARANTINED
                assert outcome is expected, role
            # As the scheduler would: a transient failure (a loaded host) is retried.
            for attempt in range(3):
                forwarded = run_forward(ctx, series["done"], 1, owner=f"fwd{attempt}")
                if forwarded is not Outcome.RETRY_LATER:
                    break
            assert forwarded is Outcome.DONE, ctx.store.get(series["done"]).reason
        finally:
            records.removeHandler(handler)
            records.setLevel(old_level)
        yield Populated(
            Context.from_settings(settings),
            destination,
            phantom.planted_phi,
            series,
            stream.getvalue().decode("utf-8", "replace"),
        )


class _Utf8:
    def __init__(self, buf: BytesIO) -> None:
        self.buf = buf

    def write(self, text: str) -> None:
        self.buf.write(text.encode("utf-8"))

    def flush(self) -> None:
        return None


def _app(p: Populated, token: str | None = None) -> Any:
    ctx = p.ctx
    metrics = Metrics(ctx.store, ctx.trail, ctx.spool.root)
    return create_app(
        AdminContext(
            store=ctx.store,
            trail=ctx.trail,
            spool=ctx.spool,
            controls=IngestControls(ctx.store.path),
            metrics=metrics,
            token=token,
            probes={"state": lambda: None},
        )
    )


@pytest.fixture
def client(populated: Populated) -> TestClient:
    return TestClient(_app(populated))


def test_series_list_and_detail(client: TestClient, populated: Populated) -> None:
    rows = {r["id"]: r for r in client.get("/api/series").json()}
    done = rows[populated.log_id("done")]
    assert done["state"] == "done" and done["outputs"] == done["instances"] > 0
    assert set(done["timings"]) >= {"assemble", "deface", "deidentify", "audit"}
    assert rows[populated.log_id("held")]["state"] == "quarantined"
    assert rows[populated.log_id("held")]["reason"] == "FaceStillVisibleError"
    assert rows[populated.log_id("implausible")]["reason"] == "ImplausibleMaskError"
    quarantined = client.get("/api/series", params={"state": "quarantined"}).json()
    assert len(quarantined) == 4

    detail = client.get(f"/api/series/{populated.log_id('held')}").json()
    assert detail["audit"]["decision"] == "quarantine"
    assert detail["audit"]["original_face_found"] is True
    assert "before_after.png" in detail["renders"]
    png = client.get(f"/api/series/{populated.log_id('held')}/renders/before_after.png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        client.get(f"/api/series/{populated.log_id('held')}/renders/..%2Fx.png").status_code == 404
    )
    events = [e["event"] for e in detail["events"]]
    assert "quarantined" in events and "deidentified" in events
    trail = client.get(f"/api/series/{populated.log_id('done')}").json()["events"]
    deid = next(e for e in trail if e["event"] == "deidentified")
    assert deid["detail"]["engine"] == "anatomical" and deid["detail"]["audit"] == "pass"
    forwarded = next(e for e in trail if e["event"] == "forwarded")
    assert forwarded["detail"]["destination"] == "STORESCP"
    assert forwarded["detail"]["confirmed"] == done["instances"]
    assert client.get("/api/series/0000000000").status_code == 404


def test_openapi_schema_lists_the_actions(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/api/series",
        "/api/series/{series_id}",
        "/api/series/{series_id}/retry",
        "/api/series/{series_id}/release",
        "/api/series/{series_id}/discard",
        "/api/ingest/pause",
        "/api/ingest/resume",
    ):
        assert path in paths


def test_metrics_report_states_stages_and_spool(client: TestClient) -> None:
    text = client.get("/metrics").text
    assert 'defacegate_series{state="quarantined"} 4.0' in text
    assert 'defacegate_series{state="done"} 1.0' in text
    assert 'defacegate_stage_seconds_count{stage="deface"} 4.0' in text
    assert 'defacegate_stage_seconds_count{stage="forward"} 1.0' in text
    assert "defacegate_spool_free_bytes " in text
    assert "defacegate_dead_letter_series 0.0" in text


def test_release_forwards_only_what_has_outputs(client: TestClient, populated: Populated) -> None:
    held = populated.log_id("held")
    assert client.post(f"/api/series/{populated.log_id('done')}/retry").status_code == 409
    nothing = client.post(f"/api/series/{populated.log_id('implausible')}/release")
    assert nothing.status_code == 409 and "nothing to release" in nothing.json()["detail"]
    before = len(populated.destination.received())
    released = client.post(f"/api/series/{held}/release").json()
    assert released == {"id": held, "state": "deidentified"}
    uid = populated.series["held"]
    assert run_forward(populated.ctx, uid, 1, owner="after-release") is Outcome.DONE
    wait_for(lambda: len(populated.destination.received()) > before, 10, "released series")
    events = [e["event"] for e in client.get(f"/api/series/{held}").json()["events"]]
    assert "released" in events


def test_discard_removes_the_series(client: TestClient, populated: Populated) -> None:
    lid = populated.log_id("implausible")
    folder = populated.ctx.spool.series_dir(populated.series["implausible"])
    assert folder.exists()
    assert client.post(f"/api/series/{lid}/discard").json()["state"] == "discarded"
    assert not folder.exists()
    assert client.post(f"/api/series/{lid}/discard").status_code == 409


def test_pause_and_resume_ingest(client: TestClient, populated: Populated) -> None:
    controls = IngestControls(populated.ctx.store.path)
    assert client.post("/api/ingest/pause").json() == {"paused": True}
    assert controls.paused and client.get("/api/ingest").json() == {"paused": True}
    assert client.post("/api/ingest/resume").json() == {"paused": False}
    assert not controls.paused


def test_token_is_required_when_configured(populated: Populated) -> None:
    app = TestClient(_app(populated, token="s3cret-token"))
    assert app.get("/healthz").status_code == 200
    assert app.get("/api/series").status_code == 401
    assert app.get("/metrics").status_code == 401
    assert app.get("/api/series", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = app.get("/api/series", headers={"Authorization": "Bearer s3cret-token"})
    assert ok.status_code == 200
    with pytest.raises(ValueError, match=r"admin\.token is required"):
        AdminSettings(host="0.0.0.0")
    assert AdminSettings(host="0.0.0.0", token=SecretStr("x")).token is not None


def test_no_planted_phi_in_logs_metrics_api_or_trail(
    client: TestClient, populated: Populated
) -> None:
    assert len(populated.planted) > 20
    texts = {"logs": populated.log_text, "metrics": client.get("/metrics").text}
    for row in client.get("/api/series").json():
        texts[f"api {row['id']}"] = client.get(f"/api/series/{row['id']}").text
    texts["trail"] = "".join(
        repr(e)
        for uid in populated.series.values()
        for e in populated.ctx.trail.events(populated.ctx.store.get(uid).log_id)
    )
    assert "defacing" in texts["logs"]  # the capture really saw the jobs' logs
    for where, text in texts.items():
        upper = text.upper()
        for value in populated.planted:
            assert value.upper() not in upper, f"planted PHI found in {where}"
        for uid in populated.series.values():
            assert uid not in text, f"original series UID found in {where}"


# ----------------------------------------------------------------------------- dashboard


@pytest.fixture
def admin_server(populated: Populated) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(_app(populated), host=LOCALHOST, port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 20, "admin server")
    yield f"http://{LOCALHOST}:{port}"
    server.should_exit = True
    thread.join(10)


def test_dashboard_lists_series_and_releases_with_a_click(
    admin_server: str, populated: Populated
) -> None:
    from playwright.sync_api import expect, sync_playwright

    held = populated.log_id("held2")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page()
            page.goto(admin_server + "/")
            done = page.locator(f'#series tr[data-series="{populated.log_id("done")}"]')
            expect(done).to_contain_text("done")
            card = page.locator(f'.review[data-series="{held}"]')
            expect(card.locator("img")).to_have_count(7)  # 3 + 3 views and the strip
            card.locator("button.release").click()
            row = page.locator(f'#series tr[data-series="{held}"]')
            expect(row).to_contain_text("deidentified", timeout=10_000)
        finally:
            browser.close()
    assert populated.ctx.store.get(populated.series["held2"]).state is State.DEIDENTIFIED


# --------------------------------------------------------------- the served admin API


def test_serve_runs_the_admin_api_metrics_and_pause(tmp_path: Path) -> None:
    """`defacegate serve` with JSON logs: readiness, SCP counters in /metrics, and pausing
    ingest through the API refuses new associations until resumed; the health check agrees."""
    import json
    import os
    import subprocess
    import urllib.request

    from tests.support.gateway import GatewayProcess, write_config
    from tests.support.pacs import c_echo

    admin_port = free_port()
    cfg = write_config(
        tmp_path / "gw",
        destinations=[{"ae_title": "NOWHERE", "host": LOCALHOST, "port": free_port()}],
        admin={"port": admin_port},
        log_format="json",
    )
    base = f"http://{LOCALHOST}:{admin_port}"

    def get(path: str) -> Any:
        with urllib.request.urlopen(base + path, timeout=5) as r:
            return r.read().decode()

    def post(path: str) -> Any:
        req = urllib.request.Request(base + path, method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    with GatewayProcess(cfg) as gw:
        assert json.loads(get("/readyz")) == {"ready": True, "problems": {}}
        assert c_echo(gw.port, gw.ae_title) == 0
        health = subprocess.run(
            [str(Path(__file__).parents[1] / ".venv/bin/python"), "-m", "gateway.health"],
            env={**os.environ, "DEFACEGATE_CONFIG": str(cfg)},
            capture_output=True,
            text=True,
        )
        assert health.returncode == 0, health.stderr
        assert post("/api/ingest/pause") == {"paused": True}
        assert c_echo(gw.port, gw.ae_title) is None  # A-ASSOCIATE-RJ while paused
        metrics = get("/metrics")
        rejected = [
            x
            for x in metrics.splitlines()
            if x.startswith("defacegate_associations_rejected_total")
        ]
        assert rejected == ["defacegate_associations_rejected_total 1.0"], rejected
        assert post("/api/ingest/resume") == {"paused": False}
        assert c_echo(gw.port, gw.ae_title) == 0
        # Three instances from a "modality": counted, and the calling AE is in the trail.
        src = tmp_path / "send"
        src.mkdir()
        g = Geometry(affine=np.diag([2.0, 1.0, 1.0, 1.0]), shape=(3, 16, 16))
        for i, ds in enumerate(make_ct_series(np.zeros((3, 16, 16), np.float32), g)):
            ds.save_as(src / f"{i}.dcm", enforce_file_format=True)
        storescu([src], gw.port, gw.ae_title, calling_aet="MODALITY1")
        assert 'defacegate_instances_received_total{status="success"} 3.0' in get("/metrics")
        [row] = json.loads(get("/api/series"))
        events = json.loads(get(f"/api/series/{row['id']}"))["events"]
        assert events[0]["event"] == "received"
        assert events[0]["detail"]["calling_ae"] == "MODALITY1"
        lines = [json.loads(x) for x in gw.log_text().splitlines() if x.startswith("{")]
        assert any("admin API on" in x["message"] for x in lines)
        assert all({"ts", "level", "logger", "message"} <= set(x) for x in lines)


def test_quarantine_command_lists_releases_and_discards(populated: Populated) -> None:
    """The CLI twin of the API actions, on the same spool (run after the API tests)."""
    import subprocess

    import yaml

    root = populated.ctx.settings.gateway.spool_dir.parent
    cfg = root / "cli.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"deid": {"key": KEY}, "gateway": {"spool_dir": str(populated.ctx.spool.root)}}
        )
    )
    exe = str(Path(__file__).parents[1] / ".venv/bin/defacegate")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [exe, "--config", str(cfg), "quarantine", *args], capture_output=True, text=True
        )

    listed = cli("list")
    assert listed.returncode == 0
    held = populated.log_id("held")
    store = populated.ctx.store
    for role in ("held", "held2", "held3", "done"):
        rec = store.get(populated.series[role])
        assert (rec.log_id in listed.stdout) is (rec.state is State.QUARANTINED)
    # Released by the API test already: releasing again is refused with a clear message.
    again = cli("release", held)
    assert again.returncode == 1 and "not quarantined" in again.stderr
    assert cli("discard", "0123456789").returncode == 1
    released = cli("release", populated.log_id("held3"))
    assert released.returncode == 0 and "deidentified" in released.stdout
    assert store.get(populated.series["held3"]).state is State.DEIDENTIFIED
    assert cli("release").returncode == 2
