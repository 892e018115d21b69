"""Audit reports and the QA gate: pass a defaced series, escalate a visible face, quarantine
an implausible mask; the phantom's face is detected before defacing and not after."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gateway.config import load_settings
from inference.audit.report import (
    AuditOptions,
    AuditReport,
    Verdict,
    ViewAudit,
    audit,
    audited_mask,
    gate,
    intracranial_mask,
)
from inference.engines.anatomical import AnatomicalEngine, AnatomicalOptions
from inference.phantom import Phantom
from inference.replace import replace_masked
from tests.support.audit import analytic_head, face_mask, patient_points, staged_engines
from tests.support.phantom import cached_phantom

OPTS = AuditOptions()
SMALL = {"matrix": 128, "slice_thickness": 2.0, "fov": "head"}


def _report(score_defaced: float | None = None, **kw: object) -> AuditReport:
    fields: dict[str, object] = {
        "views": [ViewAudit(0.0, 2.0, score_defaced, 0.9)],
        "original_face_found": True,
        "changed_fraction": 0.01,
        "mask_ml": 300.0,
        "brain_found": True,
        "mask_brain_overlap_ml": 0.0,
    }
    fields.update(kw)
    return AuditReport(**fields)  # type: ignore[arg-type]


# ----------------------------------------------------------------------- gate (pure logic)


def test_gate_passes_a_clean_report() -> None:
    assert gate(_report(None)).verdict is Verdict.PASS
    assert gate(_report(OPTS.detect_threshold - 0.01)).verdict is Verdict.PASS


def test_gate_escalates_a_detected_face_and_names_the_view() -> None:
    d = gate(_report(OPTS.detect_threshold + 0.01))
    assert d.verdict is Verdict.ESCALATE
    assert "yaw +0" in d.reasons[0]


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"mask_ml": 0.0}, "empty"),
        ({"mask_ml": 5.0}, "below"),
        ({"mask_brain_overlap_ml": 3.0}, "intracranial"),
    ],
)
def test_gate_quarantines_an_implausible_mask_even_with_a_face(
    fields: dict[str, float], words: str
) -> None:
    d = gate(_report(3.0, **fields))
    assert d.verdict is Verdict.QUARANTINE
    assert any(words in r for r in d.reasons)


def test_brain_overlap_ignored_when_no_brain_was_found() -> None:
    assert gate(_report(None, mask_brain_overlap_ml=3.0, brain_found=False)).verdict is Verdict.PASS


def test_reid_distance_escalates_only_when_configured() -> None:
    close = _report(None, views=[ViewAudit(0.0, 2.0, None, 0.3)])
    assert gate(close).verdict is Verdict.PASS  # default: off (uncalibrated on renders)
    d = gate(close, AuditOptions(reid_distance=0.6))
    assert d.verdict is Verdict.ESCALATE and "re-identifiable" in d.reasons[0]


def test_settings_section_fits_the_gate() -> None:
    s = load_settings(audit={"detect_threshold": 1.5, "escalation": ["smooth", "remove"]})
    assert s.audit.escalation == ("smooth", "remove")
    assert gate(_report(1.0), s.audit).verdict is Verdict.PASS
    assert gate(_report(1.6), s.audit).verdict is Verdict.ESCALATE
    with pytest.raises(ValueError, match="escalation"):
        load_settings(audit={"escalation": ["keep", "melt"]})


# ------------------------------------------------------------ audit on the analytic head


@pytest.fixture(scope="module")
def head() -> tuple[np.ndarray, object]:
    return analytic_head()


def test_audit_measures_mask_and_changes(head: tuple[np.ndarray, object]) -> None:
    hu, g = head
    mask = face_mask(hu, g)  # type: ignore[arg-type]
    defaced = replace_masked(hu, mask)
    r = audit(hu, defaced, g, mask, OPTS)  # type: ignore[arg-type]
    voxel_ml = 8.0 / 1000
    assert r.mask_ml == pytest.approx(mask.sum() * voxel_ml, rel=1e-3)
    assert r.changed_fraction == pytest.approx(np.mean(hu != defaced), abs=1e-6)
    assert r.brain_found and r.mask_brain_overlap_ml == 0.0
    assert [v.yaw_deg for v in r.views] == [-30.0, 0.0, 30.0]
    assert all(v.cnn_original is None and v.cnn_defaced is None for v in r.views)  # off
    assert set(r.images) == {
        f"{w}_yaw{y}" for w in ("original", "defaced") for y in ("-30", "+0", "+30")
    }
    doc = json.loads(r.to_json())
    assert "images" not in doc and doc["mask_ml"] == r.mask_ml
    assert gate(r).verdict is Verdict.PASS


def test_mask_reaching_into_the_brain_is_quarantined(head: tuple[np.ndarray, object]) -> None:
    hu, g = head
    deep = face_mask(hu, g, depth_mm=20.0)  # type: ignore[arg-type]
    r = audit(hu, replace_masked(hu, deep), g, deep, OPTS)  # type: ignore[arg-type]
    assert r.mask_brain_overlap_ml > 10.0
    d = gate(r)
    assert d.verdict is Verdict.QUARANTINE and "intracranial" in d.reasons[0]


def test_intracranial_estimate_covers_the_brain(head: tuple[np.ndarray, object]) -> None:
    hu, g = head
    brain, step = intracranial_mask(hu, g)  # type: ignore[arg-type]
    p = patient_points(g)[:: step[0], :: step[1], :: step[2]]  # type: ignore[arg-type]
    inner = np.linalg.norm(p / np.array([52.0, 72.0, 85.0]), axis=-1) < 0.85
    assert brain[inner].mean() > 0.95
    assert not brain[hu[:: step[0], :: step[1], :: step[2]] > 500].any()  # no bone


# ------------------------------------------------------------------------- on the phantom


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return cached_phantom(**SMALL)


def test_phantom_face_detected_before_and_not_after_defacing(phantom: Phantom) -> None:
    """The realism test: dlib finds the phantom's face; the defaced render shows none."""
    ph = phantom
    r = audit(ph.hu, replace_masked(ph.hu, ph.facemask), ph.geometry, ph.facemask, OPTS)
    front = next(v for v in r.views if v.yaw_deg == 0.0)
    assert front.score_original is not None and front.score_original > 1.0
    assert r.original_face_found
    assert all(v.score_defaced is None or v.score_defaced < OPTS.detect_threshold for v in r.views)
    assert gate(r).verdict is Verdict.PASS


