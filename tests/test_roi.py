"""ROI planning for the nnU-Net engine: crops that cover the face guide in fewer tiles."""

from __future__ import annotations

import numpy as np
import pytest

from inference.engines.roi import Region, box_mask, escaping_sides, grow, plan_crops
from inference.errors import FacemaskError

PATCH = (16, 16, 16)


def tiles(shape: tuple[int, int, int]) -> int:
    """nnU-Net's sliding window at step 0.5 with a 16³ patch, on our own voxel grid."""
    n = 1
    for size, patch in zip(shape, PATCH, strict=True):
        n *= 1 if size <= patch else int(np.ceil((size - patch) / (patch / 2))) + 1
    return n


def total(crops: list[Region]) -> int:
    return sum(
        tiles((r[0].stop - r[0].start, r[1].stop - r[1].start, r[2].stop - r[2].start))
        for r in crops
    )


def shell() -> np.ndarray:
    """A face-like guide: the front half of a thick spherical shell, 4 voxels thick."""
    k, r, c = np.indices((80, 96, 96))
    d = np.sqrt((k - 40) ** 2 + (r - 60) ** 2 + (c - 48) ** 2)
    return (d >= 36) & (d < 40) & (r < 60)


def cores(crops: list[Region], pad: int, shape: tuple[int, ...]) -> np.ndarray:
    """Voxels with ``pad`` voxels of context around them inside one crop (or the border)."""
    out = np.zeros(shape, bool)
    for r in crops:
        core = tuple(
            slice(s.start + (pad if s.start > 0 else 0), s.stop - (pad if s.stop < n else 0))
            for s, n in zip(r, shape, strict=True)
        )
        out[core] = True
    return out


def test_one_crop_is_the_bounding_box_plus_margin_in_mm() -> None:
    guide = np.zeros((30, 40, 50), bool)
    guide[10:12, 5:20, 30:49] = True
    crops = plan_crops(guide, np.array([2.0, 0.5, 1.0]), 3.0, tiles, max_crops=1)
    assert crops == [(slice(8, 14), slice(0, 26), slice(27, 50))]  # 2, 6, 3 voxels; clipped


def test_a_shell_is_covered_by_several_crops_in_fewer_tiles_with_its_margin() -> None:
    guide = shell()
    spacing = np.ones(3)
    one = plan_crops(guide, spacing, 4.0, tiles, max_crops=1)
    many = plan_crops(guide, spacing, 4.0, tiles, max_crops=16)
    assert 1 < len(many) <= 16
    assert total(many) < 0.8 * total(one)
    # every guide voxel sits inside one crop with the whole 4-voxel margin around it
    assert cores(many, 4, guide.shape)[guide].all()
    capped = plan_crops(guide, spacing, 4.0, tiles, max_crops=3)
    assert len(capped) <= 3 and total(many) <= total(capped) <= total(one)
    assert cores(capped, 4, guide.shape)[guide].all()


def test_a_box_that_fits_its_tiles_is_not_cut() -> None:
    guide = box_mask((64, 64, 64), (slice(10, 26), slice(20, 36), slice(5, 21)))  # one 16³ tile
    assert plan_crops(guide, np.ones(3), 0.0, tiles) == [
        (slice(10, 26), slice(20, 36), slice(5, 21))
    ]


def test_bad_guides_fail_clearly() -> None:
    with pytest.raises(FacemaskError, match="empty"):
        plan_crops(np.zeros((8, 8, 8), bool), np.ones(3), 2.0, tiles)
    with pytest.raises(ValueError, match="max_crops"):
        plan_crops(np.ones((8, 8, 8), bool), np.ones(3), 2.0, tiles, max_crops=0)


def test_the_face_escapes_only_through_sides_no_other_crop_covers() -> None:
    shape = (10, 10, 20)
    left = (slice(2, 8), slice(2, 8), slice(0, 10))
    right = (slice(2, 8), slice(2, 8), slice(10, 15))
    face = np.zeros(shape, bool)
    face[4, 4, 5:14] = True  # crosses from left into right: not an escape
    assert escaping_sides(face, [left, right]) == []
    face[4, 4, 14] = True  # on right's far side, with volume beyond it
    face[4, 4, 15] = True  # (outside the crops: not seen by them anyway)
    assert escaping_sides(face, [left, right]) == [(1, 2, 1)]
    face[:] = False
    face[4, 4, 0] = True  # on left's near side, which is the volume border
    face[2, 4, 3] = True  # on left's low side along axis 0
    assert escaping_sides(face, [left, right]) == [(0, 0, -1)]


def test_grow_moves_the_named_sides_within_the_volume() -> None:
    region = (slice(2, 8), slice(2, 8), slice(0, 10))
    grown = grow(region, [(0, -1), (2, 1)], np.array([5.0, 1.0, 2.5]), (10, 10, 12))
    assert grown == (slice(0, 8), slice(2, 8), slice(0, 12))
