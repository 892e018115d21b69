"""Privacy audit: render the defaced face, try to detect and re-identify it, gate the series.

See docs/audit.md. ``render`` draws the skin surface, ``detect`` wraps dlib's detector and
face embedding, ``report`` builds the audit report, the gate decision and the escalation loop.
"""

from inference.audit.render import render_skin, render_views
from inference.audit.report import (
    AuditedMask,
    AuditOptions,
    AuditReport,
    Decision,
    Verdict,
    audit,
    audited_mask,
    gate,
)

__all__ = [
    "AuditOptions",
    "AuditReport",
    "AuditedMask",
    "Decision",
    "Verdict",
    "audit",
    "audited_mask",
    "gate",
    "render_skin",
    "render_views",
]
