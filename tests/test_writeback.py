"""inference.writeback: bit-exact round trips, documented output syntaxes, clipping, lossy flags."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGExtended12Bit,
    JPEGLSLossless,
    RLELossless,
)

from inference.dicomgen import make_ct_series, make_enhanced_ct
from inference.phi_header import phi_header
from inference.series import assemble
from inference.writeback import write_back
from tests.support.series import SHAPE, dcmtk, geometry, random_hu, reload, stored


def _native(ts):
    def encode(dss, tmp):
        for d in dss:
            d.file_meta.TransferSyntaxUID = ts
        return [reload(d) for d in dss]

    return encode


def _pydicom(ts, **kw):
    def encode(dss, tmp):
        for d in dss:
            d.compress(ts, generate_instance_uid=False, **kw)
        return [reload(d) for d in dss]

    return encode


def _dcmtk(*opts):
    return lambda dss, tmp: dcmtk(dss, tmp, "dcmcjpeg", *opts)


# input syntax → (encoder, documented output syntax)
CASES = {
    "explicit": (lambda dss, tmp: [reload(d) for d in dss], ExplicitVRLittleEndian),
    "implicit": (_native(ImplicitVRLittleEndian), ExplicitVRLittleEndian),
    "deflate": (_native(DeflatedExplicitVRLittleEndian), ExplicitVRLittleEndian),
    "rle": (_pydicom(RLELossless), RLELossless),
    "jpeg-ls": (_pydicom(JPEGLSLossless), JPEGLSLossless),
    "j2k-lossless": (_pydicom(JPEG2000Lossless), JPEG2000Lossless),
    "jpeg-lossless-sv1": (_dcmtk("+e1"), ExplicitVRLittleEndian),
    "jpeg-lossless-p14": (_dcmtk("+el"), ExplicitVRLittleEndian),
}


def _non_pixel(ds):
    return {e.tag: e.value for e in ds if e.tag != 0x7FE00010}


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_without_mask_is_bit_exact(name, tmp_path: Path):
    encode, expected_ts = CASES[name]
    g = geometry()
    originals = encode(make_ct_series(random_hu(), g, bits_stored=12), tmp_path)
    [volume] = assemble(originals)
    out = [reload(d) for d in write_back(volume, volume.hu.copy())]
    assert [d.SOPInstanceUID for d in out] == [d.SOPInstanceUID for d in volume.datasets]
    for before, after in zip(volume.datasets, out, strict=True):
        assert after.file_meta.TransferSyntaxUID == expected_ts
        np.testing.assert_array_equal(stored(after), stored(before))
        assert _non_pixel(after) == _non_pixel(before)


@pytest.mark.parametrize(
    "name", ["explicit", "rle", "jpeg-ls", "j2k-lossless", "jpeg-lossless-sv1"]
)
def test_changed_voxels_are_written_and_read_back(name, tmp_path: Path):
    encode, expected_ts = CASES[name]
    g = geometry()
    originals = encode(make_ct_series(random_hu(seed=4), g), tmp_path)
    [volume] = assemble(originals)
    new = volume.hu.copy()
    new[:, :8, 10:30] = -1000.0
    new[3, 20, 20] = 9999.0  # beyond the 12-bit stored range: clipped
    new[4, 20, 20] = -5000.0
    out = [reload(d) for d in write_back(volume, new)]
    assert {str(d.file_meta.TransferSyntaxUID) for d in out} == {expected_ts}
    [again] = assemble(out)
    expected = new.copy()
    expected[3, 20, 20] = 4095 - 1024  # stored max with intercept -1024
    expected[4, 20, 20] = -1024  # stored 0
    np.testing.assert_array_equal(again.hu, expected)


def test_signed_16_bit_clipping():
    g = geometry()
    hu = random_hu()
    dss = make_ct_series(hu, g, pixel_representation=1, bits_stored=16, rescale_intercept=0)
    [volume] = assemble(dss)
    new = hu.copy()
    new[0, 0, 0] = 40000
    new[0, 0, 1] = -40000
    [first, *_] = write_back(volume, new)
    assert stored(first)[0, 0, :2].tolist() == [32767, -32768]


def test_padding_voxels_keep_their_stored_value():
    hu = random_hu()
    hu[:, :3, :] = -3024
    g = geometry()
    dss = make_ct_series(hu, g, rescale_intercept=-3024, bits_stored=16)
    for d in dss:
        d.PixelPaddingValue = 0
    [volume] = assemble([reload(d) for d in dss])
    new = volume.hu.copy()
    new[:, :10, :] = -1000.0  # mask over padding (already air) and tissue
    out = write_back(volume, new)
    for d in out:
        s = stored(d)[0]
        assert (s[:3] == 0).all()  # padding stays padding, not "air"
        assert (s[3:10] == 3024 - 1000).all()


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless])
def test_multiframe_round_trip_and_mask(ts):
    g = geometry(tilt_deg=10)
    order = np.random.default_rng(7).permutation(SHAPE[0])
    rescale = [(1.0, -1024.0 + (k % 3)) for k in range(SHAPE[0])]
    ds = reload(
        make_enhanced_ct(random_hu(), g, frame_order=order, rescale=rescale, transfer_syntax=ts)
    )
    [volume] = assemble([ds])
    [same] = write_back(volume, volume.hu.copy())
    same = reload(same)
    assert same.file_meta.TransferSyntaxUID == ts
    np.testing.assert_array_equal(stored(same), stored(ds))
    new = volume.hu.copy()
    new[5:9, :6, :] = -1000.0
    [masked] = write_back(volume, new)
    [again] = assemble([reload(masked)])
    np.testing.assert_array_equal(again.hu, new)


@pytest.mark.parametrize(
    "ts,encode",
    [(JPEG2000, _pydicom(JPEG2000, j2k_cr=[20])), (JPEGExtended12Bit, _dcmtk("+ee"))],
    ids=["j2k-lossy", "jpeg-extended"],
)
def test_lossy_input_is_written_uncompressed_and_flagged(ts, encode, tmp_path: Path):
    g = geometry()
    originals = encode(make_ct_series(random_hu(seed=9) / 4, g), tmp_path)
    assert originals[0].file_meta.TransferSyntaxUID == ts
    for d in originals:  # an input that does not say it was lossy: the syntax says it
        if "LossyImageCompression" in d:
            del d.LossyImageCompression
    [volume] = assemble(originals)
    out = [reload(d) for d in write_back(volume, volume.hu.copy())]
    for before, after in zip(originals, out, strict=True):
        assert after.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert after.LossyImageCompression == "01"
        assert after.LossyImageCompressionMethod in ("ISO_15444_1", "ISO_10918_1")
        np.testing.assert_array_equal(stored(after), stored(before))  # the decoded values


def test_shape_mismatch_is_refused():
    [volume] = assemble(make_ct_series(random_hu(), geometry()))
    with pytest.raises(ValueError, match="shape"):
        write_back(volume, volume.hu[:-1])


def _dciodvfy_errors(path: Path) -> set[str]:
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return {ln.strip() for ln in (done.stdout + done.stderr).splitlines() if "Error" in ln}


@pytest.mark.parametrize("kind", ["enhanced-rle", "single-jpeg-ls", "single-jpeg-lossless"])
def test_written_back_instances_have_no_new_dciodvfy_errors(kind, tmp_path: Path):
    header, _ = phi_header(4)
    g = geometry(tilt_deg=5)
    if kind == "enhanced-rle":
        originals = [
            reload(make_enhanced_ct(random_hu(), g, header=header, transfer_syntax=RLELossless))
        ]
    elif kind == "single-jpeg-ls":
        originals = [
            reload(d)
            for d in make_ct_series(random_hu(), g, header=header, transfer_syntax=JPEGLSLossless)
        ]
    else:
        originals = dcmtk(
            make_ct_series(random_hu(), g, header=header), tmp_path, "dcmcjpeg", "+e1"
        )
    [volume] = assemble(originals)
    new = volume.hu.copy()
    new[:, :5, :] = -1000.0
    out = write_back(volume, new)
    before, after = tmp_path / "before.dcm", tmp_path / "after.dcm"
    originals[0].save_as(before, enforce_file_format=True)
    out[0].save_as(after, enforce_file_format=True)
    assert not _dciodvfy_errors(after) - _dciodvfy_errors(before)
