"""Facemask engines: ``mask(hu, geometry) -> bool ndarray`` of voxels that identify the face.

An engine is loaded once per process (nnU-Net's "load once, predict many") and then called
for many volumes. Engines are pure: data in, data out; no disk, network or clock.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from inference.geometry import Geometry


@runtime_checkable
class FacemaskEngine(Protocol):
    """What the pipeline needs of an engine."""

    name: str

    def mask(self, hu: np.ndarray, geometry: Geometry) -> np.ndarray:
        """Boolean array of ``hu.shape``; True where voxels are replaced by the fill value.

        Raises :class:`inference.errors.FacemaskError` when the face cannot be found.
        """
        ...
