"""`defacegate audit ORIGINAL DEFACED --out DIR` on DICOM series of the phantom."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from skimage.io import imread

from gateway.cli import main
from inference.dicomgen import make_ct_series
from inference.geometry import Geometry
from inference.replace import replace_masked
from tests.support.phantom import cached_phantom


def _write(hu: np.ndarray, geometry: Geometry, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, ds in enumerate(make_ct_series(hu, geometry), start=1):
        ds.save_as(folder / f"{i:04d}.dcm", enforce_file_format=True)
    return folder


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    ph = cached_phantom(matrix=128, slice_thickness=2.0, fov="head")
    root = tmp_path_factory.mktemp("audit_cli")
    original = _write(ph.hu, ph.geometry, root / "original")
    defaced = _write(replace_masked(ph.hu, ph.facemask), ph.geometry, root / "defaced")
    return original, defaced


def test_audit_passes_a_defaced_series_and_writes_pngs(
    series: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    original, defaced = series
    out = tmp_path / "out"
    assert main(["audit", str(original), str(defaced), "--out", str(out)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["decision"] == "pass" and doc["reasons"] == []
    assert doc["original_face_found"] is True
    assert doc["mask_ml"] > 100 and 0 < doc["changed_fraction"] < 0.1
    assert json.loads((out / "report.json").read_text()) == doc
    for who in ("original", "defaced"):
        for yaw in ("-30", "+0", "+30"):
            img = imread(out / f"{who}_yaw{yaw}.png")
            assert img.shape == (512, 512) and img.any()
    assert imread(out / "before_after.png").shape == (1024, 1536)


def test_audit_of_an_untouched_copy_is_quarantined(
    series: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    original, _ = series
    assert main(["audit", str(original), str(original), "--out", str(tmp_path)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["decision"] == "quarantine" and "facemask is empty" in doc["reasons"]


def test_audit_rejects_series_of_different_geometry(
    series: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    original, _ = series
    other = cached_phantom(matrix=96, slice_thickness=2.5, fov="head", noise=0.0)
    folder = _write(other.hu, other.geometry, tmp_path / "other")
    assert main(["audit", str(original), str(folder), "--out", str(tmp_path / "o")]) == 2
    assert "geometry" in capsys.readouterr().err
    assert main(["audit", str(original), str(tmp_path / "missing")]) == 2
