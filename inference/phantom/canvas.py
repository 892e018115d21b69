"""The head-coordinate grid the analytic anatomy is painted on before resampling.

Head coordinates are LPS-oriented millimetres of an upright, facing-anterior head: +x left,
+y posterior, +z superior, origin between the ear canals at the Frankfurt plane. Arrays are
indexed ``[z, y, x]``. Shapes are evaluated only inside their bounding boxes, through open
(broadcasting) coordinate grids, so each costs one pass over its own box.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

BBox = tuple[tuple[float, float], tuple[float, float], tuple[float, float]]  # (x, y, z) ranges
SdfFn = Callable[..., np.ndarray]  # f(x, y, z) on open grids → signed distance

# Label bits of the canvas.
INTRACRANIAL = 1
BONE = 2
FOREIGN = 4  # eye shield, tube: not anatomy


@dataclass
class Canvas:
    """A float32 HU grid plus uint8 label bits over a box in head coordinates."""

    lo: np.ndarray  # (x, y, z) of voxel [0, 0, 0], mm
    res: float
    shape: tuple[int, int, int]  # (nz, ny, nx)
    hu: np.ndarray = field(init=False)
    labels: np.ndarray = field(init=False)
    #: Signed distance to the skin envelope (negative inside), filled by the anatomy.
    skin: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.hu = np.full(self.shape, -1000.0, dtype=np.float32)
        self.labels = np.zeros(self.shape, dtype=np.uint8)
        self.skin = np.full(self.shape, 1e3, dtype=np.float32)

    @classmethod
    def covering(cls, lo: np.ndarray, hi: np.ndarray, res: float) -> Canvas:
        n = np.maximum(np.ceil((np.asarray(hi) - np.asarray(lo)) / res).astype(int) + 1, 1)
        return cls(lo=np.asarray(lo, dtype=float), res=res, shape=(int(n[2]), int(n[1]), int(n[0])))

    def window(
        self, bbox: BBox
    ) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray, np.ndarray] | None:
        """Index window and open coordinate grids (z, y, x broadcastable) of a mm box."""
        sl = []
        coords = []
        for axis, (a, b) in zip((2, 1, 0), (bbox[2], bbox[1], bbox[0]), strict=True):
            i0 = max(int(np.floor((a - self.lo[axis]) / self.res)), 0)
            i1 = min(int(np.ceil((b - self.lo[axis]) / self.res)) + 1, self.shape[2 - axis])
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
            coords.append(self.lo[axis] + self.res * np.arange(i0, i1, dtype=np.float32))
        z = coords[0].reshape(-1, 1, 1)
        y = coords[1].reshape(1, -1, 1)
        x = coords[2].reshape(1, 1, -1)
        return (sl[0], sl[1], sl[2]), x, y, z

    def coverage(self, d: np.ndarray) -> np.ndarray:
        """Partial-volume fraction of a shape from its signed distance (anti-aliasing)."""
        return np.clip(0.5 - d / self.res, 0.0, 1.0)

    def paint(
        self,
        sdf: SdfFn,
        bbox: BBox,
        value: float | Callable[..., np.ndarray],
        *,
        set_bits: int = 0,
        clear_bits: int = 0,
        inside_skin: float | None = 1.5,
        only_bits: int = 0,
    ) -> None:
        """Paint ``value`` (HU, or f(d, x, y, z)) where ``sdf`` < 0, anti-aliased.

        ``inside_skin``: only where at least that deep under the skin (None: anywhere), so
        internal organs never poke through the surface. ``only_bits``: only over voxels that
        carry one of these label bits.
        """
        w = self.window(bbox)
        if w is None:
            return
        sl, x, y, z = w
        d = np.broadcast_to(sdf(x, y, z), self.hu[sl].shape)
        v = value(d, x, y, z) if callable(value) else np.float32(value)
        self.paint_at(
            sl,
            d,
            v,
            set_bits=set_bits,
            clear_bits=clear_bits,
            inside_skin=inside_skin,
            only_bits=only_bits,
        )

    def paint_at(
        self,
        sl: tuple[slice, slice, slice],
        d: np.ndarray,
        v: np.ndarray | np.float32,
        *,
        set_bits: int = 0,
        clear_bits: int = 0,
        inside_skin: float | None = 1.5,
        only_bits: int = 0,
    ) -> None:
        """:meth:`paint` with a signed distance already evaluated over window ``sl``."""
        f = self.coverage(d)
        if inside_skin is not None:
            f = f * np.clip(-self.skin[sl] - inside_skin, 0.0, 1.0)
        if only_bits:
            f = f * ((self.labels[sl] & only_bits) != 0)
        region = self.hu[sl]
        region += f * (v - region)
        if set_bits or clear_bits:
            hit = f >= 0.5
            lab = self.labels[sl]
            if set_bits:
                lab[hit] |= np.uint8(set_bits)
            if clear_bits:
                lab[hit] &= np.uint8(~clear_bits & 0xFF)

    def blend_skin(self, sdf: SdfFn, bbox: BBox, k: float, mode: str = "union") -> None:
        """Smoothly add (``union``) or carve (``subtract``) a part of the skin envelope.

        ``bbox`` bounds the part itself; it is widened by the blend radius ``k`` so that the
        blend fades out inside the window (no seam at its edge).
        """
        from inference.phantom import sdf as S

        pad = k + 2.0 * self.res
        w = self.window(tuple((a - pad, b + pad) for a, b in bbox))  # type: ignore[arg-type]
        if w is None:
            return
        sl, x, y, z = w
        d = np.broadcast_to(sdf(x, y, z), self.skin[sl].shape).astype(np.float32)
        cur = self.skin[sl]
        if mode == "union":
            self.skin[sl] = S.smin(cur, d, k)
        elif mode == "subtract":
            self.skin[sl] = S.ssub(cur, d, k)
        else:
            raise ValueError(mode)
