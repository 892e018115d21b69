"""The deployment files: compose validates against the Compose Specification schema, and the
images run exactly the CLI invocations the test suite exercises (no Docker engine runs here)."""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from gateway.cli import build_parser
from gateway.config import load_settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))


def _schema() -> dict:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def _validator() -> jsonschema.Validator:
    schema = _schema()
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def test_compose_file_matches_the_compose_specification() -> None:
    errors = [e.message for e in _validator().iter_errors(COMPOSE)]
    assert errors == []


def test_schema_check_rejects_an_invalid_compose_file() -> None:
    broken = copy.deepcopy(COMPOSE)
    broken["services"]["gateway"]["portz"] = ["11112:11112"]
    broken["services"]["worker"]["deploy"] = {"resources": {"reservations": {"devices": "gpu"}}}
    assert len(list(_validator().iter_errors(broken))) >= 2


def test_compose_has_every_service_and_the_gpu_profile() -> None:
    services = COMPOSE["services"]
    assert {"redis", "gateway", "worker", "worker-gpu", "orthanc"} <= set(services)
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert any(v.endswith(":/models:ro") for v in gpu["volumes"])
    # One spool volume shared by the gateway and every worker (paths travel in messages).
    for name in ("gateway", "worker", "worker-gpu"):
        vols = services[name].get("volumes") or COMPOSE["x-defacegate"]["volumes"]
        assert "spool:/var/lib/defacegate" in vols


def _compose_commands() -> list[tuple[str, list[str]]]:
    out = []
    for name, svc in COMPOSE["services"].items():
        cmd = svc.get("command")
        if cmd and cmd[0] == "defacegate":
            out.append((name, cmd))
    return out


def _dockerfile_commands() -> list[tuple[str, list[str]]]:
    out = []
    for path in DOCKERFILES:
        m = re.search(r"^CMD (\[.*\])\s*$", path.read_text(), re.M)
        assert m, f"{path.name} has no exec-form CMD"
        out.append((path.name, json.loads(m.group(1))))
    return out


@pytest.mark.parametrize(("where", "cmd"), _compose_commands() + _dockerfile_commands())
def test_image_commands_are_valid_cli_invocations(where: str, cmd: list[str]) -> None:
    parser, _ = build_parser()
    args = parser.parse_args(cmd[1:])
    assert args.command in {"serve", "worker"}, where


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_as_non_root_with_a_health_check(path: Path) -> None:
    text = path.read_text()
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in {"root", "0"}
    assert re.search(r"^HEALTHCHECK ", text, re.M)
    health = re.search(r'CMD \["python", "-m", "([\w.]+)"', text.split("HEALTHCHECK", 1)[1])
    assert health and importlib.util.find_spec(health.group(1)) is not None


def test_gateway_image_builds_the_c_data_phase() -> None:
    """The gateway image compiles gateway/_pdata.c (setup.py) in a stage with a compiler and
    checks the wheel carries it: without it the SCP would read data sets in Python."""
    text = (ROOT / "docker" / "gateway.Dockerfile").read_text()
    build, runtime = text.split("\nFROM ")[1:3]
    assert " AS build" in build and re.search(r"\bgcc\b", build)
    assert re.search(r"^COPY [^\n]*\bsetup\.py\b", build, re.M)
    assert "gateway/_pdata" in build and ".so" in build  # the wheel is checked
    assert "COPY --from=build /wheels" in runtime and "gcc" not in runtime


def test_compose_environment_and_config_are_real_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every DEFACEGATE_* variable the compose file sets must be accepted by Settings."""
    env: dict[str, str] = {}
    for svc in COMPOSE["services"].values():
        env.update({k: v for k, v in (svc.get("environment") or {}).items() if "DEFACEGATE" in k})
    env.update(COMPOSE["x-defacegate"]["environment"])
    config = env.pop("DEFACEGATE_CONFIG")
    assert config == "/etc/defacegate/config.yaml"
    secret = tmp_path / "deid_key"
    secret.write_text("0123456789abcdef0123456789abcdef\n")
    assert env.pop("DEFACEGATE_DEID__KEY_FILE") == "/run/secrets/deid_key"
    monkeypatch.setenv("DEFACEGATE_DEID__KEY_FILE", str(secret))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings(ROOT / "config" / "compose.yaml")
    assert str(settings.deface.models_root) == "/models"
    dumped = settings.model_dump_json()
    assert "redis://redis:6379/0" in dumped
    assert settings.deid.key is not None
    assert settings.destinations[0].host == "orthanc"  # the compose service name
