"""nnU-Net engine: real nnunetv2 predictor on a tiny valid model folder built in set-up."""

from __future__ import annotations

import json
import logging
import shutil
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from gateway.cli import main as cli_main
from gateway.config import load_settings
from gateway.pipeline import engine_from_settings
from inference.engines import FacemaskEngine
from inference.engines.anatomical import AnatomicalEngine, face_region
from inference.engines.nnunet import (
    NnUNetEngine,
    NnUNetOptions,
    anatomical_guide,
    physical_spacing,
    postprocess,
    reorientation,
)
from inference.engines.roi import box_mask, escaping_sides, union
from inference.errors import FacemaskError, ModelError
from inference.geometry import Geometry
from inference.models import (
    install_model,
    resolve_model_dir,
    resolve_training_dir,
    validate_training_dir,
)
from inference.phantom import Phantom, PhantomOptions, generate_phantom
from tests.support.nnunet_model import build_model_folder, synthetic_geometry, synthetic_head

SHAPE = (40, 48, 48)  # 2x2x2 patches of 32^3 at 2 mm: small but a real sliding window


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_folder(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="module")
def head() -> tuple[np.ndarray, np.ndarray, Geometry]:
    hu, label = synthetic_head(SHAPE, seed=7)
    return hu, label.astype(bool), synthetic_geometry(SHAPE)


@pytest.fixture(scope="module")
def full_engine(model_dir: Path) -> NnUNetEngine:
    return NnUNetEngine(model_dir, NnUNetOptions(roi=False))


@pytest.fixture(scope="module")
def full_prediction(
    full_engine: NnUNetEngine, head: tuple[np.ndarray, np.ndarray, Geometry]
) -> np.ndarray:
    hu, _, geometry = head
    return full_engine.predict(hu, geometry)


ANTERIOR = (slice(4, 36), slice(0, 20), slice(20, 48))
#: The ROI exactly as the guide says: no margin, one box.
EXACT = NnUNetOptions(roi=True, roi_margin_mm=0.0, roi_max_crops=1)


