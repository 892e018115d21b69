"""DIMSE status codes the gateway returns, in one place (PS3.4 Annex B.2.3, PS3.7 Annex C).

Handlers return members of :class:`Status`; no bare hex elsewhere. pynetdicom's own
catch-all for an exception escaping a handler (0xC211) is left for real bugs.
"""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    """C-STORE / C-ECHO response statuses used by the SCP."""

    SUCCESS = 0x0000
    #: Refused: the spool is below its free-space floor, the disk is full, or too many
    #: series are waiting (backpressure). The sender should retry later.
    OUT_OF_RESOURCES = 0xA700
    #: Error: the dataset lacks the UIDs the gateway files it under, or its SOP Class /
    #: Instance UID disagrees with the C-STORE request.
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: Error: the dataset could not be decoded with the negotiated transfer syntax.
    CANNOT_UNDERSTAND = 0xC000