def test_emptied_mask_is_quarantined_and_face_still_seen(phantom: Phantom) -> None:
    ph = phantom
    empty = np.zeros(ph.hu.shape, bool)
    r = audit(ph.hu, ph.hu.copy(), ph.geometry, empty, OPTS)
    assert r.changed_fraction == 0.0 and r.mask_ml == 0.0
    assert all(v.score_defaced == v.score_original for v in r.views)
    d = gate(r)
    assert d.verdict is Verdict.QUARANTINE and "empty" in d.reasons[0]


def _forehead_only(ph: Phantom) -> np.ndarray:
    """A plausible-size mask that leaves the face visible (forehead only)."""
    z = patient_points(ph.geometry)[..., 2]
    return ph.facemask & (z > ph.landmarks["nasion"][2] + 10.0)


def test_visible_face_escalates_to_the_next_bone_setting(phantom: Phantom) -> None:
    ph = phantom
    weak = _forehead_only(ph)
    factory = staged_engines({"keep": weak, "smooth": ph.facemask, "remove": ph.facemask})
    out = audited_mask(factory, ph.hu, ph.geometry, OPTS)
    assert [(bone, d.verdict) for bone, d in out.history] == [
        ("keep", Verdict.ESCALATE),
        ("smooth", Verdict.PASS),
    ]
    assert out.bone == "smooth" and out.report.bone == "smooth"
    assert out.decision.verdict is Verdict.PASS
    assert np.array_equal(out.mask, ph.facemask)
    assert np.array_equal(out.defaced, replace_masked(ph.hu, ph.facemask))


def test_face_still_visible_at_the_last_level_is_quarantined(phantom: Phantom) -> None:
    ph = phantom
    weak = _forehead_only(ph)
    factory = staged_engines({"keep": weak, "smooth": weak})
    out = audited_mask(factory, ph.hu, ph.geometry, AuditOptions(escalation=("keep", "smooth")))
    assert out.decision.verdict is Verdict.QUARANTINE
    assert "strongest setting bone=smooth" in out.decision.reasons[-1]
    assert len(out.history) == 2


def test_anatomical_engine_output_passes_the_gate(phantom: Phantom) -> None:
    ph = phantom

    def factory(bone: str) -> AnatomicalEngine:
        return AnatomicalEngine(AnatomicalOptions(bone=bone))  # type: ignore[arg-type]

    out = audited_mask(factory, ph.hu, ph.geometry, OPTS)  # read-only: nothing writes it
    assert out.decision.verdict is Verdict.PASS, out.decision.reasons
    assert out.report.original_face_found
    assert out.report.mask_ml > OPTS.min_mask_ml


def test_cnn_detector_sees_the_phantom_face_before_and_not_after(phantom: Phantom) -> None:
    ph = phantom
    opts = AuditOptions(cnn_detector=True, yaws=(0.0,))
    r = audit(ph.hu, replace_masked(ph.hu, ph.facemask), ph.geometry, ph.facemask, opts)
    (front,) = r.views
    assert front.cnn_original is not None and front.cnn_original > opts.cnn_threshold
    assert front.cnn_defaced is None or front.cnn_defaced < opts.cnn_threshold
    assert gate(r, opts).verdict is Verdict.PASS
    # A CNN detection above its threshold escalates on its own.
    assert gate(_report(None, views=[ViewAudit(0.0, 2.0, None, None, 1.0, 0.9)]), opts).verdict is (
        Verdict.ESCALATE
    )
