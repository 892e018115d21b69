"""inference.series: every input the reader must accept, and every one it must reject."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from inference.dicomgen import make_ct_series, make_enhanced_ct
from inference.errors import GeometryError, NotCTError, SeriesError, UnreadableFileError
from inference.series import assemble, assemble_series, load_datasets
from tests.support.series import SHAPE, dcmtk, geometry, random_hu, reload, save

N = SHAPE[0]


def _series(**kw):
    g = kw.pop("geom", None) or geometry()
    hu = kw.pop("hu", None)
    hu = random_hu(g.shape) if hu is None else hu
    return hu, g, make_ct_series(hu, g, **kw)


def _assert_same(volume, hu, g, atol=1e-3):
    np.testing.assert_array_equal(volume.hu, hu)
    np.testing.assert_allclose(volume.geometry.affine, g.affine, atol=atol)


# ---------------------------------------------------------------------------- accepted input


def test_sorts_by_position_not_instance_number_or_order():
    rng = np.random.default_rng(1)
    hu, g, dss = _series(instance_order=rng.permutation(N))
    shuffled = [dss[i] for i in rng.permutation(N)]
    [v] = assemble(shuffled)
    _assert_same(v, hu, g)
    # slice k must map back to the instance that holds it
    for k, ref in enumerate(v.slices):
        pos = np.asarray(v.datasets[ref.dataset].ImagePositionPatient, float)
        np.testing.assert_allclose(pos, g.index_to_patient([k, 0, 0]), atol=1e-3)


def test_descending_positions_and_oblique_orientation():
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    g = geometry(orientation=(c, s, 0, 0, 0, -1))  # coronal-ish, rotated
    hu, _, dss = _series(geom=g)
    [v] = assemble(dss[::-1])
    _assert_same(v, hu, g)
    assert v.geometry.tilt_degrees == pytest.approx(0, abs=1e-3)


def test_rescale_slope_intercept_and_signed_pixels():
    hu = np.round(random_hu() / 2) * 2 - 1  # stored = (hu + 1) / 2 is an exact integer
    g = geometry()
    dss = make_ct_series(
        hu, g, rescale_slope=2.0, rescale_intercept=-1.0, pixel_representation=1, bits_stored=16
    )
    [v] = assemble([reload(d) for d in dss])
    _assert_same(v, hu, g)
    assert {(r.slope, r.intercept) for r in v.slices} == {(2.0, -1.0)}
    assert int(dss[0].pixel_array.min()) < 0  # signed stored values really exercised


def test_pixel_padding_value_becomes_air_and_is_remembered():
    hu = random_hu()
    hu[:, :4, :] = -3024  # scanner "outside the field of view", stored 0 with intercept -3024
    g = geometry()
    dss = make_ct_series(hu, g, rescale_intercept=-3024, bits_stored=16, pixel_representation=0)
    for d in dss:
        d.PixelPaddingValue = 0
    [v] = assemble([reload(d) for d in dss])
    assert v.padding == (0, 0)
    assert v.padding_voxels == N * 4 * SHAPE[2]
    assert (v.hu[:, :4, :] == -1000).all()
    np.testing.assert_array_equal(v.hu[:, 4:, :], hu[:, 4:, :])


def test_gantry_tilt_keeps_the_step_vector():
    g = geometry(tilt_deg=18.0)
    hu, _, dss = _series(geom=g)
    [v] = assemble(dss)
    _assert_same(v, hu, g)
    assert v.geometry.tilt_degrees == pytest.approx(18.0, abs=0.01)
    # column 0 is the step between slice origins, not the normal
    step = np.asarray(dss[1].ImagePositionPatient, float) - dss[0].ImagePositionPatient
    np.testing.assert_allclose(v.geometry.affine[:3, 0], step, atol=1e-3)
    assert abs(v.geometry.affine[:3, 0] @ v.geometry.slice_normal) == pytest.approx(2.0, abs=1e-3)


def test_irregular_spacing_keeps_per_slice_origins():
    z = np.concatenate([np.arange(12) * 2.0, 22 + 2.0 + np.arange(12) * 2.5])  # 2 then 2.5 mm
    origins = np.stack([np.full(N, -16.0), np.full(N, -14.0), 40 + z], axis=1)
    g0 = geometry()
    from inference.geometry import Geometry

    g = Geometry(affine=g0.affine, shape=g0.shape, slice_origins=origins)
    hu, _, dss = _series(geom=g)
    [v] = assemble(dss)
    np.testing.assert_array_equal(v.hu, hu)
    np.testing.assert_allclose(v.geometry.slice_origins, origins, atol=1e-3)
    assert any("irregular" in w for w in v.warnings)


def test_several_series_in_one_directory_tree(tmp_path: Path):
    hu1, g1, a = _series()
    hu2, g2, b = _series(geom=geometry(tilt_deg=10), hu=random_hu(seed=5))
    save(a, tmp_path / "x" / "one")
    save(b, tmp_path / "y")
    volumes = assemble(load_datasets([tmp_path]))
    assert len(volumes) == 2
    by_uid = {v.series_uid: v for v in volumes}
    _assert_same(by_uid[a[0].SeriesInstanceUID], hu1, g1)
    _assert_same(by_uid[b[0].SeriesInstanceUID], hu2, g2)


def test_same_instance_twice_is_not_a_duplicate_slice():
    hu, g, dss = _series()
    [v] = assemble([*dss, reload(dss[3])])
    _assert_same(v, hu, g)


@pytest.mark.parametrize("frame_order", [None, "shuffled"])
def test_enhanced_ct_multiframe_per_frame_groups(frame_order):
    g = geometry(tilt_deg=12)
    hu = random_hu(seed=2)
    order = np.random.default_rng(3).permutation(N) if frame_order else None
    rescale = [(1.0, -1024.0 + k) for k in range(N)]  # per-frame PixelValueTransformation
    ds = reload(make_enhanced_ct(hu, g, rescale=rescale, frame_order=order))
    assert "PixelValueTransformationSequence" in ds.PerFrameFunctionalGroupsSequence[0]
    [v] = assemble([ds])
    _assert_same(v, hu, g)
    assert v.geometry.tilt_degrees == pytest.approx(12, abs=0.01)
    assert {r.dataset for r in v.slices} == {0}
    if order is not None:
        assert [r.frame for r in v.slices] == list(np.argsort(order))


def _jpeg(tool: str, *opts: str):
    return lambda dss, tmp: dcmtk(dss, tmp, tool, *opts)


def _pydicom(ts, **kw):
    def encode(dss, tmp):
        for d in dss:
            d.compress(ts, generate_instance_uid=False, **kw)
        return [reload(d) for d in dss]

    return encode


def _native(ts):
    def encode(dss, tmp):
        for d in dss:
            d.file_meta.TransferSyntaxUID = ts
            if ts == ExplicitVRBigEndian:  # OW is written as given: swap it ourselves
                d.PixelData = np.frombuffer(d.PixelData, "<u2").astype(">u2").tobytes()
        return [reload(d) for d in dss]

    return encode


LOSSLESS = {
    "implicit": (ImplicitVRLittleEndian, _native(ImplicitVRLittleEndian)),
    "deflate": (DeflatedExplicitVRLittleEndian, _native(DeflatedExplicitVRLittleEndian)),
    "rle": (RLELossless, _pydicom(RLELossless)),
    "jpeg-ls": (JPEGLSLossless, _pydicom(JPEGLSLossless)),
    "j2k-lossless": (JPEG2000Lossless, _pydicom(JPEG2000Lossless)),
    "jpeg-lossless-sv1": (JPEGLosslessSV1, _jpeg("dcmcjpeg", "+e1")),
    "jpeg-lossless-p14": (JPEGLossless, _jpeg("dcmcjpeg", "+el")),
}


@pytest.mark.parametrize("name", list(LOSSLESS))
def test_transfer_syntaxes_decode_exactly(name, tmp_path: Path):
    ts, encode = LOSSLESS[name]
    hu, g, dss = _series()
    encoded = encode(dss, tmp_path)
    assert encoded[0].file_meta.TransferSyntaxUID == ts
    [v] = assemble(encoded)
    _assert_same(v, hu, g)
    assert not v.lossy


@pytest.mark.parametrize(
    "ts,encode",
    [
        (JPEG2000, _pydicom(JPEG2000, j2k_cr=[20])),
        (JPEGExtended12Bit, _jpeg("dcmcjpeg", "+ee")),
    ],
    ids=["j2k-lossy", "jpeg-extended"],
)
def test_lossy_inputs_are_decoded_and_flagged(ts, encode, tmp_path: Path):
    hu, _g, dss = _series(hu=np.zeros(SHAPE, np.float32) + 40)
    encoded = encode(dss, tmp_path)
    assert encoded[0].file_meta.TransferSyntaxUID == ts
    [v] = assemble(encoded)
    assert v.lossy
    assert any("lossy" in w for w in v.warnings)
    assert np.abs(v.hu - hu).max() < 50


# ---------------------------------------------------------------------------- rejected input


def test_retired_big_endian_is_rejected_clearly():
    _, _, dss = _series()
    encoded = _native(ExplicitVRBigEndian)(dss, None)
    with pytest.raises(SeriesError, match="Big Endian"):
        assemble(encoded)


def test_non_ct_modality_is_rejected():
    _, _, dss = _series()
    for d in dss:
        d.Modality = "MR"
    with pytest.raises(NotCTError, match="modality is MR"):
        assemble(dss)


def test_secondary_capture_is_rejected_even_with_modality_ct():
    _, _, dss = _series()
    for d in dss:
        d.SOPClassUID = SecondaryCaptureImageStorage
    with pytest.raises(NotCTError, match="SOP class"):
        assemble(dss)


def test_mixed_matrix_sizes_are_rejected():
    _, _, dss = _series()
    _, _, other = _series(geom=geometry((N, 32, 36)), hu=random_hu((N, 32, 36)))
    for d in other[:5]:
        d.SeriesInstanceUID = dss[0].SeriesInstanceUID
    mixed = dss[:10] + other[:5]  # interleave positions: other[:5] share z with dss[:5]
    for i, d in enumerate(other[:5]):
        d.ImagePositionPatient = [-16.0, -14.0, 40.0 + 2.0 * (10 + i)]
    with pytest.raises(GeometryError, match="mixed matrix sizes"):
        assemble(mixed, min_slices=5)


def test_mixed_orientations_are_rejected():
    _, _, dss = _series()
    for d in dss[12:]:
        d.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    with pytest.raises(GeometryError, match="mixed image orientations"):
        assemble(dss)


def test_duplicated_positions_are_rejected():
    _, _, dss = _series()
    dss[7].ImagePositionPatient = list(dss[6].ImagePositionPatient)
    with pytest.raises(GeometryError, match="1 duplicated slice position"):
        assemble(dss)


def test_missing_slices_are_rejected_unless_allowed():
    hu, _g, dss = _series()
    del dss[10:12]  # a 6 mm gap in 2 mm spacing
    with pytest.raises(GeometryError, match="missing slices"):
        assemble(dss)
    [v] = assemble(dss, allow_gaps=True)
    assert any("gap" in w for w in v.warnings)
    assert v.geometry.slice_origins is not None
    np.testing.assert_array_equal(v.hu, np.delete(hu, [10, 11], axis=0))


def test_too_few_slices_are_rejected():
    _, _, dss = _series()
    with pytest.raises(GeometryError, match="24 slices, fewer than the minimum 30"):
        assemble(dss, min_slices=30)


def test_positions_off_one_line_are_rejected():
    _, _, dss = _series()
    dss[5].ImagePositionPatient = [-16.0 + 5.0, -14.0, 40.0 + 10.0]
    with pytest.raises(GeometryError, match="one line"):
        assemble(dss)


def test_localizer_by_image_type_is_dropped_with_warning():
    hu, g, dss = _series()
    _, _, scout = _series(geom=geometry((1, 48, 48)), hu=random_hu((1, 48, 48)))
    scout[0].SeriesInstanceUID = dss[0].SeriesInstanceUID
    scout[0].ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    [v] = assemble([scout[0], *dss])
    _assert_same(v, hu, g)
    assert "dropped 1 localizer image(s)" in v.warnings


def test_localizer_by_orientation_is_dropped_with_warning():
    hu, g, dss = _series()
    sag = geometry((2, 32, 40), orientation=(0, 1, 0, 0, 0, -1))
    _, _, scouts = _series(geom=sag, hu=random_hu((2, 32, 40)))
    for s in scouts:
        s.SeriesInstanceUID = dss[0].SeriesInstanceUID
    [v] = assemble([*scouts, *dss])
    _assert_same(v, hu, g)
    assert any("different orientation" in w for w in v.warnings)


def test_unreadable_file_is_named_by_position_not_name(tmp_path: Path):
    _, _, dss = _series()
    save(dss[:2], tmp_path)
    (tmp_path / "DOE^JOHN_1970.dcm").write_bytes(b"not dicom at all" * 10)
    with pytest.raises(UnreadableFileError) as err:
        load_datasets([tmp_path])
    assert "file #3 of 3" in str(err.value)
    assert "DOE" not in str(err.value)


def test_truncated_pixel_data_is_unreadable(tmp_path: Path):
    _, _, dss = _series()
    save(dss, tmp_path)
    victim = tmp_path / "0005.dcm"
    victim.write_bytes(victim.read_bytes()[:-500])
    with pytest.raises(SeriesError) as err:
        assemble(load_datasets([tmp_path]))
    assert isinstance(err.value, UnreadableFileError)


def test_dicomdir_is_skipped(tmp_path: Path):
    hu, g, dss = _series()
    save(dss, tmp_path / "IMG")
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ddir = pydicom.Dataset()
    ddir.file_meta = meta
    ddir.FileSetID = "X"
    ddir.save_as(tmp_path / "DICOMDIR", enforce_file_format=True)
    [v] = assemble(load_datasets([tmp_path]))
    _assert_same(v, hu, g)


def test_missing_geometry_is_a_geometry_error():
    _, _, dss = _series()
    del dss[4].ImagePositionPatient
    with pytest.raises(GeometryError, match="instance #"):
        assemble_series(dss)


def test_directory_scan_skips_files_marked_non_dicom_but_not_named_ones(tmp_path: Path):
    hu, g, dss = _series()
    save(dss, tmp_path / "dicom")
    (tmp_path / "facemask.nii.gz").write_bytes(b"\x1f\x8b not dicom")
    (tmp_path / "phantom.json").write_text("{}")
    [v] = assemble(load_datasets([tmp_path]))
    _assert_same(v, hu, g)
    with pytest.raises(UnreadableFileError, match="file #1 of 1"):
        load_datasets([tmp_path / "phantom.json"])  # named explicitly: must be DICOM


def test_single_slice_is_not_a_volume_even_if_allowed():
    _, _, dss = _series()
    with pytest.raises(GeometryError, match="at least 2"):
        assemble(dss[:1], min_slices=1)


def test_mixed_pixel_spacings_are_rejected():
    _, _, dss = _series()
    for d in dss[:3]:
        d.PixelSpacing = [0.7, 0.9]
    with pytest.raises(GeometryError, match="mixed pixel spacings"):
        assemble(dss)
