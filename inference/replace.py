"""Replace facemask voxels with a fill value (CTA-DEFACE: mask voxels become air)."""

from __future__ import annotations

import numpy as np

AIR_HU = -1000.0


def fill_value(hu: np.ndarray, fill: str | float) -> float:
    """Resolve a fill spec: ``'air'`` (−1000 HU), ``'p10'`` (10th percentile of the
    volume, CTA-DEFACE's choice) or a number of HU."""
    if isinstance(fill, str):
        if fill == "air":
            return AIR_HU
        if fill == "p10":
            # Subsample: the percentile of 80 M voxels does not need all of them.
            flat = hu.reshape(-1)
            step = max(1, flat.size // 2_000_000)
            return float(np.percentile(flat[::step], 10))
        return float(fill)
    return float(fill)


def replace_masked(hu: np.ndarray, mask: np.ndarray, fill: str | float = "air") -> np.ndarray:
    """Return a copy of ``hu`` with ``mask`` voxels set to the fill value."""
    if mask.shape != hu.shape:
        raise ValueError(f"mask shape {mask.shape} != volume shape {hu.shape}")
    if mask.dtype != np.bool_:
        raise TypeError("mask must be a boolean array")
    out = hu.copy()
    out[mask] = fill_value(hu, fill)
    return out
