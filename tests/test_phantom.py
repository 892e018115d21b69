"""The synthetic head-and-neck CTA phantom: options, HU, ground truth, geometry, DICOM output."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from gateway.cli import main as cli_main
from inference.geometry import ANTERIOR
from inference.phantom import PhantomOptions, generate_phantom, load_ground_truth, write_phantom
from inference.phantom.generate import rotation
from tests.support.phantom import cached_phantom, hu_at

SMALL = {"matrix": 96, "slice_thickness": 2.5, "noise": 0.0}


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("yaw", 25.0, "yaw"),
        ("pitch", -21.0, "pitch"),
        ("roll", 40.0, "roll"),
        ("tilt", 45.0, "tilt"),
        ("slice_thickness", 0.2, "slice_thickness"),
        ("slice_thickness", 6.0, "slice_thickness"),
        ("matrix", 1024, "matrix"),
        ("n_slices", 601, "n_slices"),
        ("pixel_spacing", 5.0, "pixel_spacing"),
        ("noise", -1.0, "noise"),
        ("eye_shield", "gold", "eye_shield"),
        ("fov", "body", "fov"),
        ("seed", -3, "seed"),
    ],
)
def test_out_of_range_options_are_rejected_by_name(option: str, value: object, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        PhantomOptions(**{option: value})  # type: ignore[arg-type]


def test_integer_like_options_are_accepted_and_bools_are_not() -> None:
    assert PhantomOptions(seed=np.int64(3), matrix=np.int32(64)).seed == 3  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="matrix"):
        PhantomOptions(matrix=True)
    with pytest.raises(ValueError, match="n_slices"):
        PhantomOptions(n_slices=12.5)  # type: ignore[arg-type]


def test_same_seed_same_arrays_other_seed_other_anatomy() -> None:
    a = generate_phantom(PhantomOptions(seed=7, matrix=64, slice_thickness=4.0, fov="head"))
    b = generate_phantom(PhantomOptions(seed=7, matrix=64, slice_thickness=4.0, fov="head"))
    c = generate_phantom(PhantomOptions(seed=8, matrix=64, slice_thickness=4.0, fov="head"))
    assert np.array_equal(a.hu, b.hu)
    assert np.array_equal(a.facemask, b.facemask)
    assert np.array_equal(a.intracranial, b.intracranial)
    assert not np.array_equal(a.hu, c.hu)
    assert a.facemask.sum() != c.facemask.sum()


def test_tissues_have_their_hu_at_known_points() -> None:
    ph = cached_phantom(**SMALL)
    assert hu_at(ph, (0, -120, 60)) == pytest.approx(-1000, abs=1)  # air in front
    assert 28 <= hu_at(ph, (20, 30, 55)) <= 40  # white/grey matter
    assert 5 <= hu_at(ph, (9, 8, 42)) <= 12  # lateral ventricle CSF
    assert hu_at(ph, (0, 8, 30 + 94 - 3)) >= 500  # vault
    assert hu_at(ph, (31.5, -67.5, 13)) == pytest.approx(10, abs=8)  # vitreous
    assert hu_at(ph, (-26, -62, -9)) < -900  # maxillary sinus air
    assert hu_at(ph, (0, -55, -2)) > 1000 or hu_at(ph, (6, -55, -2)) < -900  # nasal cavity
    assert 250 <= hu_at(ph, (22, -10, -180)) <= 310  # common carotid, contrast
    assert hu_at(ph, (0, -24, -200)) < -900  # trachea
    assert hu_at(ph, (0, 22.5, -150)) < 40  # spinal canal: cord / CSF, not bone


def test_teeth_lens_and_skin_layers() -> None:
    ph = cached_phantom(matrix=192, slice_thickness=1.0, fov="head", noise=0.0)
    assert max(hu_at(ph, (x, -84.0, -41.0)) for x in (-3.0, 3.0)) >= 1500  # incisor
    assert hu_at(ph, (31.5, -76.5, 15)) >= 60  # lens
    # Along the forehead, from outside inwards: air, skin, fat, ..., bone.
    profile = [hu_at(ph, (0.0, y, 60.0)) for y in np.arange(-100.0, -70.0, 0.5)]
    assert profile[0] < -900
    assert min(profile) <= -60  # subcutaneous fat
    assert max(profile) >= 700  # frontal bone


def test_facemask_is_plausible_and_never_intracranial() -> None:
    ph = cached_phantom(**SMALL)
    mask, brain = ph.facemask, ph.intracranial
    voxel_ml = abs(np.linalg.det(ph.geometry.affine[:3, :3])) / 1000.0
    assert 150 <= mask.sum() * voxel_ml <= 600
    assert 1100 <= brain.sum() * voxel_ml <= 1800
    assert not np.any(mask & brain)
    # Every mask voxel is soft tissue (or on its anti-aliased edge), in front of the ears.
    assert np.median(ph.hu[mask]) > -200
    pts = ph.geometry.index_to_patient(np.argwhere(mask))
    head = pts @ np.linalg.inv(ph.head_to_patient).T
    assert head[:, 1].max() < -5  # anterior to the temporomandibular joints
    assert head[:, 2].max() <= 62 and head[:, 2].min() >= -103
    # The nose, lips and eyelids are in the mask.
    for name in ("nose_tip", "stomion"):
        p = ph.landmarks[name] - 4.0 * (ph.head_to_patient @ ANTERIOR) / 1.0
        assert mask[tuple(np.rint(ph.geometry.patient_to_index(p)).astype(int))], name


@pytest.mark.parametrize(
    "options",
    [
        {"yaw": 15.0, "pitch": -10.0, "roll": 8.0},
        {"tilt": 15.0},
        {"yaw": -20.0, "tilt": -10.0, "slice_thickness": 1.5},
    ],
)
def test_rotated_and_tilted_geometry_is_consistent(options: dict[str, float]) -> None:
    base = {"matrix": 128, "slice_thickness": 2.0, "noise": 0.0, "fov": "head"}
    ph = generate_phantom(PhantomOptions(**{**base, **options}))  # type: ignore[arg-type]
    ref = cached_phantom(matrix=128, slice_thickness=2.0, noise=0.0, fov="head")
    assert ph.geometry.tilt_degrees == pytest.approx(abs(options.get("tilt", 0.0)), abs=1e-6)
    assert ph.geometry.slice_spacing == pytest.approx(ph.options.slice_thickness, abs=1e-6)
    expected_rot = rotation(ph.options)
    assert np.allclose(ph.head_to_patient / np.linalg.norm(ph.head_to_patient[:, 0]), expected_rot)
    anterior = expected_rot @ ANTERIOR
    tip = ph.landmarks["nose_tip"]

    # Nose tip: tissue just inside, air just in front, in the rotated anterior direction.
    def hu(p: np.ndarray) -> float:
        idx = ph.geometry.patient_to_index(p)
        return float(ndimage.map_coordinates(ph.hu, idx.reshape(3, 1), order=1)[0])

    assert hu(tip - 2.5 * anterior) > -300
    assert hu(tip + 3.0 * anterior) < -900

    # Same anatomy through another sampling grid: similar ground-truth volumes.
    def ml(m: np.ndarray, p: object) -> float:
        voxel = abs(np.linalg.det(p.geometry.affine[:3, :3]))  # type: ignore[attr-defined]
        return float(m.sum() * voxel / 1000.0)

    assert ml(ph.facemask, ph) == pytest.approx(ml(ref.facemask, ref), rel=0.02)
    assert ml(ph.intracranial, ph) == pytest.approx(ml(ref.intracranial, ref), rel=0.01)


def test_eye_shield_tube_and_head_holder() -> None:
    ph = generate_phantom(
        PhantomOptions(
            matrix=128,
            slice_thickness=2.0,
            noise=0.0,
            fov="head_neck",
            eye_shield="metal",
            tube=True,
            head_holder=True,
        )
    )
    lead = generate_phantom(
        PhantomOptions(
            matrix=128, slice_thickness=2.0, noise=0.0, fov="head", eye_shield="leadglass"
        )
    )
    assert (ph.hu >= 2900).sum() > 50  # metal shield
    assert ((lead.hu >= 1400) & (lead.hu <= 1600)).sum() > 50  # lead glass
    # The shield is separated from the skin by air: it is its own connected component.
    body = ph.hu > -500
    lab, _ = ndimage.label(body)
    shield = ph.hu >= 2900
    head_label = np.bincount(lab[body]).argmax() if body.any() else -1
    assert not np.any(lab[shield] == head_label)
    # Tube: air lumen inside a ~100 HU wall in front of the mouth.
    tip = ph.head_to_patient @ np.array([0.0, -118.0, -42.75])  # on TUBE_PATH
    idx = np.rint(ph.geometry.patient_to_index(tip)).astype(int)
    assert ph.hu[tuple(idx)] < -900
    ring = ph.hu[idx[0] - 1 : idx[0] + 2, idx[1] - 5 : idx[1] + 6, idx[2] - 5 : idx[2] + 6]
    assert ring.max() > -400  # the 1.5 mm plastic wall, partial-volumed at 2 mm voxels
    # Head holder: dense voxels behind the head, not attached to it.
    holder = (ph.hu >= 150) & (lab != head_label) & ~shield
    assert holder.sum() > 200
    assert not np.any(ph.facemask & shield) or ph.facemask[shield].mean() > 0.3


def test_write_phantom_round_trips_series_and_ground_truth(tmp_path) -> None:
    ph = cached_phantom(matrix=64, slice_thickness=5.0, fov="head", phi=True)
    dicom_dir = write_phantom(ph, tmp_path / "out")
    files = sorted(dicom_dir.glob("*.dcm"))
    assert len(files) == ph.hu.shape[0]
    assert dicom_dir == tmp_path / "out" / "dicom"
    datasets = [pydicom.dcmread(f) for f in files]
    datasets.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    vol = np.stack(
        [d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets]
    )
    expected = np.clip(np.rint(ph.hu), -1024, 3071)
    assert np.array_equal(vol, expected)
    assert {d.SeriesInstanceUID for d in datasets} == {datasets[0].SeriesInstanceUID}
    assert ph.planted_phi and any(p in str(datasets[0]) for p in ph.planted_phi)
    mask, brain = load_ground_truth(tmp_path / "out")
    assert np.array_equal(mask, ph.facemask) and np.array_equal(brain, ph.intracranial)
    meta = json.loads((tmp_path / "out" / "phantom.json").read_text())
    assert meta["options"]["phi"] is True and meta["shape"] == list(ph.hu.shape)
    assert not list(dicom_dir.glob("*.nii.gz"))


def test_cli_writes_series_and_rejects_bad_options(tmp_path, capsys) -> None:
    out = tmp_path / "p"
    rc = cli_main(
        [
            "phantom",
            str(out),
            "--seed",
            "2",
            "--matrix",
            "48",
            "--slice-thickness",
            "5",
            "--fov",
            "head",
            "--yaw",
            "10",
            "--json",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["instances"] == len(list((out / "dicom").glob("*.dcm"))) > 0
    assert (out / "facemask.nii.gz").exists()
    rc = cli_main(["phantom", str(tmp_path / "q"), "--yaw", "30"])
    assert rc == 2
    assert "yaw" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_slice_count_and_fov() -> None:
    head = PhantomOptions(fov="head", slice_thickness=1.0)
    from inference.phantom.generate import scanner_geometry

    assert scanner_geometry(head).shape[0] == 278
    assert scanner_geometry(PhantomOptions(slice_thickness=0.5)).shape[0] == 600
    assert scanner_geometry(PhantomOptions(n_slices=300, matrix=512)).shape == (300, 512, 512)
    assert scanner_geometry(PhantomOptions(pixel_spacing=0.5, matrix=64)).spacing[1] == 0.5


def test_face_detector_fires_on_the_rendered_skin_surface() -> None:
    """Issue 6: the phantom's face must look like a face to dlib: the front view above the
    audit's gate threshold, the ±30° views above dlib's own threshold."""
    from inference.audit.detect import detect_faces
    from inference.audit.render import render_views
    from inference.audit.report import DETECT_THRESHOLD

    ph = cached_phantom(matrix=128, slice_thickness=2.0, fov="head")
    views = render_views(ph.hu, ph.geometry, (-30.0, 0.0, 30.0), 512)
    scores = []
    for view in views:
        faces = detect_faces(view.image, 0, report_above=-1.0)
        scores.append(faces[0].score if faces else -1.0)
    assert scores[1] > DETECT_THRESHOLD
    assert scores[0] > 0.0 and scores[2] > 0.0
