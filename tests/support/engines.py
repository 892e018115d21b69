"""Deliberately broken facemask engines, to provoke the privacy audit's refusals."""

from __future__ import annotations

import numpy as np

from inference.geometry import Geometry


class CornerEngine:
    """Masks ~50 mL in a corner and leaves the face: a plausible-sized mask that misses."""

    name = "corner"

    def mask(self, hu: np.ndarray, geometry: Geometry) -> np.ndarray:
        m = np.zeros(hu.shape, bool)
        m[:40, :40, :40] = True
        return m


class TinyEngine(CornerEngine):
    """A 27-voxel mask: implausible, refused before de-identification."""

    name = "tiny"

    def mask(self, hu: np.ndarray, geometry: Geometry) -> np.ndarray:
        m = np.zeros(hu.shape, bool)
        m[:3, :3, :3] = True
        return m
