"""Signed-distance primitives and smooth blends for the phantom (negative inside, mm).

Coordinates are float32 arrays that broadcast against each other (open grids from
:class:`inference.phantom.canvas.Canvas`), so a primitive costs one pass over its bounding box.
Smooth unions (polynomial smooth-min, Quilez) keep the skin free of creases and staircases,
which matters for the face detectors of the privacy audit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Vec = Sequence[float]
Arr = np.ndarray


def ellipsoid(x: Arr, y: Arr, z: Arr, c: Vec, r: Vec) -> Arr:
    """Approximate distance to an axis-aligned ellipsoid (exact for spheres)."""
    px, py, pz = (x - c[0]) / r[0], (y - c[1]) / r[1], (z - c[2]) / r[2]
    k0 = np.sqrt(px * px + py * py + pz * pz)
    qx, qy, qz = px / r[0], py / r[1], pz / r[2]
    k1 = np.sqrt(qx * qx + qy * qy + qz * qz)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def sphere(x: Arr, y: Arr, z: Arr, c: Vec, r: float) -> Arr:
    return np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) - r


def capsule(x: Arr, y: Arr, z: Arr, a: Vec, b: Vec, ra: float, rb: float | None = None) -> Arr:
    """Segment a→b with a radius varying linearly from ``ra`` to ``rb`` (a tapered capsule)."""
    rb = ra if rb is None else rb
    ab = np.subtract(b, a, dtype=float)
    L2 = float(ab @ ab)
    px, py, pz = x - a[0], y - a[1], z - a[2]
    t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / L2, 0.0, 1.0)
    dx, dy, dz = px - t * ab[0], py - t * ab[1], pz - t * ab[2]
    return np.sqrt(dx * dx + dy * dy + dz * dz) - (ra + (rb - ra) * t)


def polyline(x: Arr, y: Arr, z: Arr, pts: Sequence[Vec], radii: Sequence[float]) -> Arr:
    """Union of tapered capsules along a polyline (vessels, airway, tube)."""
    d = capsule(x, y, z, pts[0], pts[1], radii[0], radii[1])
    for i in range(1, len(pts) - 1):
        d = np.minimum(d, capsule(x, y, z, pts[i], pts[i + 1], radii[i], radii[i + 1]))
    return d


def box(x: Arr, y: Arr, z: Arr, c: Vec, h: Vec, round_: float = 0.0) -> Arr:
    """Axis-aligned box with half sizes ``h`` and rounded edges."""
    qx = np.abs(x - c[0]) - (h[0] - round_)
    qy = np.abs(y - c[1]) - (h[1] - round_)
    qz = np.abs(z - c[2]) - (h[2] - round_)
    outside = np.sqrt(
        np.maximum(qx, 0.0) ** 2 + np.maximum(qy, 0.0) ** 2 + np.maximum(qz, 0.0) ** 2
    )
    inside = np.minimum(np.maximum(qx, np.maximum(qy, qz)), 0.0)
    return outside + inside - round_


def smin(a: Arr, b: Arr, k: float) -> Arr:
    """Smooth union with blend radius ``k`` mm."""
    if k <= 0:
        return np.minimum(a, b)
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def smax(a: Arr, b: Arr, k: float) -> Arr:
    """Smooth intersection with blend radius ``k`` mm."""
    return -smin(-a, -b, k)


def ssub(a: Arr, b: Arr, k: float) -> Arr:
    """Smooth subtraction: ``a`` minus ``b``."""
    return smax(a, -b, k)
