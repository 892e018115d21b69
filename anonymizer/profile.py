"""The de-identification profile: PS3.15 Basic Profile plus the options a site selects.

Field names mirror ``gateway.config.DeidSettings`` so the gateway can build one with
``Profile(key=secret, **settings_fields)`` without this package importing the gateway.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from anonymizer.table import Option

MIN_KEY_BYTES = 16
_PREFIX = re.compile(r"^[A-Za-z0-9]{1,16}$")
# "(0019,xx23) GEMS_ACQU_01" — the notation of PS3.15 Table E.3.10-1 (parentheses optional,
# creator separated by space, comma or '@').
_SAFE_PRIVATE = re.compile(
    r"^\(?\s*([0-9A-Fa-f]{4})\s*,\s*[xX]{2}([0-9A-Fa-f]{2})\s*\)?\s*[,@ ]\s*(\S.*?)\s*$"
)


@dataclass(frozen=True)
class SafePrivate:
    """One allow-listed private attribute: odd group, element offset in its block, creator."""

    group: int
    offset: int
    creator: str

    def __str__(self) -> str:
        return f"({self.group:04X},xx{self.offset:02X}) {self.creator}"


def parse_safe_private(entry: str) -> SafePrivate:
    """Parse ``"(GGGG,xxEE) CREATOR"``; raise ValueError naming the expected form."""
    match = _SAFE_PRIVATE.match(entry)
    if not match:
        raise ValueError(
            f"retain_safe_private entry {entry!r} is not of the form '(GGGG,xxEE) CREATOR'"
        )
    group = int(match.group(1), 16)
    if not group & 1 or group <= 0x0008:
        raise ValueError(f"retain_safe_private entry {entry!r}: group must be odd and > 0008")
    return SafePrivate(group=group, offset=int(match.group(2), 16), creator=match.group(3))


@dataclass(frozen=True)
class Profile:
    """Which Annex E options apply, and the key behind every pseudonym.

    ``key`` (≥ 16 bytes) keys the HMAC-SHA256 of UIDs, IDs and date shifts; it is excluded from
    ``repr`` and never written anywhere. Retain Longitudinal Full Dates is deliberately not
    offered: shifted dates (the modified-dates option) are the most this gateway retains.
    """

    key: bytes = field(repr=False)
    project_prefix: str = "DG"
    retain_longitudinal_modified_dates: bool = False
    retain_patient_characteristics: bool = False
    retain_device_identity: bool = False
    retain_institution_identity: bool = False
    clean_descriptors: bool = True
    retain_safe_private: tuple[str, ...] = ()
    retain_uids: bool = False
    safe_private: frozenset[SafePrivate] = field(init=False, repr=False, compare=False)
    #: The table options in force, in the order of :class:`Option` (derived from the flags).
    options: tuple[Option, ...] = field(init=False, repr=False, compare=False)
    options_key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        key = self.key
        if isinstance(key, str):
            key = key.encode("utf-8")
            object.__setattr__(self, "key", key)
        if not isinstance(key, bytes | bytearray) or len(key) < MIN_KEY_BYTES:
            raise ValueError(f"de-identification key must be at least {MIN_KEY_BYTES} bytes")
        if not _PREFIX.match(self.project_prefix):
            raise ValueError("project_prefix must be 1-16 letters or digits")
        entries: Iterable[str] = self.retain_safe_private
        object.__setattr__(self, "retain_safe_private", tuple(entries))
        parsed = frozenset(parse_safe_private(e) for e in self.retain_safe_private)
        object.__setattr__(self, "safe_private", parsed)
        object.__setattr__(self, "options", self._selected_options())
        object.__setattr__(self, "options_key", ",".join(o.value for o in self.options))

    def _selected_options(self) -> tuple[Option, ...]:
        """The table options in force, in the order of :class:`Option`."""
        selected = {
            Option.RETAIN_LONGITUDINAL_MODIFIED_DATES: self.retain_longitudinal_modified_dates,
            Option.RETAIN_PATIENT_CHARACTERISTICS: self.retain_patient_characteristics,
            Option.RETAIN_DEVICE_IDENTITY: self.retain_device_identity,
            Option.RETAIN_INSTITUTION_IDENTITY: self.retain_institution_identity,
            Option.RETAIN_UIDS: self.retain_uids,
            Option.CLEAN_DESCRIPTORS: self.clean_descriptors,
            Option.RETAIN_SAFE_PRIVATE: bool(self.safe_private),
        }
        return tuple(opt for opt in Option if selected.get(opt, False))
