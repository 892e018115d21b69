"""Skin renders in patient coordinates: rotated/tilted acquisitions render the same head."""

from __future__ import annotations

import numpy as np
import pytest

from inference.audit.detect import detect_faces
from inference.audit.render import head_frame, render_skin, render_views
from inference.geometry import Geometry
from tests.support.audit import affine_for, analytic_head
from tests.support.phantom import cached_phantom

SIZE = 256


@pytest.fixture(scope="module")
def upright() -> tuple[np.ndarray, Geometry]:
    return analytic_head()


def _nose_column(depth: np.ndarray) -> float:
    """Image column of the point nearest the camera (the nose tip)."""
    return float(np.unravel_index(np.nanargmin(depth), depth.shape)[1])


def _silhouette_centre(image: np.ndarray) -> tuple[float, float]:
    rows, cols = np.nonzero(image)
    return float(rows.mean()), float(cols.mean())


def test_front_render_is_a_centred_upright_head(upright: tuple[np.ndarray, Geometry]) -> None:
    hu, g = upright
    (view,) = render_views(hu, g, (0.0,), size=SIZE)
    img = view.image
    assert img.shape == (SIZE, SIZE) and img.dtype == np.uint8
    assert img[0, 0] == img[-1, -1] == 0  # background
    assert 0.3 < np.count_nonzero(img) / img.size < 0.9
    r, c = _silhouette_centre(img)
    assert abs(r - SIZE / 2) < SIZE * 0.15 and abs(c - SIZE / 2) < SIZE * 0.1
    # The nose is in the middle, below the centre of the silhouette (the head is taller
    # above it): superior is at the top of the image.
    tip = np.unravel_index(np.nanargmin(view.depth_mm), img.shape)
    assert abs(tip[1] - c) < 6
    assert view.depth_mm[tip] < np.nanmedian(view.depth_mm) - 10  # nearer than the cheeks


def test_yaw_moves_the_camera_towards_the_patients_left(
    upright: tuple[np.ndarray, Geometry],
) -> None:
    hu, g = upright
    left_cam, front, right_cam = render_views(hu, g, (30.0, 0.0, -30.0), size=SIZE)
    centre = _silhouette_centre(front.image)[1]
    # Seen from the patient's left-front, the nose points to the image left.
    assert _nose_column(left_cam.depth_mm) < centre - 15
    assert _nose_column(right_cam.depth_mm) > centre + 15


@pytest.mark.parametrize(
    ("spacing", "rotation", "tilt"),
    [
        ((1.7, 1.9, 1.9), (10.0, -15.0, 25.0), 0.0),  # oblique acquisition
        ((1.8, 2.0, 2.0), (0.0, 0.0, 0.0), 20.0),  # gantry tilt
        ((2.0, 2.0, 2.0), (0.0, 0.0, 180.0), 0.0),  # voxel axes reversed (feet first-like)
    ],
)
def test_same_head_in_another_voxel_grid_renders_the_same(
    upright: tuple[np.ndarray, Geometry],
    spacing: tuple[float, float, float],
    rotation: tuple[float, float, float],
    tilt: float,
) -> None:
    hu, g = upright
    shape = (130, 135, 120)
    hu2, g2 = analytic_head(shape, affine_for(shape, spacing, rotation, tilt))
    ref = render_views(hu, g, (-30.0, 0.0, 30.0), size=SIZE)
    other = render_views(hu2, g2, (-30.0, 0.0, 30.0), size=SIZE)
    for a, b in zip(ref, other, strict=True):
        assert np.mean(np.abs(a.image.astype(int) - b.image.astype(int))) < 12
        assert abs(_nose_column(a.depth_mm) - _nose_column(b.depth_mm)) <= 3


def test_air_renders_blank_and_shapes_are_checked() -> None:
    g = Geometry(affine=np.diag([2.0, 2.0, 2.0, 1.0]), shape=(20, 20, 20))
    img = render_skin(np.full(g.shape, -1000, np.int16), g, size=64)
    assert img.shape == (64, 64) and not img.any()
    with pytest.raises(ValueError, match="does not match"):
        render_skin(np.zeros((5, 5, 5), np.int16), g)


@pytest.mark.parametrize(
    "pose", [{"yaw": 15.0, "pitch": -10.0, "tilt": 20.0}, {"roll": 12.0, "yaw": -15.0}]
)
def test_rotated_phantom_heads_render_and_show_a_centred_face(pose: dict[str, float]) -> None:
    ph = cached_phantom(matrix=128, slice_thickness=2.0, fov="head", **pose)
    views = render_views(ph.hu, ph.geometry, (-30.0, 0.0, 30.0), size=512)
    for v in views:
        assert np.count_nonzero(v.image) / v.image.size > 0.2
    best = max((f for v in views for f in detect_faces(v.image)), key=lambda f: f.score)
    assert best.score > 1.0
    cx, cy = (best.box[0] + best.box[2]) / 2, (best.box[1] + best.box[3]) / 2
    assert 512 / 4 < cx < 3 * 512 / 4 and 512 / 4 < cy < 3 * 512 / 4


def test_head_frame_excludes_the_table_and_pins_the_framing() -> None:
    ph = cached_phantom(matrix=128, slice_thickness=2.0, fov="head", head_holder=True)
    frame = head_frame(ph.hu, ph.geometry)
    assert len(frame) > 100
    a = render_views(ph.hu, ph.geometry, (0.0,), size=SIZE, frame_from=frame)[0]
    b = render_views(ph.hu, ph.geometry, (0.0,), size=SIZE)[0]
    assert np.array_equal(a.image, b.image)
    # The head holder lies behind the head: it does not widen the field of view.
    plain = cached_phantom(matrix=128, slice_thickness=2.0, fov="head")
    c = render_views(plain.hu, plain.geometry, (0.0,), size=SIZE)[0]
    assert abs(a.pixel_mm - c.pixel_mm) < 0.05 * c.pixel_mm
