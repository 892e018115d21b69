"""Short, log-safe identifiers and file-name-safe UIDs.

Original UIDs are not PHI-free in the strict sense (some are built from dates, MAC
addresses or accession numbers), so logs carry a short hash of them instead.
"""

from __future__ import annotations

import hashlib
import re

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def log_id(uid: str) -> str:
    """A 10-character hash of ``uid`` that identifies a series in logs without revealing it."""
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:10]


def safe_uid(uid: str | None) -> str:
    """``uid`` if it is a syntactically valid DICOM UID usable as a file name, else raise.

    PS3.5 9.1: digits and dots, at most 64 characters. Anything else (path separators,
    ``..``, names) never reaches the file system.
    """
    value = (uid or "").strip().rstrip("\0").strip()
    if not value or len(value) > 64 or not _UID.match(value):
        raise ValueError("not a valid DICOM UID")
    return value
