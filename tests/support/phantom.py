"""Phantoms for the tests, generated once per process per option set.

``cached_phantom(**options)`` returns a shared :class:`inference.phantom.Phantom`; treat its
arrays as read-only (copy before changing them). Small matrices keep the suite fast.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from inference.phantom import Phantom, PhantomOptions, generate_phantom


@functools.lru_cache(maxsize=8)
def _cached(items: tuple[tuple[str, Any], ...]) -> Phantom:
    phantom = generate_phantom(PhantomOptions(**dict(items)))
    for arr in (phantom.hu, phantom.facemask, phantom.intracranial):
        arr.flags.writeable = False
    return phantom


def cached_phantom(**options: Any) -> Phantom:
    """A read-only phantom for ``PhantomOptions(**options)``, shared within the process."""
    return _cached(tuple(sorted(options.items())))


def hu_at(phantom: Phantom, head_point: tuple[float, float, float]) -> float:
    """HU of the voxel nearest to a point given in head coordinates (anatomy.py)."""
    patient = phantom.head_to_patient @ np.asarray(head_point, float)
    idx = np.rint(phantom.geometry.patient_to_index(patient)).astype(int)
    if np.any(idx < 0) or np.any(idx >= np.array(phantom.hu.shape)):
        raise IndexError(f"head point {head_point} is outside the volume")
    return float(phantom.hu[tuple(idx)])
