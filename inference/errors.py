"""Domain exceptions of the imaging core.

Each class has one meaning for the gateway (STYLE §11): the outcome depends on the type,
never on the message. Messages name the problem but never carry PHI (no names, IDs, dates;
UIDs only where the caller already treats them as spool ids).
"""

from __future__ import annotations


class DefacegateError(Exception):
    """Base class of every expected failure of the core."""


class SeriesError(DefacegateError):
    """The input cannot become one valid CT volume: reject it / quarantine the series."""


class UnreadableFileError(SeriesError):
    """A file is not a readable DICOM instance."""


class NotCTError(SeriesError):
    """The series is not a CT image series (modality or SOP class)."""


class GeometryError(SeriesError):
    """Slices do not form a consistent volume (orientation, matrix, duplicates, gaps, count)."""


class FacemaskError(DefacegateError):
    """The facemask engine could not find the face reliably: fail closed, quarantine."""


class ModelError(DefacegateError):
    """A trained model folder is missing or invalid."""


class AuditError(FacemaskError):
    """The privacy audit refused the defaced series (fail closed: quarantine, not forward).

    ``reasons`` are the gate's sentences (no PHI); ``outcome`` is the audit result the
    caller attaches to the quarantined series (report and renders).
    """

    def __init__(self, reasons: tuple[str, ...], outcome: object = None) -> None:
        super().__init__("; ".join(reasons) or "privacy audit failed")
        self.reasons = reasons
        self.outcome = outcome


class ImplausibleMaskError(AuditError):
    """The facemask is implausible (too small, reaching into the skull): nothing to release."""


class FaceStillVisibleError(AuditError):
    """A face is still detected after the strongest configured defacing."""
