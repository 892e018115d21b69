"""`defacegate deface` end to end: the installed command on a phantom, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.affines import apply_affine

from inference.dicomgen import make_ct_series
from inference.series import assemble, load_datasets
from tests.support.series import geometry, random_hu, save

BIN = Path(sys.executable).parent
DEFACEGATE = str(BIN / "defacegate")


def _env() -> dict[str, str]:
    """The user's environment without any DEFACEGATE_* configuration."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEFACEGATE_")}
    env["HOME"] = os.environ.get("HOME", "/tmp")
    return env


def _run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [DEFACEGATE, *map(str, args)],
        capture_output=True,
        text=True,
        env=env or _env(),
        timeout=600,
    )


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """A small phantom (head, 128², 2.5 mm: about 110 slices) with planted PHI."""
    root = tmp_path_factory.mktemp("phantom") / "p"
    done = _run(
        "phantom", root, "--seed", "1", "--matrix", "128", "--slice-thickness", "2.5",
        "--fov", "head", "--phi",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return root


@pytest.fixture(scope="module")
def defaced(phantom: Path, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("out") / "defaced"
    done = _run("deface", phantom, out, "--json", "--save-mask", "--save-mask-nifti")
    return out, done


def _dciodvfy_errors(path: Path) -> set[str]:
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (done.stdout + done.stderr).splitlines()
    return {line.strip() for line in lines if line.lstrip().startswith("Error")}


def test_deface_phantom_end_to_end(phantom: Path, defaced):
    out, done = defaced
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["engine"] == "anatomical"  # the default engine
    assert summary["random_key"] is True
    assert done.stderr.count("random key") == 1  # said once
    assert "━" not in done.stderr  # no progress bar when stderr is not a terminal
    [series] = summary["series"]
    n_input = len(list((phantom / "dicom").rglob("*.dcm")))
    assert summary["files"] == series["instances"] == n_input > 50
    assert 0.002 < series["masked_fraction"] < 0.2

    original = assemble(load_datasets([phantom]))[0]
    [result] = assemble(load_datasets([out / series["series_uid"]]))
    # same geometry, voxel for voxel
    assert result.hu.shape == original.hu.shape
    np.testing.assert_allclose(result.geometry.affine, original.geometry.affine, atol=1e-4)
    # voxels differ only inside the saved mask, and are air there
    nii = nib.load(out / f"masks/{series['series_uid']}.nii.gz")
    mask = np.asarray(nii.dataobj).transpose(2, 1, 0).astype(bool)
    assert int(mask.sum()) == series["masked_voxels"]
    changed = result.hu != original.hu
    assert not (changed & ~mask).any()
    assert (result.hu[mask] == -1000).all()
    # the NIfTI grid is the phantom's own ground-truth grid (written independently)
    truth = nib.load(phantom / "facemask.nii.gz")
    np.testing.assert_allclose(nii.affine, truth.affine, atol=1e-3)
    # and the mask is on the face: a good part of the ground-truth facemask is covered
    ijk = np.argwhere(np.asarray(truth.dataobj) > 0)
    lps = apply_affine(truth.affine, ijk) * [-1, -1, 1]
    idx = np.rint(original.geometry.patient_to_index(lps)).astype(int)
    assert mask[tuple(idx.T)].mean() > 0.25
    assert (out / f"masks/{series['series_uid']}.seg.dcm").is_file()


PHI_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
    "ReferringPhysicianName", "OtherPatientIDs", "PatientAddress", "StudyID",
    "DeviceSerialNumber", "StationName", "OperatorsName", "PerformingPhysicianName",
)  # fmt: skip


def test_output_has_no_planted_phi(phantom: Path, defaced):
    out, _ = defaced
    first = pydicom.dcmread(sorted((phantom / "dicom").rglob("*.dcm"))[0])
    planted = {str(first[k].value) for k in PHI_KEYWORDS if k in first}
    planted = {p for p in planted if len(p) >= 4}
    assert len(planted) >= 6, "the phantom --phi header is expected to plant PHI"
    files = sorted(p for p in out.rglob("*") if p.is_file())
    for f in files[:10] + [p for p in files if "masks" in p.parts]:
        raw = f.read_bytes()
        hits = [p for p in planted if p.encode("utf-8", "replace") in raw]
        assert not hits, f"{f.name}: planted PHI present"


def test_dciodvfy_reports_no_new_errors(phantom: Path, defaced):
    out, done = defaced
    assert done.returncode == 0, done.stderr
    inputs = {}
    for f in sorted((phantom / "dicom").rglob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        inputs[int(ds.InstanceNumber)] = f
    outputs = {}
    for f in sorted(out.rglob("*.dcm")):
        if "masks" in f.parts:
            continue
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        outputs[int(ds.InstanceNumber)] = f
    assert len(outputs) == len(inputs)
    for n in (1, len(inputs) // 2, len(inputs)):
        new = _dciodvfy_errors(outputs[n]) - _dciodvfy_errors(inputs[n])
        assert not new, f"instance {n}: new dciodvfy errors {sorted(new)}"


def test_rejected_input_clear_message_no_traceback_no_output(tmp_path: Path):
    dss = make_ct_series(random_hu(), geometry())
    for d in dss:
        d.Modality = "MR"
        d.PatientName = "SECRET^PATIENT"
    save(dss, tmp_path / "in", names=[f"SECRET_{i}.dcm" for i in range(len(dss))])
    done = _run("deface", tmp_path / "in", tmp_path / "out")
    assert done.returncode == 1
    lines = [ln for ln in done.stderr.splitlines() if "defacegate deface:" in ln]
    assert lines[-1] == (
        "defacegate deface: assemble failed: series #1 of 1: modality is MR, not CT"
    )
    assert "Traceback" not in done.stderr and "SECRET" not in done.stderr + done.stdout
    assert not (tmp_path / "out").exists()


def test_gap_rejected_then_accepted_with_allow_gaps(tmp_path: Path):
    dss = make_ct_series(random_hu(), geometry())
    del dss[8:10]
    save(dss, tmp_path / "in")
    done = _run("deface", tmp_path / "in", tmp_path / "out")
    assert done.returncode == 1
    assert "missing slices" in done.stderr
    # the box-free random volume has no face: the real engine must refuse it (fail closed)
    done = _run("deface", tmp_path / "in", tmp_path / "out", "--allow-gaps")
    assert "missing slices" not in done.stderr
    assert done.returncode == 1
    assert "series #1 of 1: mask failed:" in done.stderr
    assert not (tmp_path / "out").exists()


def test_existing_output_and_bad_options_are_usage_errors(phantom: Path, tmp_path: Path):
    (tmp_path / "out").mkdir()
    done = _run("deface", phantom, tmp_path / "out")
    assert done.returncode == 2 and "already exists (use --overwrite)" in done.stderr
    done = _run("deface", phantom, tmp_path / "o2", "--fill", "lots")
    assert done.returncode == 2 and "fill" in done.stderr
    assert not (tmp_path / "o2").exists()


def test_missing_nnunet_model_is_a_clear_error(phantom: Path, tmp_path: Path):
    env = _env()
    env["DEFACEGATE_DEFACE__MODELS_ROOT"] = str(tmp_path / "no-models")
    done = _run("deface", phantom, tmp_path / "out", "--engine", "nnunet", env=env)
    assert done.returncode == 1
    assert "engine" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_command_line_options_override_settings():
    from gateway.cli import build_parser
    from gateway.commands.deface import apply_overrides
    from gateway.config import Settings
    from gateway.pipeline import engine_from_settings

    parser, _ = build_parser()
    args = parser.parse_args(
        ["deface", "in", "out", "--fill", "p10", "--bone", "remove", "--allow-gaps"]
    )
    base = Settings()
    settings = apply_overrides(args, base)
    assert (settings.deface.fill, settings.deface.bone) == ("p10", "remove")
    assert settings.volume.allow_gaps and not base.volume.allow_gaps
    assert settings.deface.engine == "anatomical"  # not given: the configured value stays
    engine = engine_from_settings(settings.deface)
    assert engine.name == "anatomical" and engine.options.bone == "remove"


def test_output_equal_to_input_is_refused(phantom: Path):
    done = _run("deface", phantom, phantom, "--overwrite")
    assert done.returncode == 2 and "must not be INPUT" in done.stderr
    assert (phantom / "dicom").is_dir()