def anterior_roi(hu: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Stand-in for the anatomical facemask: the anterior-left part of the volume."""
    return box_mask(hu.shape, ANTERIOR)


# -- engine ------------------------------------------------------------------------------------


def test_engine_loads_once_on_cpu_and_satisfies_protocol(full_engine: NnUNetEngine) -> None:
    assert isinstance(full_engine, FacemaskEngine)
    assert full_engine.device == "cpu" and full_engine.tta is False  # mirroring off on CPU
    assert full_engine._predictor.use_mirroring is False
    assert full_engine.info.face_label == 1 and full_engine.info.configuration == "3d_fullres"
    assert torch.get_num_threads() >= 1


def test_full_volume_prediction_matches_the_known_answer(
    head: tuple[np.ndarray, np.ndarray, Geometry], full_prediction: np.ndarray
) -> None:
    hu, label, _ = head
    assert full_prediction.dtype == np.bool_ and full_prediction.shape == hu.shape
    assert dice(full_prediction, label) > 0.85


def test_mask_postprocessing_keeps_one_component_and_grows_only_into_air(
    full_engine: NnUNetEngine, head: tuple[np.ndarray, np.ndarray, Geometry]
) -> None:
    hu, label, geometry = head
    mask = full_engine.mask(hu, geometry)
    assert mask.dtype == np.bool_ and mask.shape == hu.shape
    from scipy import ndimage

    assert ndimage.label(mask)[1] == 1
    raw = full_engine.predict(hu, geometry)
    added = mask & ~raw
    assert added.any() and (hu[added] <= -500).all()  # dilation took air only
    assert dice(mask, label) > 0.8


def test_postprocess_picks_largest_component_and_limits_growth() -> None:
    hu = np.full((20, 20, 20), -1000.0)
    hu[2:6, 2:6, 2:6] = 40  # small blob
    hu[10:18, 10:18, 10:18] = 40  # big blob
    hu[9, 10:18, 10:18] = 800  # bone next to the big blob: must not be grown into
    face = hu > 0
    face[9] = False
    out = postprocess(face, hu, np.array([1.0, 1.0, 1.0]), dilate_mm=1.0)
    assert not out[2:6, 2:6, 2:6].any()
    assert out[10:18, 10:18, 10:18].all()
    assert out[18, 12, 12] and not out[9].any()
    with pytest.raises(FacemaskError):
        postprocess(np.zeros_like(face), hu, np.ones(3))


def test_roi_paste_back_position_and_agreement_with_full_volume(
    model_dir: Path,
    head: tuple[np.ndarray, np.ndarray, Geometry],
    full_prediction: np.ndarray,
) -> None:
    hu, label, geometry = head
    engine = NnUNetEngine(model_dir, EXACT, roi_fn=anterior_roi)
    crops = engine.crops(hu, geometry)
    assert crops is not None and len(crops) == 1
    region = crops[0]
    # grown to at least one 32-voxel patch along rows (2 mm spacing, 32 × 2 mm patch)
    assert region[1].stop - region[1].start == 32 and region[1].start == 0
    assert region[0] == slice(4, 36) and region[2] == slice(16, 48)
    roi_pred = engine.predict(hu, geometry, region)
    inside = np.zeros(hu.shape, bool)
    inside[region] = True
    assert not roi_pred[~inside].any()  # nothing outside the crop
    # right place: agrees with the truth and with the full-volume run inside the crop
    assert dice(roi_pred[region], label[region]) > 0.85
    assert dice(roi_pred[region], full_prediction[region]) > 0.9
    # a shifted paste-back would not agree
    shifted = np.roll(roi_pred, 3, axis=2)
    assert dice(shifted[region], label[region]) < dice(roi_pred[region], label[region]) - 0.05
    # the face continues outside this crop: mask() grows it until the prediction is inside
    face, grown = engine.predict_face(hu, geometry)
    assert grown is not None and len(grown) == 1 and escaping_sides(face, grown) == []
    final = grown[0]
    assert all(f.start <= r.start and f.stop >= r.stop for f, r in zip(final, region, strict=True))
    assert final != region
    assert dice(face[final], full_prediction[final]) > 0.9


def test_roi_around_the_whole_head_is_kept_and_mask_stays_inside(
    model_dir: Path, head: tuple[np.ndarray, np.ndarray, Geometry]
) -> None:
    hu, label, geometry = head
    idx = np.nonzero(label)
    box = tuple(
        slice(max(0, int(i.min()) - 2), min(n, int(i.max()) + 3))
        for i, n in zip(idx, SHAPE, strict=True)
    )
    engine = NnUNetEngine(model_dir, EXACT, roi_fn=lambda h, g: box_mask(h.shape, box))  # type: ignore[arg-type]
    face, crops = engine.predict_face(hu, geometry)
    assert crops == engine.crops(hu, geometry) and crops is not None  # no growth needed
    final = crops[0]
    outside = np.ones(SHAPE, bool)
    outside[final] = False
    assert not face[outside].any()
    assert dice(face, label) > 0.85
    mask = engine.mask(hu, geometry)
    near = np.zeros(SHAPE, bool)
    near[tuple(slice(max(0, s.start - 1), s.stop + 1) for s in final)] = True
    assert mask.any() and not mask[~near].any()  # only the 2 mm dilation may leave the crop


def test_unlocalised_face_falls_back_to_the_full_volume(
    model_dir: Path,
    head: tuple[np.ndarray, np.ndarray, Geometry],
    full_prediction: np.ndarray,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A wrong ROI may cost time, never a face: no localisation → the whole volume."""
    hu, _, geometry = head

    def no_face(hu: np.ndarray, geometry: Geometry) -> np.ndarray:
        raise FacemaskError("landmarks not found")

    engine = NnUNetEngine(model_dir, roi_fn=no_face)
    with caplog.at_level(logging.WARNING, logger="inference.engines.nnunet"):
        face, region = engine.predict_face(hu, geometry)
    assert region is None
    np.testing.assert_array_equal(face, full_prediction)
    assert "landmarks not found" in caplog.text and "full volume" in caplog.text


def test_default_roi_chain_on_a_volume_without_face_landmarks(
    model_dir: Path, full_engine: NnUNetEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """The real anatomical engine and face_region both fail on this synthetic head (no
    eyes): the default chain predicts the full volume (failing closed stays the network's
    call: an empty prediction raises, see the post-processing test)."""
    hu, _ = synthetic_head(SHAPE, seed=3)
    geometry = synthetic_geometry(SHAPE)
    engine = NnUNetEngine(model_dir)  # default ROI: anatomical facemask → face_region → all
    with caplog.at_level(logging.WARNING, logger="inference.engines.nnunet"):
        assert engine.crops(hu, geometry) is None
    assert "anatomical facemask failed" in caplog.text and "full volume" in caplog.text
    face, region = engine.predict_face(hu, geometry)
    assert region is None and face.any()
    np.testing.assert_array_equal(face, full_engine.predict(hu, geometry))


# -- orientation and spacing fed to nnU-Net ----------------------------------------------------


def _geometry(
    rows_towards: str,
    slices_up: bool,
    spacing: tuple[float, float, float],
    shape: tuple[int, int, int] = (4, 5, 6),
) -> Geometry:
    col_dir = [0.0, 1.0, 0.0] if rows_towards == "P" else [0.0, -1.0, 0.0]
    step = [0.0, 0.0, spacing[0] if slices_up else -spacing[0]]
    return Geometry.from_dicom(
        image_position=np.zeros(3),
        image_orientation=np.array([1.0, 0, 0, *col_dir]),
        pixel_spacing=(spacing[1], spacing[2]),
        slice_step=np.array(step),
        shape=shape,
    )


def _sagittal(
    spacing: tuple[float, float, float], shape: tuple[int, int, int] = (4, 5, 6)
) -> Geometry:
    """Sagittal: slices go left, rows inferior, columns anterior."""
    return Geometry.from_dicom(
        image_position=np.zeros(3),
        image_orientation=np.array([0, -1.0, 0, 0, 0, -1.0]),
        pixel_spacing=(spacing[1], spacing[2]),
        slice_step=np.array([spacing[0], 0, 0]),
        shape=shape,
    )


def test_model_input_axis_order_and_spacing(full_engine: NnUNetEngine) -> None:
    vol = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    # DICOM axial: rows go posterior, columns left, slices superior → SAL flips the rows only
    g = _geometry("P", True, (3.0, 0.5, 0.7))
    image, props = full_engine.model_input(vol, g)
    assert image.shape == (1, 4, 5, 6) and image.dtype == np.float32
    np.testing.assert_array_equal(image[0], vol[:, ::-1, :])
    assert props == {"spacing": [3.0, 0.5, 0.7]}
    # slices stored superior → inferior: axis 0 flipped as well
    image2, _ = full_engine.model_input(vol, _geometry("P", False, (3.0, 0.5, 0.7)))
    np.testing.assert_array_equal(image2[0], vol[::-1, ::-1, :])
    # sagittal: slices go left, rows inferior, columns anterior → transposed, rows flipped
    sag = _sagittal((2.0, 0.5, 0.7))
    reo = reorientation(sag, "SAL")
    assert reo.perm == (1, 2, 0) and reo.flips == (True, False, False)
    image3, props3 = full_engine.model_input(vol, sag)
    assert image3.shape == (1, 5, 6, 4) and props3["spacing"] == [0.5, 0.7, 2.0]
    np.testing.assert_array_equal(reo.backward(reo.forward(vol)), vol)
    assert reorientation(sag, "native").perm == (0, 1, 2)
    with pytest.raises(ValueError):
        NnUNetOptions(axes="SAP")


def test_same_anatomy_stored_differently_gives_the_same_mask(
    full_engine: NnUNetEngine,
    head: tuple[np.ndarray, np.ndarray, Geometry],
    full_prediction: np.ndarray,
) -> None:
    hu, _, g = head
    # Same patient, rows stored anterior→posterior reversed and slices top-down.
    flipped = np.ascontiguousarray(hu[::-1, ::-1, :])
    affine = g.affine.copy()
    affine[:3, 3] = g.index_to_patient(np.array([SHAPE[0] - 1, SHAPE[1] - 1, 0]))
    affine[:3, 0] *= -1
    affine[:3, 1] *= -1
    g2 = Geometry(affine=affine, shape=SHAPE)
    np.testing.assert_allclose(g2.index_to_patient([0, 0, 0]), g.index_to_patient([39, 47, 0]))
    pred2 = full_engine.predict(flipped, g2)
    np.testing.assert_array_equal(pred2, full_prediction[::-1, ::-1, :])
    assert physical_spacing(g2).tolist() == [2.0, 2.0, 2.0]


# -- model folder validation -------------------------------------------------------------------


def _copy_model(model_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / model_dir.parent.name / model_dir.name
    shutil.copytree(model_dir, dest)
    return dest


def _edit_json(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_missing_checkpoint(model_dir: Path, tmp_path: Path) -> None:
    m = _copy_model(model_dir, tmp_path)
    (m / "fold_all" / "checkpoint_final.pth").unlink()
    with pytest.raises(ModelError, match="missing checkpoint"):
        validate_training_dir(m)
    with pytest.raises(ModelError, match="missing checkpoint"):
        NnUNetEngine(m)


def test_wrong_layout(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="wrong layout"):
        resolve_training_dir(tmp_path)  # empty folder
    m = _copy_model(model_dir, tmp_path)
    bad = m.with_name("nnUNetTrainer_3d_fullres")
    m.rename(bad)
    with pytest.raises(ModelError, match="wrong layout"):
        validate_training_dir(bad)
    (bad / "plans.json").unlink()
    with pytest.raises(ModelError, match="wrong layout"):
        NnUNetEngine(bad.parent)
    m2 = _copy_model(model_dir, tmp_path / "x")
    _edit_json(m2 / "plans.json", lambda p: p["configurations"].pop("3d_fullres"))
    with pytest.raises(ModelError, match="no configuration '3d_fullres'"):
        validate_training_dir(m2)


def test_wrong_label_names(model_dir: Path, tmp_path: Path) -> None:
    m = _copy_model(model_dir, tmp_path)
    _edit_json(
        m / "dataset.json", lambda d: d.update(labels={"background": 0, "brain": 1, "skull": 2})
    )
    with pytest.raises(ModelError, match="wrong label names"):
        validate_training_dir(m)
    _edit_json(m / "dataset.json", lambda d: d.update(labels={"bg": 0, "face": 1}))
    with pytest.raises(ModelError, match="wrong label names"):
        validate_training_dir(m)
    _edit_json(m / "dataset.json", lambda d: d.update(labels={"background": 0, "face": 1}))
    with pytest.raises(ModelError, match="wrong label names"):
        validate_training_dir(m, face_label="facemask")
    # two labels, one of them recognisably the face: accepted, and that one is used
    _edit_json(
        m / "dataset.json", lambda d: d.update(labels={"background": 0, "skull": 1, "Face": 2})
    )
    assert validate_training_dir(m, load_checkpoint=False).face_label == 2


def test_checkpoint_not_from_nnunet_or_other_configuration(model_dir: Path, tmp_path: Path) -> None:
    m = _copy_model(model_dir, tmp_path)
    ckpt = m / "fold_all" / "checkpoint_final.pth"
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot be read"):
        validate_training_dir(m)
    with pytest.raises(ModelError, match="could not load"):
        NnUNetEngine(m)
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(ModelError, match="not an nnU-Net v2 checkpoint"):
        validate_training_dir(m)
    good = torch.load(model_dir / "fold_all" / "checkpoint_final.pth", weights_only=False)
    good["init_args"]["configuration"] = "2d"
    torch.save(good, ckpt)
    with pytest.raises(ModelError, match="configuration '2d'"):
        validate_training_dir(m)


# -- install / list (library and CLI) ----------------------------------------------------------


def _zip_dir(src: Path, archive: Path, prefix: str) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(src.rglob("*")):
            zf.write(p, f"{prefix}/{p.relative_to(src)}")
    return archive


def test_install_round_trip_via_cli(
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    head: tuple[np.ndarray, np.ndarray, Geometry],
    full_prediction: np.ndarray,
) -> None:
    root = tmp_path / "models"
    monkeypatch.setenv("DEFACEGATE_DEFACE__MODELS_ROOT", str(root))
    archive = _zip_dir(model_dir.parent, tmp_path / "cta-deface.zip", "results/Dataset999_TinyFace")
    assert cli_main(["models", "install", str(archive)]) == 0
    installed = Path(capsys.readouterr().out.strip())
    assert installed == root / "Dataset999_TinyFace" / model_dir.name
    assert (installed / "fold_all" / "checkpoint_final.pth").is_file()
    assert [p.name for p in root.iterdir()] == ["Dataset999_TinyFace"]  # no staging left

    assert cli_main(["models", "install", str(archive)]) == 1  # already installed
    assert "already installed" in capsys.readouterr().err
    assert cli_main(["models", "install", str(archive), "--force"]) == 0
    capsys.readouterr()

    assert cli_main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("* Dataset999_TinyFace") and "'face'=1" in out

    settings = load_settings(deface={"engine": "nnunet", "models_root": root})
    engine = engine_from_settings(settings.deface)
    assert isinstance(engine, NnUNetEngine)
    assert engine.options.roi is True and engine.options.axes == "SAL"
    hu, _, geometry = head
    np.testing.assert_array_equal(engine.predict(hu, geometry), full_prediction)

    # a directory installs too, under another name; then the choice is ambiguous
    assert cli_main(["models", "install", str(model_dir.parent), "--name", "second"]) == 0
    capsys.readouterr()
    with pytest.raises(ModelError, match="2 models installed"):
        engine_from_settings(settings.deface)
    chosen = load_settings(deface={"models_root": root, "model_dir": root / "second"})
    assert resolve_model_dir(chosen.deface.model_dir, root) == root / "second" / model_dir.name


def test_install_rejects_zip_slip_links_and_invalid_models(model_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("Dataset1_X/../../escaped.txt", "x")
    with pytest.raises(ModelError, match="unsafe path"):
        install_model(evil, root)
    assert not (tmp_path / "escaped.txt").exists()

    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("Dataset1_X/plans.json")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(ModelError, match="symbolic link"):
        install_model(link, root)

    broken = _copy_model(model_dir, tmp_path / "broken")
    (broken / "fold_all" / "checkpoint_final.pth").unlink()
    with pytest.raises(ModelError, match="missing checkpoint"):
        install_model(broken.parent, root)
    with pytest.raises(ModelError, match="neither a folder nor a zip"):
        install_model(_write(tmp_path / "m.txt"), root)
    assert [p.name for p in root.iterdir()] == []  # nothing half-installed
    with pytest.raises(ModelError, match="no nnU-Net model installed"):
        resolve_model_dir(None, root)


def _write(path: Path) -> Path:
    path.write_text("hello")
    return path


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return generate_phantom(PhantomOptions(matrix=128, n_slices=100, slice_thickness=2.0))


def _voxels(region: tuple[slice, ...]) -> int:
    return int(np.prod([s.stop - s.start for s in region]))


def _tiles_of(engine: NnUNetEngine, crops: list[tuple[slice, slice, slice]], g: Geometry) -> int:
    cost = engine.tile_cost(g)
    return sum(
        cost((r[0].stop - r[0].start, r[1].stop - r[1].start, r[2].stop - r[2].start))
        for r in crops
    )


def test_default_roi_covers_the_anatomical_facemask_in_fewer_tiles(
    model_dir: Path, phantom: Phantom
) -> None:
    hu, g = phantom.hu, phantom.geometry
    engine = NnUNetEngine(model_dir, NnUNetOptions(roi_margin_mm=10.0))
    crops = engine.crops(hu, g)
    assert crops is not None and len(crops) > 1
    covered = union(hu.shape, crops)
    facemask = AnatomicalEngine().mask(hu, g)
    assert covered[facemask].all() and covered[phantom.facemask].all()  # the whole face is in
    # fewer tiles than one box around the same facemask (which is what roi_max_crops=1 gives)
    one = NnUNetEngine(model_dir, NnUNetOptions(roi_margin_mm=10.0, roi_max_crops=1))
    one_box = one.crops(hu, g)
    assert one_box is not None and len(one_box) == 1
    assert _tiles_of(engine, crops, g) < _tiles_of(one, one_box, g)
    # and far fewer than the former default (landmark face_region + 15 mm, one box)
    before = engine.fit_tile_grid(face_region(hu, g, margin_mm=15.0), g)
    assert covered.sum() < 0.5 * _voxels(before)
    assert 2 * _tiles_of(engine, crops, g) < _tiles_of(engine, [before], g)


def test_multi_crop_prediction_is_pasted_where_the_full_volume_run_puts_it(
    model_dir: Path, phantom: Phantom
) -> None:
    """Each crop's prediction lands at its own place: on the face, the union of the crops'
    predictions agrees with nnU-Net's sliding window over the whole volume."""
    hu, g = phantom.hu, phantom.geometry
    engine = NnUNetEngine(model_dir, NnUNetOptions(roi_margin_mm=10.0))
    crops = engine.crops(hu, g)
    assert crops is not None and len(crops) > 1
    face = engine.predict_crops(hu, g, crops)
    full = engine.predict(hu, g)
    facemask = phantom.facemask
    assert (face[facemask] == full[facemask]).mean() > 0.9
    assert dice(face & facemask, full & facemask) > 0.945  # 2 voxels off: ≤ 0.93


class _FailingEngine:
    name = "failing"

    def mask(self, hu: np.ndarray, geometry: Geometry) -> np.ndarray:
        raise FacemaskError("stand-in anatomical engine failed")


class _EmptyEngine:
    name = "empty"

    def mask(self, hu: np.ndarray, geometry: Geometry) -> np.ndarray:
        return np.zeros(hu.shape, bool)


def test_anatomical_guide_falls_back_to_the_landmark_face_region(phantom: Phantom) -> None:
    hu, g = phantom.hu, phantom.geometry
    landmark_box = box_mask(hu.shape, face_region(hu, g, margin_mm=0.0))
    np.testing.assert_array_equal(anatomical_guide(hu, g, engine=_FailingEngine()), landmark_box)
    np.testing.assert_array_equal(anatomical_guide(hu, g, engine=_EmptyEngine()), landmark_box)
    # and with a working engine it is the facemask itself, a thin shell
    shell = anatomical_guide(hu, g)
    np.testing.assert_array_equal(shell, AnatomicalEngine().mask(hu, g))
    assert shell.sum() < 0.3 * landmark_box.sum()


def test_multi_crop_roi_grows_the_crop_the_face_leaves(
    model_dir: Path,
    head: tuple[np.ndarray, np.ndarray, Geometry],
    full_prediction: np.ndarray,
) -> None:
    """Two small guide boxes far apart: two crops; the network's label (all soft tissue)
    leaves them, so they grow until nothing leaves the covered volume."""
    hu, _, geometry = head

    def two_spots(hu: np.ndarray, geometry: Geometry) -> np.ndarray:
        guide = box_mask(hu.shape, (slice(2, 6), slice(2, 6), slice(2, 6)))
        guide[34:38, 42:46, 42:46] = True
        return guide

    options = NnUNetOptions(roi_margin_mm=0.0, roi_grow_rounds=6)
    engine = NnUNetEngine(model_dir, options, roi_fn=two_spots)
    first = engine.crops(hu, geometry)
    assert first is not None and len(first) == 2
    face, grown = engine.predict_face(hu, geometry)
    assert grown is not None and escaping_sides(face, grown) == []
    covered = union(hu.shape, grown)
    assert covered.sum() > sum(_voxels(r) for r in first)
    assert dice(face[covered], full_prediction[covered]) > 0.85


def _nnunet_tiles(engine: NnUNetEngine, shape: tuple[int, ...], g: Geometry) -> int:
    """Tiles as nnU-Net itself computes them for a crop of ``shape`` (our axes)."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    image, props = engine.model_input(np.zeros(shape, np.float32), g)
    model_shape = compute_new_shape(image.shape[1:], props["spacing"], engine.info.spacing)
    padded = np.maximum(model_shape, engine.info.patch_size)
    steps = compute_steps_for_sliding_window(
        padded, engine.info.patch_size, engine.options.tile_step_size
    )
    return int(np.prod([len(s) for s in steps]))


@pytest.mark.parametrize("orientation", ["axial", "sagittal"])
def test_fit_tile_grid_grows_the_crop_for_free(full_engine: NnUNetEngine, orientation: str) -> None:
    """Largest crop with the same tile count: ≥ the request, same tiles as nnU-Net counts
    them, and one voxel more on any axis not at the volume border costs a tile."""
    shape = (150, 170, 190)
    # nnU-Net resamples both to the model's 2 mm; the sagittal one is also transposed
    if orientation == "axial":
        g = _geometry("P", True, (1.25, 0.7, 0.7), shape)
    else:
        g = _sagittal((1.5, 0.9, 1.1), shape)
    for roi in [
        (slice(40, 70), slice(30, 120), slice(10, 20)),
        (slice(0, 149), slice(60, 61), slice(100, 190)),
        (slice(5, 140), slice(0, 170), slice(50, 151)),
    ]:
        fitted = full_engine.fit_tile_grid(roi, g)
        size = tuple(s.stop - s.start for s in fitted)
        want = tuple(s.stop - s.start for s in roi)
        assert all(
            f.start <= r.start and f.stop >= r.stop for f, r in zip(fitted, roi, strict=True)
        )
        assert all(f.start >= 0 and f.stop <= n for f, n in zip(fitted, shape, strict=True))
        assert full_engine.tiles(size, g) == full_engine.tiles(want, g)
        n_tiles = int(np.prod(full_engine.tiles(size, g)))
        assert n_tiles == _nnunet_tiles(full_engine, size, g) == _nnunet_tiles(full_engine, want, g)
        grew = False
        for axis in range(3):
            grew |= size[axis] > want[axis]
            if size[axis] < shape[axis]:
                bigger = tuple(n + (a == axis) for a, n in enumerate(size))
                assert _nnunet_tiles(full_engine, bigger, g) > n_tiles
        assert grew
