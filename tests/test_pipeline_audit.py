"""The privacy-audit gate inside the pipeline, on a phantom with a face detectors find."""

from __future__ import annotations

from pathlib import Path

import pytest

from anonymizer import Profile
from gateway.config import DeidSettings, Settings
from gateway.pipeline import StageError, deface_to_directory, engine_for_bone, process_series
from inference.dicomgen import make_ct_series
from inference.engines.anatomical import AnatomicalEngine, AnatomicalOptions
from inference.errors import FaceStillVisibleError, ImplausibleMaskError
from tests.support.engines import CornerEngine, TinyEngine
from tests.support.phantom import cached_phantom

KEY = "p" * 32


def _phantom_datasets():
    p = cached_phantom(matrix=192, slice_thickness=2.0)
    return p, make_ct_series(p.hu, p.geometry)


def test_anatomical_engine_passes_the_audit() -> None:
    _, dss = _phantom_datasets()
    [result] = process_series(dss, AnatomicalEngine(), Profile(key=KEY.encode()), Settings())
    assert result.audit is not None
    assert result.audit.decision.verdict.value == "pass"
    assert result.audit.report.original_face_found  # the detector saw the original face
    assert not result.quarantined_by_audit
    assert result.summary()["audit"]["verdict"] == "pass"
    assert "audit" in result.timings


def test_face_left_in_place_is_escalated_then_refused(tmp_path: Path) -> None:
    _, dss = _phantom_datasets()
    [result] = process_series(dss, CornerEngine(), Profile(key=KEY.encode()), Settings())
    assert result.quarantined_by_audit
    assert [bone for bone, _ in result.audit.history] == ["keep", "smooth", "remove"]
    assert any("face" in r for r in result.audit.decision.reasons)
    # Offline, the same series is never written.
    src = tmp_path / "in"
    src.mkdir()
    for i, ds in enumerate(dss):
        ds.save_as(src / f"{i}.dcm", enforce_file_format=True)
    settings = Settings(deid=DeidSettings(key=KEY))
    with pytest.raises(StageError) as err:
        deface_to_directory(src, tmp_path / "out", settings, engine=CornerEngine())
    assert err.value.stage == "audit"
    assert isinstance(err.value.error, FaceStillVisibleError)
    assert not (tmp_path / "out").exists()
    assert [x for x in tmp_path.iterdir() if x.name != "in"] == []


def test_tiny_mask_is_implausible_not_escalated() -> None:
    _, dss = _phantom_datasets()
    with pytest.raises(StageError) as err:
        process_series(dss, TinyEngine(), Profile(key=KEY.encode()), Settings())
    assert isinstance(err.value.error, ImplausibleMaskError)


def test_escalation_rebuilds_the_engine_with_the_next_bone_setting() -> None:
    engine = AnatomicalEngine(AnatomicalOptions(bone="keep", include_ears=True))
    stronger = engine_for_bone(engine, "remove")
    assert isinstance(stronger, AnatomicalEngine) and stronger is not engine
    assert stronger.options.bone == "remove" and stronger.options.include_ears
    assert engine_for_bone(engine, "keep") is engine
    corner = CornerEngine()
    assert engine_for_bone(corner, "remove") is corner  # no bone option: unchanged
