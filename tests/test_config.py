"""The one settings object: example file, precedence, validation errors without secrets."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from gateway.config import Settings, load_settings
from gateway.configdoc import example_yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "defacegate.example.yaml"
DEFACEGATE = str(ROOT / ".venv" / "bin" / "defacegate")


def test_example_file_is_the_generated_one_and_covers_every_setting() -> None:
    assert EXAMPLE.read_text() == example_yaml(), "regenerate: defacegate config --example"
    data = yaml.safe_load(EXAMPLE.read_text())
    assert set(data) == set(Settings.model_fields)
    for name, info in Settings.model_fields.items():
        sub = getattr(info.annotation, "model_fields", None)
        if sub is not None:
            assert set(data[name]) == set(sub), name


def test_example_loads_to_the_defaults() -> None:
    assert load_settings(EXAMPLE) == Settings()


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("deface: {engine: nnunet, fill: p10}\ngateway: {spool_dir: ~/spool}\n")
    monkeypatch.setenv("DEFACEGATE_DEFACE__ENGINE", "anatomical")
    s = load_settings(cfg)
    assert s.deface.engine == "anatomical" and s.deface.fill == "p10"
    assert s.gateway.spool_dir == Path.home() / "spool"


def test_errors_name_the_setting_but_never_echo_a_secret(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("deid: {key: short-secret}\ndeface: {fill: blue}\n")
    run = subprocess.run(
        [DEFACEGATE, "--config", str(cfg), "config"], capture_output=True, text=True
    )
    assert run.returncode == 2
    assert "deid" in run.stderr and "fill" in run.stderr
    assert "short-secret" not in run.stderr + run.stdout
    # one line per setting, no documentation links
    assert "\n  deface.fill: " in run.stderr and "errors.pydantic.dev" not in run.stderr


def test_config_command_masks_secrets(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("deid: {key: a-long-enough-secret-key}\nadmin: {token: tok-123456}\n")
    run = subprocess.run(
        [DEFACEGATE, "--config", str(cfg), "config"], capture_output=True, text=True, check=True
    )
    assert "a-long-enough-secret-key" not in run.stdout and "tok-123456" not in run.stdout
    assert '"key": "**********"' in run.stdout


def test_deface_command_line_overrides_the_configuration() -> None:
    from gateway.cli import build_parser
    from gateway.commands.deface import apply_overrides

    parser, _ = build_parser()
    args = parser.parse_args(
        ["deface", "in", "out", "--no-roi", "--bone", "remove", "--fill", "p10"]
    )
    s = apply_overrides(args, Settings())
    assert (s.deface.roi, s.deface.bone, s.deface.fill) == (False, "remove", "p10")
    untouched = apply_overrides(parser.parse_args(["deface", "in", "out"]), Settings())
    assert untouched == Settings()
