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
