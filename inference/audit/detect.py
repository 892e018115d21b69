"""Face detection and identification with models that ship inside pip packages.

dlib's HOG frontal face detector is compiled into the ``dlib`` module (wheel ``dlib-bin``); the
5-point shape predictor and the ResNet face-embedding model are the ``.dat`` files carried by
``face_recognition_models``. Nothing is downloaded at run time. The models are loaded once per
process (they take ~0.5 s) and reused.

The embedding is dlib's 128-D face descriptor: two photographs of the same person are
closer than 0.6 (Euclidean) in ~99.4 % of LFW pairs, the threshold dlib documents.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import dlib
import numpy as np
from skimage import transform

from inference.errors import ModelError

#: dlib's documented same-person distance for its ResNet descriptor.
SAME_PERSON_DISTANCE = 0.6
_SHAPE5 = "shape_predictor_5_face_landmarks.dat"
_RESNET = "dlib_face_recognition_resnet_model_v1.dat"
_MMOD = "mmod_human_face_detector.dat"


@dataclass(frozen=True)
class Face:
    """One detection: dlib score (> 0 = a face at dlib's default threshold) and its box."""

    score: float
    box: tuple[int, int, int, int]  # left, top, right, bottom (px)
    subdetector: int  # dlib HOG: 0 front, 1 left, 2 right, 3/4 front rotated; CNN: -1


def model_dir() -> Path:
    """Folder of the dlib model files inside the installed ``face_recognition_models``.

    Found without importing the package: its ``__init__`` needs ``pkg_resources``, which
    recent setuptools no longer provide.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("package face_recognition_models is not installed")
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    for name in (_SHAPE5, _RESNET):
        if not (folder / name).is_file():
            raise ModelError(f"face_recognition_models lacks {name}")
    return folder


@lru_cache(maxsize=1)
def _hog() -> Any:
    return dlib.get_frontal_face_detector()


@lru_cache(maxsize=1)
def _shape5() -> Any:
    return dlib.shape_predictor(str(model_dir() / _SHAPE5))


@lru_cache(maxsize=1)
def _resnet() -> Any:
    return dlib.face_recognition_model_v1(str(model_dir() / _RESNET))


@lru_cache(maxsize=1)
def _mmod() -> Any:
    path = model_dir() / _MMOD
    if not path.is_file():
        raise ModelError(f"face_recognition_models lacks {_MMOD}")
    return dlib.cnn_face_detection_model_v1(str(path))


def _as_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError("image must be a uint8 (H, W) or (H, W, 3) array")
    return np.ascontiguousarray(image)


def detect_faces(image: np.ndarray, upsample: int = 1, report_above: float = -0.5) -> list[Face]:
    """HOG detections, best first. Scores down to ``report_above`` are returned so that the
    audit can show near misses; compare against the gate threshold (default 0)."""
    img = _as_uint8(image)
    rects, scores, kinds = _hog().run(img, int(upsample), float(report_above))
    faces = [
        Face(float(s), (r.left(), r.top(), r.right(), r.bottom()), int(k))
        for r, s, k in zip(rects, scores, kinds, strict=True)
    ]
    return sorted(faces, key=lambda f: f.score, reverse=True)


def detect_faces_cnn(image: np.ndarray, scale: float = 0.5) -> list[Face]:
    """dlib's CNN (MMOD) face detector, best first; an independent second opinion to HOG.

    It costs ~1.7 s of CPU on a 512 px image, so the image is scaled by ``scale`` first
    (0.5: ~0.4 s; the rendered faces stay above its ~80 px minimum). Scores are the
    detector's confidences (only detections above 0 are returned).
    """
    img = _as_uint8(image)
    if scale != 1.0:
        img = (transform.rescale(img, scale, anti_aliasing=True) * 255).astype(np.uint8)
    found = _mmod()(img, 0)
    faces = []
    for d in found:
        r = d.rect
        box = (r.left(), r.top(), r.right(), r.bottom())
        left, top, right, bottom = (round(v / scale) for v in box)
        faces.append(Face(float(d.confidence), (left, top, right, bottom), -1))
    return sorted(faces, key=lambda f: f.score, reverse=True)


def face_descriptor(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """128-D dlib ResNet embedding of the face in ``box`` (aligned with 5 landmarks)."""
    img = _as_uint8(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    rect = dlib.rectangle(*(int(v) for v in box))
    shape = _shape5()(img, rect)
    return np.asarray(_resnet().compute_face_descriptor(img, shape), dtype=np.float64)


def embedding_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance between two descriptors (< 0.6: dlib says same person)."""
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)))
