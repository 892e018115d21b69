"""gateway.pipeline: stage composition, fail-closed behaviour, atomic output, saved masks.

The engine here is a box (plumbing only); de-identification is the real anonymizer.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.affines import apply_affine
from pydicom.dataset import Dataset
from pydicom.uid import JPEGLSLossless, RLELossless

from anonymizer import DeidentificationError, Profile
from gateway.config import AuditSettings, DefaceSettings, DeidSettings, Settings, VolumeSettings
from gateway.pipeline import StageError, deface_to_directory, process_series
from inference.dicomgen import make_ct_series, make_enhanced_ct
from inference.errors import FacemaskError, GeometryError, NotCTError
from inference.phi_header import phi_header
from inference.series import assemble, load_datasets
from tests.support.series import BoxEngine, NoFaceEngine, geometry, random_hu, save

KEY = "k" * 32
#: Plumbing tests use box engines on tiny volumes: the privacy audit is tested below and in
#: tests/test_audit_*.py on phantoms.
NO_AUDIT = AuditSettings(enabled=False)


def _settings(**deface) -> Settings:
    return Settings(
        deface=DefaceSettings(**deface),
        deid=DeidSettings(key=KEY),
        volume=VolumeSettings(min_slices=20),
        audit=NO_AUDIT,
    )


def _phi_series(seed=0, **kw) -> tuple[list[Dataset], list[str], np.ndarray]:
    header, phi = phi_header(seed)
    hu = random_hu(seed=seed)
    return make_ct_series(hu, kw.pop("geom", geometry()), header=header, **kw), phi, hu


def _box(shape):
    return BoxEngine().mask(np.zeros(shape, np.float32), geometry())


def _all_text(ds: Dataset) -> str:
    return "\n".join(str(e.value) for e in ds.iterall() if e.tag != 0x7FE00010)


def test_process_series_defaces_and_deidentifies():
    dss, phi, hu = _phi_series()
    originals = {str(d.SOPInstanceUID) for d in dss}
    engine = BoxEngine()
    [result] = process_series(dss, engine, Profile(key=KEY.encode()), _settings())
    assert engine.calls == 1
    box = _box(hu.shape)
    assert result.masked_voxels == int(box.sum())
    assert set(result.timings) >= {"assemble", "mask", "replace", "writeback", "deidentify"}
    [back] = assemble(result.datasets)
    assert (back.hu[box] == -1000).all()
    np.testing.assert_array_equal(back.hu[~box], hu[~box])
    for ds in result.datasets:
        assert str(ds.SOPInstanceUID) not in originals
        text = _all_text(ds)
        leaked = [p for p in phi if p in text]
        assert not leaked
        assert ds.PatientIdentityRemoved == "YES"


def test_fill_from_settings():
    dss, _, _ = _phi_series()
    [result] = process_series(dss, BoxEngine(), Profile(key=KEY.encode()), _settings(fill="-400"))
    [back] = assemble(result.datasets)
    assert (back.hu[_box(back.hu.shape)] == -400).all()
    assert result.fill_hu == -400


def test_paths_input_and_several_series_and_multiframe(tmp_path: Path):
    a, _, _ = _phi_series(0)
    save(a, tmp_path / "in" / "a")
    enhanced = make_enhanced_ct(random_hu(seed=3), geometry(tilt_deg=8))
    save([enhanced], tmp_path / "in" / "b")
    results = process_series([tmp_path / "in"], BoxEngine(), Profile(key=KEY.encode()), _settings())
    assert sorted(len(r.datasets) for r in results) == [1, 24]
    multi = next(r for r in results if len(r.datasets) == 1)
    assert multi.geometry.tilt_degrees == pytest.approx(8, abs=0.01)
    assert int(multi.datasets[0].NumberOfFrames) == 24


def test_rejected_input_never_reaches_the_engine():
    dss, _, _ = _phi_series()
    for d in dss:
        d.Modality = "MR"
    engine = BoxEngine()
    with pytest.raises(StageError) as err:
        process_series(dss, engine, Profile(key=KEY.encode()), _settings())
    assert err.value.stage == "assemble"
    assert isinstance(err.value.error, NotCTError)
    assert engine.calls == 0


def _dir_state(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_deface_to_directory_layout_and_names(tmp_path: Path):
    dss, phi, _ = _phi_series()
    originals = {str(d.SOPInstanceUID) for d in dss} | {str(dss[0].SeriesInstanceUID)}
    save(dss, tmp_path / "in", names=[f"{phi[0]}_{i}.dcm" for i in range(len(dss))])
    out = tmp_path / "out"
    summary = deface_to_directory(tmp_path / "in", out, _settings(), engine=BoxEngine())
    assert _dir_state(tmp_path) == ["in", "out"]  # no temporary directory left behind
    [series_dir] = list(out.iterdir())
    files = sorted(series_dir.iterdir())
    assert len(files) == summary.files == 24
    for f in files:
        ds = pydicom.dcmread(f)
        assert f.name == f"{ds.SOPInstanceUID}.dcm"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert f.stem not in originals
    assert series_dir.name == str(ds.SeriesInstanceUID) and series_dir.name not in originals
    assert not summary.random_key
    data = summary.to_dict()
    assert data["series"][0]["instances"] == 24
    assert not any(p in summary.to_json() for p in phi)


def test_same_key_same_pseudonyms_random_key_differs(tmp_path: Path):
    dss, _, _ = _phi_series()
    save(dss, tmp_path / "in")

    def run(name: str, settings: Settings) -> set[str]:
        deface_to_directory(tmp_path / "in", tmp_path / name, settings, engine=BoxEngine())
        return {p.name for p in (tmp_path / name).rglob("*.dcm")}

    assert run("a", _settings()) == run("b", _settings())  # idempotent with a key
    unkeyed = Settings(deid=DeidSettings(), audit=NO_AUDIT)
    s1 = deface_to_directory(tmp_path / "in", tmp_path / "c", unkeyed, engine=BoxEngine())
    assert s1.random_key
    c = {p.name for p in (tmp_path / "c").rglob("*.dcm")}
    assert c.isdisjoint(run("d", unkeyed))


def test_existing_output_is_refused_unless_overwrite(tmp_path: Path):
    dss, _, _ = _phi_series()
    save(dss, tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        deface_to_directory(tmp_path / "in", out, _settings(), engine=BoxEngine())
    assert (out / "keep.txt").exists()
    deface_to_directory(tmp_path / "in", out, _settings(), engine=BoxEngine(), overwrite=True)
    assert not (out / "keep.txt").exists()
    assert len(list(out.rglob("*.dcm"))) == 24
    assert _dir_state(tmp_path) == ["in", "out"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_engine_failure_writes_nothing(tmp_path: Path, overwrite: bool):
    dss, _, _ = _phi_series()
    save(dss, tmp_path / "in")
    out = tmp_path / "out"
    if overwrite:
        out.mkdir()
        (out / "previous.txt").write_text("x")
    with pytest.raises(StageError) as err:
        deface_to_directory(
            tmp_path / "in", out, _settings(), engine=NoFaceEngine(), overwrite=overwrite
        )
    assert err.value.stage == "mask"
    assert isinstance(err.value.error, FacemaskError)
    assert _dir_state(tmp_path) == (["in", "out"] if overwrite else ["in"])
    if overwrite:  # the previous output is untouched
        assert _dir_state(out) == ["previous.txt"]


def test_deidentification_refusal_writes_nothing(tmp_path: Path):
    a, _, _ = _phi_series(0)
    b, _, _ = _phi_series(1)
    b[5].BurnedInAnnotation = "YES"  # the anonymizer refuses this instance
    save(a + b, tmp_path / "in")
    with pytest.raises(StageError) as err:
        deface_to_directory(tmp_path / "in", tmp_path / "out", _settings(), engine=BoxEngine())
    assert err.value.stage == "deidentify"
    assert isinstance(err.value.error, DeidentificationError)
    assert _dir_state(tmp_path) == ["in"]  # not even the first, valid series


def test_second_series_invalid_rejects_before_any_work(tmp_path: Path):
    a, _, _ = _phi_series(0)
    b, _, _ = _phi_series(1)
    del b[10:12]
    save(a + b, tmp_path / "in")
    engine = BoxEngine()
    with pytest.raises(StageError) as err:
        deface_to_directory(tmp_path / "in", tmp_path / "out", _settings(), engine=engine)
    assert isinstance(err.value.error, GeometryError)
    assert "series #2 of 2" in str(err.value)
    assert engine.calls == 0
    assert _dir_state(tmp_path) == ["in"]


@pytest.mark.parametrize("tilt", [0.0, 15.0])
def test_saved_masks_seg_and_nifti(tmp_path: Path, tilt: float):
    g = geometry(tilt_deg=tilt)
    dss, phi, _ = _phi_series(geom=g)
    save(dss, tmp_path / "in")
    out = tmp_path / "out"
    summary = deface_to_directory(
        tmp_path / "in",
        out,
        _settings(),
        engine=BoxEngine(),
        save_mask=True,
        save_mask_nifti=True,
    )
    result = summary.series[0]
    seg_path, nii_path = (out / name for name in summary.mask_files)
    seg = hd.seg.segread(seg_path)
    assert seg.SegmentSequence[0].SegmentLabel == "Face"
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == result.datasets[0].StudyInstanceUID
    ref_series = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    assert ref_series == result.series_uid
    assert not any(p in _all_text(seg) for p in phi)
    assert int(seg.NumberOfFrames) == 24  # one frame per source slice
    assert int(seg.pixel_array.astype(bool).sum()) == result.masked_voxels
    slice_of = {
        str(result.datasets[r.dataset].SOPInstanceUID): k for k, r in enumerate(result.slices)
    }
    for frame, item in zip(seg.pixel_array, seg.PerFrameFunctionalGroupsSequence, strict=True):
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        k = slice_of[source.ReferencedSOPInstanceUID]
        np.testing.assert_array_equal(frame.astype(bool), result.mask[k])

    img = nib.load(nii_path)
    data = np.asarray(img.dataobj)
    np.testing.assert_array_equal(data.transpose(2, 1, 0).astype(bool), result.mask)
    for kji in [(0, 0, 0), (5, 7, 11), (23, 31, 39)]:
        lps = g.index_to_patient(kji)
        ras = apply_affine(img.affine, kji[::-1])
        np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-4)
    assert int(img.header["sform_code"]) == 1


def test_reid_lookup_written_only_where_configured(tmp_path: Path):
    dss, phi, _ = _phi_series()
    save(dss, tmp_path / "in")
    lookup = tmp_path / "private" / "reid.csv"
    lookup.parent.mkdir()
    settings = Settings(deid=DeidSettings(key=KEY, reid_lookup_path=lookup), audit=NO_AUDIT)
    deface_to_directory(tmp_path / "in", tmp_path / "out", settings, engine=BoxEngine())
    text = lookup.read_text()
    assert str(dss[0].PatientID) in text
    assert not any(
        p in f.read_bytes().decode("latin-1")
        for f in (tmp_path / "out").rglob("*")
        if f.is_file()
        for p in phi
    )


def test_importing_the_pipeline_does_not_import_torch():
    code = "import sys, gateway.pipeline, gateway.commands.deface; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_load_datasets_reads_what_was_saved(tmp_path: Path):
    dss, _, _ = _phi_series()
    save(dss, tmp_path)
    assert len(load_datasets([tmp_path])) == 24


@pytest.mark.parametrize("ts", [RLELossless, JPEGLSLossless])
def test_lossless_compressed_input_stays_compressed_in_output(tmp_path: Path, ts):
    dss, _, hu = _phi_series()
    for d in dss:
        d.compress(ts, generate_instance_uid=False)
    save(dss, tmp_path / "in")
    summary = deface_to_directory(
        tmp_path / "in", tmp_path / "out", _settings(), engine=BoxEngine()
    )
    assert summary.series[0].summary()["transfer_syntaxes"] == [ts]
    files = list((tmp_path / "out").rglob("*.dcm"))
    assert {pydicom.dcmread(f).file_meta.TransferSyntaxUID for f in files} == {ts}
    [back] = assemble(load_datasets([tmp_path / "out"]))
    box = _box(hu.shape)
    assert (back.hu[box] == -1000).all()
    np.testing.assert_array_equal(back.hu[~box], hu[~box])


class _EmptyEngine:
    name = "empty"

    def mask(self, hu, geometry):
        return np.zeros(hu.shape, dtype=bool)


def test_empty_facemask_fails_closed():
    dss, _, _ = _phi_series()
    with pytest.raises(StageError) as err:
        process_series(dss, _EmptyEngine(), Profile(key=KEY.encode()), _settings())
    assert err.value.stage == "mask"
    assert isinstance(err.value.error, FacemaskError)
    assert "empty facemask" in str(err.value)


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_output_must_not_overlap_input(tmp_path: Path, where: str):
    dss, _, _ = _phi_series()
    src = save(dss, tmp_path / "a" / "in")
    out = {"same": src, "parent": tmp_path / "a", "inside": src / "out"}[where]
    with pytest.raises(ValueError, match="must not be INPUT"):
        deface_to_directory(src, out, _settings(), engine=BoxEngine(), overwrite=True)
    assert len(list(src.iterdir())) == 24
