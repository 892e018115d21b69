"""Keyed, deterministic pseudonyms (HMAC-SHA256): same input + same key → same output.

Determinism makes retries idempotent and keeps series of one study consistent across runs and
restarts; the key makes the mapping one-way for anyone without it (unlike a plain hash, which
can be reversed by hashing a list of candidate MRNs). Each kind of value has its own domain
label so a patient ID and a UID with the same text never share a digest.
"""

from __future__ import annotations

import datetime as _dt
import hmac

# Dates move back by 1 to 10 years (whole days), so intervals within a patient are preserved
# exactly while the absolute dates say nothing about the real ones.
MIN_SHIFT_DAYS = 365
MAX_SHIFT_DAYS = 3650


def _digest(key: bytes, domain: str, value: str) -> bytes:
    msg = domain.encode("ascii") + b"\x00" + value.encode("utf-8", "surrogateescape")
    return hmac.digest(key, msg, "sha256")  # one-shot C implementation


def pseudo_uid(key: bytes, uid: str) -> str:
    """``2.25.<128-bit integer>`` (PS3.5 B.2): at most 44 characters, valid as a UI value."""
    return "2.25." + str(int.from_bytes(_digest(key, "uid", uid.strip("\x00 "))[:16], "big"))


def _code(key: bytes, domain: str, value: str, length: int) -> str:
    # Upper-case hex: 4 bits per character, encoded in C (base64.b32encode is pure Python).
    return _digest(key, domain, value).hex()[:length].upper()


def pseudo_patient_id(key: bytes, prefix: str, patient_id: str) -> str:
    """``PREFIX-XXXXXXXXXXXXXXXX``: 16 hex digits (64 bits) after the project prefix."""
    return f"{prefix}-{_code(key, 'patient', patient_id.strip(), 16)}"


def pseudo_short_id(key: bytes, domain: str, value: str) -> str:
    """A 16-hex-digit (64-bit) keyed code for SH identifiers (Accession Number, Study ID)."""
    return _code(key, domain, value.strip(), 16)


def date_shift_days(key: bytes, patient_key: str) -> int:
    """Per-patient shift in days, in [MIN_SHIFT_DAYS, MAX_SHIFT_DAYS]; dates move back by it."""
    n = int.from_bytes(_digest(key, "date", patient_key.strip())[:8], "big")
    return MIN_SHIFT_DAYS + n % (MAX_SHIFT_DAYS - MIN_SHIFT_DAYS + 1)


def shift_da(value: str, days: int) -> str | None:
    """Shift a DA value ``YYYYMMDD`` back by ``days``; None if it is not a full date."""
    value = value.strip()
    if len(value) != 8 or not value.isdigit():
        return None
    try:
        day = _dt.date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return None
    try:
        return (day - _dt.timedelta(days=days)).strftime("%Y%m%d")
    except OverflowError:
        return None


def shift_dt(value: str, days: int) -> str | None:
    """Shift the date part of a DT value, keeping time and offset; None if no full date."""
    value = value.strip()
    shifted = shift_da(value[:8], days)
    if shifted is None:
        return None
    return shifted + value[8:]
