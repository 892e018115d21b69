"""The privacy audit of one defaced series and the QA gate that decides its fate.

:func:`audit` renders the original and the defaced skin surface from the same cameras
(pixel-aligned), runs dlib's face detector on both, measures how far the defaced face's
embedding moved from the original's, and checks that the facemask is plausible. :func:`gate`
turns a report into a decision. :func:`audited_mask` runs the whole loop a pipeline needs:
mask → deface → audit → escalate the engine's ``bone`` setting while a face is still found →
pass or quarantine (fail closed).

All pure: arrays in, report out. Writing PNGs/JSON is the caller's job.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import numpy as np
from scipy import ndimage

from inference.audit.detect import (
    detect_faces,
    detect_faces_cnn,
    embedding_distance,
    face_descriptor,
)
from inference.audit.render import SKIN_HU, View, head_frame, render_views
from inference.engines import FacemaskEngine
from inference.geometry import SUPERIOR, Geometry
from inference.replace import replace_masked

#: Default gate threshold on dlib HOG scores. dlib's own is 0, but renders of a defaced
#: skull (bone kept) score up to ~0.4 on the phantoms while their faces score 1.5–2.1.
DETECT_THRESHOLD = 0.5
#: Grid step of the intracranial-space estimate, mm.
_BRAIN_STEP_MM = 2.0
#: Smallest connected intracranial region that counts as "the brain was found", mL.
_MIN_BRAIN_ML = 100.0


class AuditConfig(Protocol):
    """What the audit reads from its settings (``gateway.config.AuditSettings`` fits)."""

    @property
    def detect_threshold(self) -> float: ...
    @property
    def reid_distance(self) -> float | None: ...
    @property
    def escalation(self) -> Sequence[str]: ...
    @property
    def render_size(self) -> int: ...
    @property
    def yaws(self) -> Sequence[float]: ...
    @property
    def iso_hu(self) -> float: ...
    @property
    def upsample(self) -> int: ...
    @property
    def min_mask_ml(self) -> float: ...
    @property
    def max_brain_overlap_ml(self) -> float: ...
    @property
    def cnn_detector(self) -> bool: ...
    @property
    def cnn_threshold(self) -> float: ...


@dataclass(frozen=True)
class AuditOptions:
    """Defaults of the audit, for callers without a settings object (tests, benchmarks)."""

    detect_threshold: float = DETECT_THRESHOLD
    reid_distance: float | None = None
    escalation: Sequence[str] = ("keep", "smooth", "remove")
    render_size: int = 512
    yaws: Sequence[float] = (-30.0, 0.0, 30.0)
    iso_hu: float = SKIN_HU
    upsample: int = 0
    min_mask_ml: float = 20.0
    max_brain_overlap_ml: float = 1.0
    cnn_detector: bool = False
    cnn_threshold: float = 0.5


@dataclass(frozen=True)
class ViewAudit:
    """Detector results for one camera. Scores are dlib HOG scores (None: nothing found
    down to the reporting floor of −0.5); ``distance`` is the embedding distance between the
    original face and the defaced render at the same place (None: no original face).
    ``cnn_*`` are dlib CNN (MMOD) confidences when that detector is enabled (None: off or
    nothing found)."""

    yaw_deg: float
    score_original: float | None
    score_defaced: float | None
    distance: float | None
    cnn_original: float | None = None
    cnn_defaced: float | None = None


@dataclass
class AuditReport:
    """Everything the gate decides on, plus the renders (left out of the JSON)."""

    views: list[ViewAudit]
    #: Some original render shows a face above the gate threshold. If not, the detector
    #: test says little (the original did not look like a face to it either).
    original_face_found: bool
    changed_fraction: float
    mask_ml: float
    brain_found: bool
    mask_brain_overlap_ml: float
    bone: str | None = None
    images: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no images)."""
        d = asdict(self)
        d.pop("images")
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


class Verdict(StrEnum):
    PASS = "pass"
    ESCALATE = "escalate"
    QUARANTINE = "quarantine"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reasons: tuple[str, ...] = ()


@dataclass
class AuditedMask:
    """Outcome of :func:`audited_mask`: the last mask tried, its defaced volume and audit."""

    mask: np.ndarray
    defaced: np.ndarray
    report: AuditReport
    decision: Decision
    bone: str
    history: list[tuple[str, Decision]] = field(default_factory=list)


# --------------------------------------------------------------------------------- renders


