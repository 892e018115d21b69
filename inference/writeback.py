"""Put a modified HU volume back into copies of the series' original instances.

Only voxels whose HU changed are re-quantised (inverse rescale, rounded, clipped to the
stored range of BitsStored/PixelRepresentation); every other stored value — including
PixelPaddingValue voxels — is copied from the original, so a round trip without a mask is
bit-exact by construction. Every other element of each instance is preserved.

Transfer syntax of the output (PS3.5 §8, §A.4):

======================================================  ======================================
input                                                   output
======================================================  ======================================
RLE Lossless, JPEG-LS Lossless, JPEG 2000 Lossless-only  same syntax (re-encoded by pydicom)
uncompressed (implicit/explicit VR, big endian, deflate) Explicit VR Little Endian
JPEG Lossless (process 14, SV1), HTJ2K lossless          Explicit VR Little Endian (no encoder)
lossy: JPEG baseline/extended, JPEG-LS near-lossless,    Explicit VR Little Endian, with
JPEG 2000 (.91) unless LossyImageCompression is "00"     LossyImageCompression kept at "01"
======================================================  ======================================
"""

from __future__ import annotations

import copy

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from inference.dicomgen import hu_to_stored
from inference.series import SeriesVolume, is_lossy, stored_frames

#: Lossless syntaxes pydicom can encode (RLE natively; JPEG-LS via pyjpegls; J2K via openjpeg).
REENCODABLE = frozenset({RLELossless, JPEGLSLossless, JPEG2000Lossless})
_NATIVE = frozenset({ExplicitVRLittleEndian, UID("1.2.840.10008.1.2")})
_LOSSY_METHOD = {
    JPEGBaseline8Bit: "ISO_10918_1",
    JPEGExtended12Bit: "ISO_10918_1",
    JPEGLSNearLossless: "ISO_14495_1",
    JPEG2000: "ISO_15444_1",
}


def output_syntax(ds: Dataset) -> UID:
    """Transfer syntax the written-back copy of ``ds`` will use (see the module table)."""
    ts = _syntax(ds)
    if ts in REENCODABLE and not is_lossy(ds):
        return ts
    return ExplicitVRLittleEndian


def write_back(series: SeriesVolume, new_hu: np.ndarray) -> list[Dataset]:
    """Copies of ``series.datasets`` carrying ``new_hu``, in the same order.

    ``new_hu`` must have the shape of ``series.hu``; voxels equal to ``series.hu`` keep
    their original stored value.
    """
    if new_hu.shape != series.hu.shape:
        raise ValueError(f"volume shape {new_hu.shape} != series shape {series.hu.shape}")
    changed = new_hu != series.hu
    slices_of: dict[int, list[int]] = {}
    for k, ref in enumerate(series.slices):
        slices_of.setdefault(ref.dataset, []).append(k)
    out: list[Dataset] = []
    for d, ds in enumerate(series.datasets):
        ks = [k for k in slices_of.get(d, []) if changed[k].any()]
        target = output_syntax(ds)
        result = copy.deepcopy(ds)
        if not ks and _syntax(ds) == target:
            out.append(result)  # untouched and already in its output syntax: bytes as they are
            continue
        if not ks and _syntax(ds) in _NATIVE:
            result.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # implicit → explicit
            out.append(result)
            continue
        stored = stored_frames(ds).copy()
        bits, signed = int(ds.BitsStored), int(ds.PixelRepresentation)
        for k in ks:
            ref = series.slices[k]
            m = changed[k]
            frame = stored[ref.frame or 0]
            frame[m] = hu_to_stored(new_hu[k][m], ref.slope, ref.intercept, bits, signed)
        _set_pixels(result, stored, target, lossy=is_lossy(ds), source=_syntax(ds))
        out.append(result)
    return out


def _syntax(ds: Dataset) -> UID:
    return UID(ds.file_meta.TransferSyntaxUID)


def _set_pixels(ds: Dataset, stored: np.ndarray, target: UID, *, lossy: bool, source: UID) -> None:
    """Replace the pixel data of ``ds`` with ``stored`` (frames, rows, cols) in ``target``."""
    arr = stored if "NumberOfFrames" in ds else stored[0]
    if target != ExplicitVRLittleEndian:
        ds.compress(target, arr, generate_instance_uid=False)
        return
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
    ds["PixelData"].VR = "OW"
    ds["PixelData"].is_undefined_length = False
    if lossy:
        # PS3.3 C.7.6.1.1.5: once lossy, always flagged, even when stored uncompressed.
        ds.LossyImageCompression = "01"
        if "LossyImageCompressionMethod" not in ds and source in _LOSSY_METHOD:
            ds.LossyImageCompressionMethod = _LOSSY_METHOD[source]
