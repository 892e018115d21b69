"""Fixtures for the series/write-back/pipeline tests: small volumes, real encoders, test engines.

Small on purpose (24 × 32 × 40): every property under test is about geometry and encoding,
not size. Compressed inputs are made by the real encoders: pydicom's (RLE, JPEG-LS, J2K) and
dcmtk's (JPEG lossless and lossy, which pydicom cannot encode).
"""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from inference.errors import FacemaskError
from inference.geometry import Geometry

SHAPE = (24, 32, 40)


def geometry(
    shape: tuple[int, int, int] = SHAPE,
    *,
    slice_mm: float = 2.0,
    pixel_mm: tuple[float, float] = (0.8, 0.9),
    tilt_deg: float = 0.0,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    origin: Sequence[float] = (-16.0, -14.0, 40.0),
) -> Geometry:
    """Axial-ish geometry; ``tilt_deg`` shears the slice step towards the column direction."""
    iop = np.asarray(orientation, float)
    normal = np.cross(iop[:3], iop[3:])
    step = normal * slice_mm + iop[3:] * slice_mm * np.tan(np.radians(tilt_deg))
    return Geometry.from_dicom(
        image_position=np.asarray(origin, float),
        image_orientation=iop,
        pixel_spacing=pixel_mm,
        slice_step=step,
        shape=shape,
    )


def random_hu(shape: tuple[int, int, int] = SHAPE, seed: int = 0) -> np.ndarray:
    """Integer HU in [-1000, 2000] as float32: exactly representable in 12-bit stored values."""
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 2001, size=shape).astype(np.float32)


def reload(ds: Dataset) -> Dataset:
    """Encode to bytes and read back, as a file on disk would be."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def save(datasets: Sequence[Dataset], directory: Path, names: Sequence[str] | None = None) -> Path:
    """Write datasets as files (names default to 0000.dcm, 0001.dcm, ...)."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, ds in enumerate(datasets):
        name = names[i] if names is not None else f"{i:04d}.dcm"
        ds.save_as(directory / name, enforce_file_format=True)
    return directory


def dcmtk(datasets: Sequence[Dataset], tmp: Path, tool: str, *options: str) -> list[Dataset]:
    """Run a dcmtk converter (dcmcjpeg, dcmcjpls, dcmcrle) on each dataset; read results back."""
    exe = shutil.which(tool)
    if exe is None:
        raise RuntimeError(f"{tool} (dcmtk) is required: apt-get install dcmtk")
    src = save(datasets, tmp / f"{tool}-in")
    dst = tmp / f"{tool}-out"
    dst.mkdir(exist_ok=True)
    out = []
    for f in sorted(src.iterdir()):
        subprocess.run([exe, *options, str(f), str(dst / f.name)], check=True, capture_output=True)
        out.append(pydicom.dcmread(dst / f.name))
    return out


def stored(ds: Dataset) -> np.ndarray:
    """Stored pixel values of ``ds`` (frames, rows, cols)."""
    return ds.pixel_array.reshape((-1, int(ds.Rows), int(ds.Columns)))


class BoxEngine:
    """Masks a fixed box (anterior rows, central columns): pipeline plumbing only."""

    name = "box"

    def __init__(self) -> None:
        self.calls = 0

    def mask(self, hu: np.ndarray, geometry: Geometry) -> np.ndarray:
        self.calls += 1
        m = np.zeros(hu.shape, dtype=bool)
        _k, r, c = hu.shape
        m[:, : r // 3, c // 4 : 3 * c // 4] = True
        return m


class NoFaceEngine:
    """Fails as a real engine does when it cannot find the face."""

    name = "noface"

    def mask(self, hu: np.ndarray, geometry: Geometry) -> np.ndarray:
        raise FacemaskError("no face found in the volume")
