"""Optional re-identification lookup (original ↔ pseudonym), kept apart from the output.

:func:`reid_record` is pure: pseudonyms are deterministic, so the mapping is recomputed from the
original dataset and the profile instead of being smuggled out of :func:`deidentify`.
:func:`write_reid_records` is the only I/O of this package: it appends JSON lines to a file
created with mode 0600 (readable only by the service user), only where a site configured one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from anonymizer import pseudonym
from anonymizer.deidentify import patient_key
from anonymizer.profile import Profile


@dataclass(frozen=True)
class ReidRecord:
    """One study of one patient: the originals (PHI!) and their pseudonyms."""

    patient_id: str
    patient_name: str
    pseudonym: str
    study_instance_uid: str
    pseudo_study_instance_uid: str
    accession_number: str
    pseudo_accession_number: str
    date_shift_days: int


def reid_record(ds: Dataset, profile: Profile) -> ReidRecord:
    """The lookup entry for ``ds`` under ``profile`` (same values :func:`deidentify` uses)."""
    pid = str(ds.get("PatientID", "") or "").strip()
    name = str(ds.get("PatientName", "") or "").strip()
    study = str(ds.get("StudyInstanceUID", "") or "").strip()
    accession = str(ds.get("AccessionNumber", "") or "").strip()
    key = profile.key
    return ReidRecord(
        patient_id=pid,
        patient_name=name,
        pseudonym=pseudonym.pseudo_patient_id(key, profile.project_prefix, pid or name)
        if (pid or name)
        else "",
        study_instance_uid=study,
        pseudo_study_instance_uid=(
            study if profile.retain_uids or not study else pseudonym.pseudo_uid(key, study)
        ),
        accession_number=accession,
        pseudo_accession_number=(
            pseudonym.pseudo_short_id(key, "accession", accession) if accession else ""
        ),
        date_shift_days=(
            pseudonym.date_shift_days(key, patient_key(ds))
            if profile.retain_longitudinal_modified_dates
            else 0
        ),
    )


def write_reid_records(path: Path | str, records: Iterable[ReidRecord]) -> int:
    """Append ``records`` (deduplicated) to the lookup file at ``path``; return lines written.

    The file is created 0600 and forced back to 0600 if its mode was widened. It must not be
    inside the output tree: that is the caller's configuration to enforce.
    """
    unique = list(dict.fromkeys(records))
    if not unique:
        return 0
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.fchmod(fd, 0o600)
        data = "".join(json.dumps(asdict(r), sort_keys=True) + "\n" for r in unique)
        os.write(fd, data.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(unique)
