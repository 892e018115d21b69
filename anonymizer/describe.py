"""The profile describes itself (dicognito-style): one line per Table E.1-1 row.

``docs/deidentification.md`` embeds :func:`describe` of the default profile and a test checks
that the two agree, so the documentation cannot drift from the code.
"""

from __future__ import annotations

from pydicom.datadict import dictionary_VR

from anonymizer.deidentify import (
    _ACCESSION,
    _PATIENT_ID,
    _PATIENT_NAME,
    _STUDY_ID,
    _TEXT_VRS,
    _single,
    resolve,
)
from anonymizer.profile import Profile
from anonymizer.table import STANDARD_EDITION, Action, Rule, load_table

_PSEUDONYMISED = {_PATIENT_NAME, _PATIENT_ID, _ACCESSION, _STUDY_ID}


def _vr(rule: Rule) -> str:
    if rule.tag is None:
        return "UN" if "GGGG" in rule.pattern else "OB"
    try:
        return str(dictionary_VR(rule.tag))
    except KeyError:
        return "UN"


def _effect(rule: Rule, action: Action, vr: str) -> str:
    if rule.tag in _PSEUDONYMISED and action in (Action.Z, Action.D):
        return "keyed pseudonym"
    if action is Action.X:
        return "remove"
    if action is Action.K:
        return "keep, process items" if vr == "SQ" else "keep"
    if action is Action.U:
        return "keep, replace UIDs in items" if vr == "SQ" else "keyed 2.25 UID"
    if action is Action.Z:
        return "empty sequence" if vr == "SQ" else "empty"
    if action is Action.D:
        if vr == "SQ":
            return "rebuild items strictly"
        return "keyed 2.25 UID" if vr == "UI" else "dummy value"
    # C: where a value cannot be cleaned, the basic action applies (shown in brackets)
    fallback = _effect(rule, _single(rule.basic, vr), vr)
    if vr == "SQ":
        return "rebuild items strictly"
    if vr in ("DA", "DT"):
        return f"shift by patient offset (else {fallback})"
    if vr == "TM":
        return "keep time of day"
    if vr == "CS":
        return "keep"
    if vr in _TEXT_VRS and vr not in ("AE", "UR"):
        return f"keep vocabulary words only (else {fallback})"
    return fallback


def describe(profile: Profile) -> list[str]:
    """Human-readable action list of ``profile``: options, general rules, then every row."""
    opts = ", ".join(o.name.lower() for o in profile.options) or "none"
    lines = [
        f"PS3.15 Table E.1-1 ({STANDARD_EDITION}), Basic Application Level Confidentiality Profile",
        f"options: {opts}",
        f"pseudonyms: HMAC-SHA256 keyed; patient '{profile.project_prefix}-' + 16 hex digits",
        "unlisted numeric/coded/binary: keep; unlisted well-known UID: keep; other UID: keyed",
        "unlisted date/time: "
        + ("shift dates, keep times" if profile.retain_longitudinal_modified_dates else "remove"),
        "unlisted PN, AS, UN and free text: remove (except a technical allow-list)",
        "private attributes: remove"
        + (
            " except " + ", ".join(sorted(str(s) for s in profile.safe_private))
            if profile.safe_private
            else ""
        ),
        "overlay groups 60xx: remove whole group; curves 50xx: remove",
        "Burned In Annotation = YES: refuse the instance",
    ]
    for rule in load_table().rules:
        vr = _vr(rule)
        action, label = resolve(rule, profile, vr)
        lines.append(f"{rule.pattern} {rule.name} [{vr}]: {label} → {_effect(rule, action, vr)}")
    return lines