@dataclass
class OriginalFaces:
    """Renders, detections and descriptors of the original volume, computed once and reused
    for every escalation step."""

    frame: np.ndarray
    views: list[View]
    scores: list[float | None]
    boxes: list[tuple[int, int, int, int] | None]
    descriptors: list[np.ndarray | None]
    cnn_scores: list[float | None]


def probe_original(hu: np.ndarray, geometry: Geometry, options: AuditConfig) -> OriginalFaces:
    """Render the original and find its face in each view."""
    frame = head_frame(hu, geometry, options.iso_hu)
    views = render_views(
        hu, geometry, tuple(options.yaws), options.render_size, options.iso_hu, frame_from=frame
    )
    scores: list[float | None] = []
    boxes: list[tuple[int, int, int, int] | None] = []
    descs: list[np.ndarray | None] = []
    cnn: list[float | None] = []
    for v in views:
        cnn.append(_cnn_best(v.image) if options.cnn_detector else None)
        faces = detect_faces(v.image, options.upsample)
        best = faces[0] if faces else None
        scores.append(best.score if best else None)
        if best is not None and best.score > 0.0:  # a face at dlib's own threshold
            boxes.append(best.box)
            descs.append(face_descriptor(v.image, best.box))
        else:
            boxes.append(None)
            descs.append(None)
    return OriginalFaces(frame, views, scores, boxes, descs, cnn)


def _cnn_best(image: np.ndarray) -> float | None:
    faces = detect_faces_cnn(image)
    return faces[0].score if faces else None


# ------------------------------------------------------------------------------ mask checks


def intracranial_mask(hu: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, tuple[int, ...]]:
    """Coarse estimate of the intracranial soft tissue and the stride it was sampled at.

    Bone (> 250 HU) closed in axial planes encloses the brain; the soft tissue inside it,
    eroded by one coarse voxel, largest component. Good enough to tell a facemask that
    reaches into the head from one that stays in front of it.
    """
    step = tuple(int(s) for s in np.maximum(1, np.round(_BRAIN_STEP_MM / geometry.spacing)))
    coarse = hu[:: step[0], :: step[1], :: step[2]]
    bone = coarse > 250
    axis, _ = geometry.axis_towards(SUPERIOR)
    filled = np.zeros_like(bone)
    for i in range(bone.shape[axis]):
        sl = [slice(None)] * 3
        sl[axis] = slice(i, i + 1)
        plane = bone[tuple(sl)].squeeze(axis)
        filled[tuple(sl)] = np.expand_dims(ndimage.binary_fill_holes(plane), axis)
    soft = filled & ~bone & (coarse > -100)
    soft = ndimage.binary_erosion(soft)
    labels, n = ndimage.label(soft)
    if n == 0:
        return np.zeros_like(soft), step
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1), step


def _voxel_ml(geometry: Geometry, step: Sequence[int] = (1, 1, 1)) -> float:
    return float(abs(np.linalg.det(geometry.affine[:3, :3])) * np.prod(step) / 1000.0)


# ------------------------------------------------------------------------------------ audit


def audit(
    original_hu: np.ndarray,
    defaced_hu: np.ndarray,
    geometry: Geometry,
    mask: np.ndarray,
    options: AuditConfig | None = None,
    *,
    original: OriginalFaces | None = None,
    brain: tuple[np.ndarray, tuple[int, ...]] | None = None,
) -> AuditReport:
    """Audit one defaced volume against its original.

    ``original`` and ``brain`` (from :func:`probe_original` / :func:`intracranial_mask`) may
    be passed to reuse them across escalation steps; they are computed when absent.
    """
    opts: AuditConfig = options or AuditOptions()
    if not (original_hu.shape == defaced_hu.shape == mask.shape == geometry.shape):
        raise ValueError("original, defaced, mask and geometry shapes differ")
    orig = original or probe_original(original_hu, geometry, opts)
    after = render_views(
        defaced_hu,
        geometry,
        tuple(opts.yaws),
        opts.render_size,
        opts.iso_hu,
        frame_from=orig.frame,
    )
    views: list[ViewAudit] = []
    images: dict[str, np.ndarray] = {}
    for i, v in enumerate(after):
        faces = detect_faces(v.image, opts.upsample)
        box, desc = orig.boxes[i], orig.descriptors[i]
        dist = None
        if box is not None and desc is not None:
            dist = embedding_distance(desc, face_descriptor(v.image, box))
        views.append(
            ViewAudit(
                yaw_deg=v.yaw_deg,
                score_original=_round(orig.scores[i]),
                score_defaced=_round(faces[0].score if faces else None),
                distance=_round(dist),
                cnn_original=_round(orig.cnn_scores[i]),
                cnn_defaced=_round(_cnn_best(v.image) if opts.cnn_detector else None),
            )
        )
        tag = f"yaw{v.yaw_deg:+.0f}"
        images[f"original_{tag}"] = orig.views[i].image
        images[f"defaced_{tag}"] = v.image

    intracranial, step = brain or intracranial_mask(original_hu, geometry)
    coarse_mask = mask[:: step[0], :: step[1], :: step[2]]
    overlap = int(np.count_nonzero(coarse_mask & intracranial))
    changed = np.count_nonzero(original_hu != defaced_hu) / original_hu.size
    return AuditReport(
        views=views,
        original_face_found=any(s is not None and s > opts.detect_threshold for s in orig.scores),
        changed_fraction=round(float(changed), 6),
        mask_ml=round(float(np.count_nonzero(mask)) * _voxel_ml(geometry), 2),
        brain_found=bool(intracranial.sum() * _voxel_ml(geometry, step) >= _MIN_BRAIN_ML),
        mask_brain_overlap_ml=round(float(overlap) * _voxel_ml(geometry, step), 2),
        images=images,
    )


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


