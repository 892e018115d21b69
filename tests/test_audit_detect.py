"""The detector path on a real photograph (skimage's astronaut, Eileen Collins) and blanks."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import color, data, transform

from inference.audit.detect import (
    SAME_PERSON_DISTANCE,
    detect_faces,
    detect_faces_cnn,
    embedding_distance,
    face_descriptor,
    model_dir,
)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return (color.rgb2gray(data.astronaut()) * 255).astype(np.uint8)


def test_models_ship_in_the_installed_packages() -> None:
    folder = model_dir()
    assert (folder / "shape_predictor_5_face_landmarks.dat").stat().st_size > 1_000_000
    assert (folder / "dlib_face_recognition_resnet_model_v1.dat").stat().st_size > 1_000_000


def test_face_found_on_a_photograph(astronaut: np.ndarray) -> None:
    faces = detect_faces(astronaut, upsample=1)
    best = faces[0]
    assert best.score > 0.5
    left, top, right, bottom = best.box
    # Her face is around (220, 120) in the 512×512 picture.
    assert left < 220 < right and top < 120 < bottom
    assert faces == sorted(faces, key=lambda f: f.score, reverse=True)


@pytest.mark.parametrize("fill", [0, 128, 255])
def test_no_face_on_a_blank_image(fill: int) -> None:
    assert detect_faces(np.full((512, 512), fill, np.uint8), upsample=1) == []


def test_no_face_above_threshold_on_noise() -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (512, 512), dtype=np.uint8)
    assert all(f.score <= 0.0 for f in detect_faces(noise, upsample=0))


def test_embedding_same_person_close_blank_face_far(astronaut: np.ndarray) -> None:
    box = detect_faces(astronaut)[0].box
    ref = face_descriptor(astronaut, box)
    assert ref.shape == (128,)
    # The same face, mirrored and slightly rescaled: same person.
    other = (transform.rescale(astronaut[:, ::-1], 0.9) * 255).astype(np.uint8)
    box2 = detect_faces(other)[0].box
    assert embedding_distance(ref, face_descriptor(other, box2)) < SAME_PERSON_DISTANCE
    # Where her face was, a flat grey patch: not her.
    wiped = astronaut.copy()
    wiped[box[1] : box[3], box[0] : box[2]] = 128
    assert embedding_distance(ref, face_descriptor(wiped, box)) > SAME_PERSON_DISTANCE


def test_rejects_non_uint8_images() -> None:
    with pytest.raises(ValueError, match="uint8"):
        detect_faces(np.zeros((64, 64), np.float32))


def test_cnn_detector_finds_the_photographed_face_and_nothing_on_blank(
    astronaut: np.ndarray,
) -> None:
    # Her face is ~90 px: too small for MMOD (~80 px minimum) after the default 0.5 scale.
    assert detect_faces_cnn(astronaut) == []
    best = detect_faces_cnn(astronaut, scale=1.0)[0]
    assert best.score > 0.5 and best.subdetector == -1
    left, top, right, bottom = best.box
    assert left < 220 < right and top < 120 < bottom
    # Enlarged ×2 and detected at the default 0.5 scale: the box maps back to full size.
    big = np.repeat(np.repeat(astronaut, 2, axis=0), 2, axis=1)
    left, top, right, bottom = detect_faces_cnn(big)[0].box
    assert left < 440 < right and top < 240 < bottom
    assert detect_faces_cnn(np.full((512, 512), 128, np.uint8)) == []
