"""PS3.15 Table E.1-1 (edition 2024b) as validated, frozen rule objects.

The table ships as package data (``anonymizer/data``, MIT-licensed copy of the innolitics
extraction) and is parsed once per process: every row becomes a :class:`Rule` whose actions are
:class:`Action` members, so an unknown code fails at load time rather than mid-series.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from importlib import resources

STANDARD_EDITION = "2024b"
TABLE_RESOURCE = "ps3.15-annex-e-confidentiality-profile.json"


class Action(Enum):
    """Action codes of PS3.15 Table E.1-1 (E.1.1 "Action Codes")."""

    D = "D"  # replace with a non-zero length dummy value consistent with the VR
    Z = "Z"  # replace with a zero length value (or a dummy)
    X = "X"  # remove
    K = "K"  # keep (sequences: apply the profile to their items)
    C = "C"  # clean: replace with values of similar meaning known not to identify
    U = "U"  # replace UID with a non-zero length UID, consistent within the set of instances
    X_Z = "X/Z"  # X unless Z is required to keep the IOD valid (Type 2)
    X_D = "X/D"  # X unless D is required (Type 1)
    X_Z_D = "X/Z/D"  # X unless Z or D is required
    Z_D = "Z/D"  # Z unless D is required
    X_Z_U = "X/Z/U*"  # X unless Z or replacement of contained UIDs (U) is required


class Option(Enum):
    """Profile options of PS3.15 E.3 that have a column in the table (JSON key as value)."""

    RETAIN_LONGITUDINAL_MODIFIED_DATES = "rtnLongModifDatesOpt"
    RETAIN_LONGITUDINAL_FULL_DATES = "rtnLongFullDatesOpt"
    RETAIN_PATIENT_CHARACTERISTICS = "rtnPatCharsOpt"
    RETAIN_DEVICE_IDENTITY = "rtnDevIdOpt"
    RETAIN_INSTITUTION_IDENTITY = "rtnInstIdOpt"
    RETAIN_UIDS = "rtnUIDsOpt"
    CLEAN_DESCRIPTORS = "cleanDescOpt"
    CLEAN_STRUCTURED_CONTENT = "cleanStructContOpt"
    CLEAN_GRAPHICS = "cleanGraphOpt"
    RETAIN_SAFE_PRIVATE = "rtnSafePrivOpt"


@dataclass(frozen=True)
class Rule:
    """One row of Table E.1-1.

    ``tag`` is the 32-bit tag for ordinary rows; repeating-group and private rows have
    ``tag=None`` and are matched by :meth:`Table.lookup` through ``pattern``.
    """

    pattern: str  # the row's tag as printed in the standard, e.g. "(0010,0010)", "(60XX,3000)"
    name: str
    basic: Action
    options: tuple[tuple[Option, Action], ...]
    tag: int | None

    def option_action(self, option: Option) -> Action | None:
        for opt, action in self.options:
            if opt is option:
                return action
        return None


_HEX_TAG = re.compile(r"^\(([0-9A-F]{4}),([0-9A-F]{4})\)$")
CURVE_PATTERN = "(50XX,XXXX)"
OVERLAY_DATA_PATTERN = "(60XX,3000)"
OVERLAY_COMMENTS_PATTERN = "(60XX,4000)"
PRIVATE_PATTERN = "(GGGG,EEEE) WHERE GGGG IS ODD"
_PATTERNS = (CURVE_PATTERN, OVERLAY_DATA_PATTERN, OVERLAY_COMMENTS_PATTERN, PRIVATE_PATTERN)


@dataclass(frozen=True)
class Table:
    """All rows, indexed by tag, plus the repeating-group and private rows."""

    rules: tuple[Rule, ...]
    by_tag: dict[int, Rule]
    curve: Rule
    overlay_data: Rule
    overlay_comments: Rule
    private: Rule

    def lookup(self, tag: int) -> Rule | None:
        """The row that applies to ``tag`` (private tags → the private row), or None."""
        rule = self.by_tag.get(tag)
        if rule is not None:
            return rule
        group = tag >> 16
        if group & 1:
            return self.private
        if 0x5000 <= group <= 0x50FF:
            return self.curve
        if 0x6000 <= group <= 0x60FF:
            element = tag & 0xFFFF
            if element == 0x3000:
                return self.overlay_data
            if element == 0x4000:
                return self.overlay_comments
        return None


def _parse_row(row: dict[str, str]) -> Rule:
    pattern = row["tag"].strip().upper()
    name = " ".join(row["name"].split())  # some names carry line breaks and notes
    try:
        basic = Action(row["basicProfile"].strip())
        options = tuple((opt, Action(row[opt.value].strip())) for opt in Option if opt.value in row)
    except ValueError as exc:
        raise ValueError(f"Table E.1-1 row {pattern} {name!r}: unknown action code") from exc
    match = _HEX_TAG.match(pattern)
    if match:
        tag = (int(match.group(1), 16) << 16) | int(match.group(2), 16)
    elif pattern in _PATTERNS:
        tag = None
    else:
        raise ValueError(f"Table E.1-1: unrecognised tag pattern {pattern!r}")
    return Rule(pattern=pattern, name=name, basic=basic, options=options, tag=tag)


@lru_cache(maxsize=1)
def load_table() -> Table:
    """Parse and validate the packaged table (once per process)."""
    text = (resources.files("anonymizer") / "data" / TABLE_RESOURCE).read_text(encoding="utf-8")
    rows = json.loads(text)
    rules: list[Rule] = []
    by_tag: dict[int, Rule] = {}
    special: dict[str, Rule] = {}
    for row in rows:
        rule = _parse_row(row)
        if rule.tag is None:
            # The private row appears twice in the source; identical duplicates are harmless.
            if rule.pattern in special and special[rule.pattern] != rule:
                raise ValueError(f"Table E.1-1: conflicting rows for {rule.pattern}")
            if rule.pattern in special:
                continue
            special[rule.pattern] = rule
        else:
            if rule.tag in by_tag:
                raise ValueError(f"Table E.1-1: duplicate row for {rule.pattern}")
            by_tag[rule.tag] = rule
        rules.append(rule)
    missing = [p for p in _PATTERNS if p not in special]
    if missing:
        raise ValueError(f"Table E.1-1: missing rows {missing}")
    return Table(
        rules=tuple(rules),
        by_tag=by_tag,
        curve=special[CURVE_PATTERN],
        overlay_data=special[OVERLAY_DATA_PATTERN],
        overlay_comments=special[OVERLAY_COMMENTS_PATTERN],
        private=special[PRIVATE_PATTERN],
    )
