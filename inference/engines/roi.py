"""Where the nnU-Net engine runs its network: boxes that cover the face in the fewest tiles.

On a CPU, nnU-Net's sliding window costs one network pass per tile, and the passes are
nearly the whole bill. The face is a curved shell (forehead, orbits, nose, cheeks, chin)
about 30 mm thick, so its bounding box is mostly brain, sinus and air. ``plan_crops`` covers
a face guide (e.g. the anatomical engine's facemask) with a few boxes instead of one,
cutting a box in two wherever the two halves, each with its margin, need fewer tiles than
the whole. Every guide voxel stays inside some box with ``margin_mm`` of context around it.

Pure functions: masks and slices in, boxes out; the tile count is the caller's (the engine
knows its patch, spacing and step).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from inference.errors import FacemaskError
from inference.geometry import mask_extent

Region = tuple[slice, slice, slice]
#: Sliding-window tiles a crop of this shape (voxels of ours) costs.
TileCost = Callable[[tuple[int, int, int]], int]
#: (crop index, axis, -1 | +1): a side of a crop the face leaves the covered volume through.
Side = tuple[int, int, int]


@dataclass(frozen=True)
class _Node:
    """A box of the cell grid (tight around its guide cells) and its cheapest cut."""

    lo: np.ndarray
    hi: np.ndarray
    tiles: int
    cut_tiles: int  # tiles of the two halves of the best cut (== tiles when none helps)
    halves: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None


def plan_crops(
    guide: np.ndarray,
    spacing: np.ndarray,
    margin_mm: float,
    tiles: TileCost,
    *,
    max_crops: int = 16,
    cell_mm: float = 1.0,
) -> list[Region]:
    """Boxes (with ``margin_mm`` per side, clipped to the volume) that hold every voxel of
    ``guide`` with that margin around it inside one box, in no more ``tiles`` than one box.

    Greedy guillotine cuts on a ``cell_mm`` grid: each box is cut where its two halves'
    tiles sum lowest, if that is below the box's own; the biggest saving is taken first,
    up to ``max_crops`` boxes (1 = the plain bounding box). Raises FacemaskError for an
    empty guide.
    """
    if max_crops < 1:
        raise ValueError("max_crops must be >= 1")
    extent = mask_extent(guide)
    if extent is None:
        raise FacemaskError("the face guide is empty")
    first, stop = extent
    spacing = np.asarray(spacing, float)
    shape = np.asarray(guide.shape)
    per_cell = np.maximum(1, np.round(cell_mm / spacing)).astype(int)
    pad = np.ceil(margin_mm / spacing).astype(int)
    cells = _pool(guide[tuple(slice(a, b) for a, b in zip(first, stop, strict=True))], per_cell)

    def box(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Voxel box of cells [lo, hi) with the margin, clipped to the volume."""
        a = np.maximum(first + lo * per_cell - pad, 0)
        b = np.minimum(np.minimum(first + hi * per_cell, stop) + pad, shape)
        return a, b

    def cost(lo: np.ndarray, hi: np.ndarray) -> int:
        a, b = box(lo, hi)
        size = (b - a).tolist()
        return int(tiles((size[0], size[1], size[2])))

    def node(lo: np.ndarray, hi: np.ndarray) -> _Node:
        own = cost(lo, hi)
        best, halves = own, None
        sub = cells[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
        for left, right in _cuts(sub):
            split = cost(lo + left[0], lo + left[1]) + cost(lo + right[0], lo + right[1])
            if split < best:
                best = split
                halves = ((lo + left[0], lo + left[1]), (lo + right[0], lo + right[1]))
        return _Node(lo, hi, own, best, halves)

    c_first, c_stop = mask_extent(cells)  # type: ignore[misc]  # guide is not empty
    heap: list[tuple[int, int, _Node]] = []
    done: list[_Node] = []
    order = 0

    def push(n: _Node) -> None:
        nonlocal order
        if n.halves is None:
            done.append(n)
        else:
            heapq.heappush(heap, (n.cut_tiles - n.tiles, order, n))
            order += 1

    push(node(c_first, c_stop))
    while heap and len(done) + len(heap) < max_crops:
        _, _, n = heapq.heappop(heap)
        assert n.halves is not None
        for lo, hi in n.halves:
            push(node(lo, hi))
    crops = []
    for n in done + [n for _, _, n in heap]:
        a, b = box(n.lo, n.hi)
        crops.append(
            (slice(int(a[0]), int(b[0])), slice(int(a[1]), int(b[1])), slice(int(a[2]), int(b[2])))
        )
    return crops


def _pool(mask: np.ndarray, per_cell: np.ndarray) -> np.ndarray:
    """Cells of ``per_cell`` voxels: True where any voxel is (the last cells may be partial)."""
    n = -(-np.asarray(mask.shape) // per_cell)
    padded = np.zeros(tuple(n * per_cell), bool)
    padded[tuple(slice(0, s) for s in mask.shape)] = mask
    blocks = padded.reshape(n[0], per_cell[0], n[1], per_cell[1], n[2], per_cell[2])
    return np.asarray(blocks.any(axis=(1, 3, 5)))


def _cuts(
    sub: np.ndarray,
) -> list[tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]]:
    """Every cut of ``sub`` (tight around its True cells) into two non-empty parts, as the
    tight [lo, hi) boxes of the two parts, from prefix/suffix extents along each axis."""
    out = []
    for axis in range(3):
        n = sub.shape[axis]
        if n < 2:
            continue
        # per index along the axis: first and last True index along every axis (−1: none)
        lo_rows = np.full((n, 3), np.iinfo(np.int64).max, np.int64)
        hi_rows = np.full((n, 3), -1, np.int64)
        idx = np.arange(n)
        occupied = sub.any(axis=tuple(a for a in range(3) if a != axis))
        lo_rows[occupied, axis] = idx[occupied]
        hi_rows[occupied, axis] = idx[occupied]
        for other in range(3):
            if other == axis:
                continue
            rest = 3 - axis - other
            proj = np.moveaxis(np.asarray(sub.any(axis=rest)), 0 if axis < other else 1, 0)
            has = proj.any(axis=1)
            lo_rows[has, other] = proj[has].argmax(axis=1)
            hi_rows[has, other] = proj.shape[1] - 1 - proj[has, ::-1].argmax(axis=1)
        pre_lo = np.minimum.accumulate(lo_rows, axis=0)
        pre_hi = np.maximum.accumulate(hi_rows, axis=0)
        suf_lo = np.minimum.accumulate(lo_rows[::-1], axis=0)[::-1]
        suf_hi = np.maximum.accumulate(hi_rows[::-1], axis=0)[::-1]
        for k in range(1, n):
            if pre_hi[k - 1, axis] < 0 or suf_hi[k, axis] < 0:
                continue  # one side would be empty
            out.append(((pre_lo[k - 1], pre_hi[k - 1] + 1), (suf_lo[k], suf_hi[k] + 1)))
    return out


def escaping_sides(face: np.ndarray, crops: Sequence[Region]) -> list[Side]:
    """Sides of the crops through which the predicted ``face`` leaves the volume the crops
    cover (a side at the volume border or against another crop is no way out)."""
    covered = union(face.shape, crops)
    out = []
    for i, r in enumerate(crops):
        for axis, sl in enumerate(r):
            start, stop, _ = sl.indices(face.shape[axis])
            for side, index, beyond in ((-1, start, start - 1), (1, stop - 1, stop)):
                if not 0 <= beyond < face.shape[axis]:
                    continue
                edge = tuple(index if a == axis else r[a] for a in range(3))
                outside = tuple(beyond if a == axis else r[a] for a in range(3))
                if (face[edge] & ~covered[outside]).any():
                    out.append((i, axis, side))
    return out


def grow(
    region: Region, sides: Sequence[tuple[int, int]], by: np.ndarray, shape: tuple[int, ...]
) -> Region:
    """``region`` with each (axis, side) moved out by ``by[axis]`` voxels, within the volume."""
    out = [sl.indices(shape[a])[:2] for a, sl in enumerate(region)]
    for axis, side in sides:
        start, stop = out[axis]
        step = max(1, int(np.ceil(by[axis])))
        out[axis] = (
            (max(0, start - step), stop) if side < 0 else (start, min(shape[axis], stop + step))
        )
    return slice(*out[0]), slice(*out[1]), slice(*out[2])


def box_mask(shape: tuple[int, ...], region: Region) -> np.ndarray:
    """A guide that is just a box (the landmark fallback, tests)."""
    return union(shape, [region])


def union(shape: tuple[int, ...], crops: Sequence[Region]) -> np.ndarray:
    """The voxels the crops cover."""
    out = np.zeros(shape, bool)
    for r in crops:
        out[r] = True
    return out