# ------------------------------------------------------------------------------------- gate


def gate(report: AuditReport, thresholds: AuditConfig | None = None) -> Decision:
    """Pass, escalate (face still found: try a stronger defacing) or quarantine (the mask
    itself is implausible, which a stronger bone setting would not fix)."""
    t: AuditConfig = thresholds or AuditOptions()
    bad_mask: list[str] = []
    if report.mask_ml == 0:
        bad_mask.append("facemask is empty")
    elif report.mask_ml < t.min_mask_ml:
        bad_mask.append(f"facemask is {report.mask_ml:.1f} mL, below {t.min_mask_ml:.1f} mL")
    if report.brain_found and report.mask_brain_overlap_ml > t.max_brain_overlap_ml:
        bad_mask.append(
            f"facemask reaches {report.mask_brain_overlap_ml:.1f} mL into the intracranial space"
        )
    if bad_mask:
        return Decision(Verdict.QUARANTINE, tuple(bad_mask))
    face: list[str] = []
    for v in report.views:
        if v.score_defaced is not None and v.score_defaced > t.detect_threshold:
            face.append(f"face detected at yaw {v.yaw_deg:+.0f}° (score {v.score_defaced:.2f})")
        if v.cnn_defaced is not None and v.cnn_defaced > t.cnn_threshold:
            face.append(
                f"CNN detector found a face at yaw {v.yaw_deg:+.0f}° "
                f"(confidence {v.cnn_defaced:.2f})"
            )
        if t.reid_distance is not None and v.distance is not None and v.distance < t.reid_distance:
            face.append(
                f"defaced face re-identifiable at yaw {v.yaw_deg:+.0f}° "
                f"(embedding distance {v.distance:.2f} < {t.reid_distance:.2f})"
            )
    if face:
        return Decision(Verdict.ESCALATE, tuple(face))
    return Decision(Verdict.PASS)


def audited_mask(
    engine_factory: Callable[[str], FacemaskEngine],
    hu: np.ndarray,
    geometry: Geometry,
    settings: AuditConfig,
    fill: str | float = "air",
) -> AuditedMask:
    """Mask, deface, audit; escalate ``bone`` through ``settings.escalation`` while a face is
    still found; quarantine when the last level still shows one or the mask is implausible.

    ``engine_factory(bone)`` returns the engine configured with that bone setting. Errors of
    the engine (:class:`inference.errors.FacemaskError`) propagate: the caller quarantines.
    """
    levels = list(settings.escalation)
    if not levels:
        raise ValueError("escalation needs at least one bone setting")
    original = probe_original(hu, geometry, settings)
    brain = intracranial_mask(hu, geometry)
    history: list[tuple[str, Decision]] = []
    for bone in levels:
        mask = engine_factory(bone).mask(hu, geometry)
        defaced = replace_masked(hu, mask, fill)
        report = audit(hu, defaced, geometry, mask, settings, original=original, brain=brain)
        report.bone = bone
        decision = gate(report, settings)
        history.append((bone, decision))
        if decision.verdict is not Verdict.ESCALATE:
            break
    else:
        decision = Decision(
            Verdict.QUARANTINE,
            (*decision.reasons, f"face still found with the strongest setting bone={bone}"),
        )
    return AuditedMask(mask, defaced, report, decision, bone, history)
