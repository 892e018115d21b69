"""PS3.15 Annex E header de-identification: pure functions over pydicom datasets.

Public API::

    from anonymizer import Profile, deidentify, DeidentificationError
    new_ds = deidentify(ds, Profile(key=b"..."), facemask_applied=True)

Never imports ``gateway``, Celery or pynetdicom; the only I/O is :func:`write_reid_records`,
which the caller invokes explicitly.
"""

from anonymizer.deidentify import (
    Decision,
    DeidentificationError,
    Effect,
    deidentify,
    explain,
)
from anonymizer.describe import describe
from anonymizer.profile import Profile
from anonymizer.reid import ReidRecord, reid_record, write_reid_records

__all__ = [
    "Decision",
    "DeidentificationError",
    "Effect",
    "Profile",
    "ReidRecord",
    "deidentify",
    "describe",
    "explain",
    "reid_record",
    "write_reid_records",
]
