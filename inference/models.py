"""Trained nnU-Net v2 model folders: find, validate, install and list them.

A model is nnU-Net's *results* layout, exactly as ``nnUNetv2_train`` writes it and as the
CTA-DEFACE authors distribute it::

    Dataset001_DEFACE/                                  <- "dataset folder"
      nnUNetTrainer__nnUNetPlans__3d_fullres/           <- "training folder"
        dataset.json  plans.json
        fold_all/checkpoint_final.pth

nnU-Net's predictor (``initialize_from_trained_model_folder``) is given the training folder.
Validation here fails early with a :class:`~inference.errors.ModelError` that names the
problem, so a broken download is caught at install time and not in a worker at 3 a.m.

Installing a model means trusting it: nnU-Net checkpoints are pickles and nnU-Net loads them
with ``torch.load(weights_only=False)``. Install only models from a source you trust.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from inference.errors import ModelError

CHECKPOINT_NAME = "checkpoint_final.pth"
DEFAULT_FOLD = "all"
DEFAULT_CONFIGURATION = "3d_fullres"
#: Foreground label names accepted as "the face" when a model has more than one label.
FACE_LABEL_NAMES = ("face", "facemask", "face_mask", "deface", "defacing", "mask")
#: Refuse archives that would unpack to more than this (zip bombs).
MAX_UNPACKED_BYTES = 8 * 1024**3
_CHECKPOINT_KEYS = ("network_weights", "trainer_name", "init_args")


@dataclass(frozen=True)
class ModelInfo:
    """A validated model: where it is and what nnU-Net will need from it."""

    training_dir: Path
    dataset_name: str
    trainer: str
    plans_name: str
    configuration: str
    fold: str
    checkpoint: Path
    face_label: int
    face_label_name: str
    labels: dict[str, int]
    #: Target spacing of the configuration, in nnU-Net's (transposed) axis order, mm.
    spacing: tuple[float, ...]
    patch_size: tuple[int, ...]
    image_reader_writer: str
    transpose_forward: tuple[int, ...]

    @property
    def name(self) -> str:
        """Name under ``models_root`` (the dataset folder's name)."""
        return self.training_dir.parent.name


def _load_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ModelError(f"{what} missing: expected {path.name} in {path.parent}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{what} {path.name} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{what} {path.name} must be a JSON object")
    return data


def _split_training_dir_name(name: str) -> tuple[str, str, str]:
    parts = name.split("__")
    if len(parts) != 3 or not all(parts):
        raise ModelError(
            f"wrong layout: training folder {name!r} is not named "
            "TRAINER__PLANS__CONFIGURATION (e.g. nnUNetTrainer__nnUNetPlans__3d_fullres)"
        )
    return parts[0], parts[1], parts[2]


def _face_label(labels: dict[str, Any], wanted: str | None) -> tuple[str, int]:
    if int(labels.get("background", -1)) != 0:
        raise ModelError("wrong label names: dataset.json labels need 'background': 0")
    foreground: dict[str, int] = {}
    for name, value in labels.items():
        if name in ("background", "ignore"):
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise ModelError(
                f"wrong label names: label {name!r} is a region {value!r}; "
                "a facemask model needs integer labels"
            )
        foreground[name] = value
    if not foreground:
        raise ModelError("wrong label names: dataset.json has no foreground label")
    if wanted is not None:
        if wanted not in foreground:
            raise ModelError(
                f"wrong label names: face label {wanted!r} not among {sorted(foreground)}"
            )
        return wanted, foreground[wanted]
    if len(foreground) == 1:
        ((name, value),) = foreground.items()
        return name, value
    matches = [n for n in foreground if n.lower() in FACE_LABEL_NAMES]
    if len(matches) != 1:
        raise ModelError(
            f"wrong label names: cannot tell the face label among {sorted(foreground)}; "
            f"expected exactly one of {list(FACE_LABEL_NAMES)}"
        )
    return matches[0], foreground[matches[0]]


def validate_training_dir(
    training_dir: Path,
    *,
    fold: str = DEFAULT_FOLD,
    checkpoint_name: str = CHECKPOINT_NAME,
    face_label: str | None = None,
    load_checkpoint: bool = True,
) -> ModelInfo:
    """Check one training folder the way nnU-Net's predictor will use it.

    ``load_checkpoint`` also opens the checkpoint (CPU) and checks nnU-Net's keys and that
    the network weights match the configuration; skip it for a quick listing.
    """
    training_dir = Path(training_dir)
    if not training_dir.is_dir():
        raise ModelError(f"model folder not found: {training_dir}")
    trainer, plans_name, configuration = _split_training_dir_name(training_dir.name)
    dataset_json = _load_json(training_dir / "dataset.json", "dataset.json")
    plans = _load_json(training_dir / "plans.json", "plans.json")

    labels = dataset_json.get("labels")
    if not isinstance(labels, dict):
        raise ModelError("wrong label names: dataset.json has no 'labels' mapping")
    face_name, face_value = _face_label(labels, face_label)
    channels = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not isinstance(channels, dict) or len(channels) != 1:
        raise ModelError("dataset.json must declare exactly one input channel (the CT)")

    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or configuration not in configurations:
        raise ModelError(
            f"wrong layout: plans.json has no configuration {configuration!r} "
            "named by the training folder"
        )
    config = configurations[configuration]
    if "inherits_from" in config:  # nnU-Net resolves inheritance; we only need 3 fields
        parent = configurations.get(config["inherits_from"], {})
        config = {**parent, **config}
    patch_size = tuple(int(p) for p in config.get("patch_size", ()))
    spacing = tuple(float(s) for s in config.get("spacing", ()))
    if len(patch_size) != 3 or len(spacing) != 3:
        raise ModelError(
            f"configuration {configuration!r} is not 3D (patch_size {list(patch_size)}); "
            "a facemask model must be a 3d configuration"
        )
    if config.get("previous_stage") is not None:
        raise ModelError(f"configuration {configuration!r} is a cascade stage; not supported")

    checkpoint = training_dir / f"fold_{fold}" / checkpoint_name
    if not checkpoint.is_file():
        present = sorted(p.name for p in training_dir.glob("fold_*"))
        raise ModelError(
            f"missing checkpoint: fold_{fold}/{checkpoint_name} not found in "
            f"{training_dir.name} (folds present: {present or 'none'})"
        )
    info = ModelInfo(
        training_dir=training_dir.resolve(),
        dataset_name=str(plans.get("dataset_name", training_dir.parent.name)),
        trainer=trainer,
        plans_name=plans_name,
        configuration=configuration,
        fold=fold,
        checkpoint=checkpoint.resolve(),
        face_label=face_value,
        face_label_name=face_name,
        labels={k: v for k, v in labels.items() if isinstance(v, int)},
        spacing=spacing,
        patch_size=patch_size,
        image_reader_writer=str(plans.get("image_reader_writer", "SimpleITKIO")),
        transpose_forward=tuple(int(t) for t in plans.get("transpose_forward", (0, 1, 2))),
    )
    if load_checkpoint:
        _check_checkpoint(info)
    return info


def _check_checkpoint(info: ModelInfo) -> None:
    import torch  # heavy: only when a checkpoint is really opened

    try:
        # nnU-Net itself loads with weights_only=False (its checkpoints hold plain Python
        # objects); see the module docstring on trust.
        ckpt = torch.load(info.checkpoint, map_location="cpu", weights_only=False)
    except Exception as exc:  # any unpickling/zip failure means: not a usable checkpoint
        raise ModelError(
            f"checkpoint {info.checkpoint.name} cannot be read: {type(exc).__name__}"
        ) from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in _CHECKPOINT_KEYS):
        raise ModelError(
            f"checkpoint {info.checkpoint.name} is not an nnU-Net v2 checkpoint "
            f"(needs keys {list(_CHECKPOINT_KEYS)})"
        )
    ckpt_config = ckpt["init_args"].get("configuration") if ckpt["init_args"] else None
    if ckpt_config != info.configuration:
        raise ModelError(
            f"checkpoint was trained for configuration {ckpt_config!r}, "
            f"folder says {info.configuration!r}"
        )
    if ckpt["trainer_name"] != info.trainer:
        raise ModelError(
            f"checkpoint trainer {ckpt['trainer_name']!r} != folder trainer {info.trainer!r}"
        )


def find_training_dirs(path: Path) -> list[Path]:
    """Training folders (those holding plans.json + dataset.json) at or below ``path``."""
    path = Path(path)
    if (path / "plans.json").is_file():
        return [path]
    found = sorted(
        p.parent
        for p in path.rglob("plans.json")
        if (p.parent / "dataset.json").is_file() and "__" in p.parent.name
    )
    return found


def resolve_training_dir(path: Path, configuration: str = DEFAULT_CONFIGURATION) -> Path:
    """Accept a training, dataset or results folder; return the one training folder in it."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model folder not found: {path}")
    found = find_training_dirs(path)
    if not found:
        raise ModelError(
            f"wrong layout: no nnU-Net training folder (with plans.json and dataset.json) "
            f"under {path.name}; expected DatasetXXX_Name/nnUNetTrainer__nnUNetPlans__"
            f"{configuration}/"
        )
    if len(found) > 1:
        preferred = [p for p in found if p.name.endswith(f"__{configuration}")]
        if len(preferred) != 1:
            raise ModelError(
                f"ambiguous model: {len(found)} training folders under {path.name} "
                f"({[p.name for p in found]}); point at one of them"
            )
        found = preferred
    return found[0]


def _safe_extract(archive: Path, dest: Path) -> None:
    """Unpack a zip into ``dest`` refusing absolute paths, ``..``, links and zip bombs."""
    try:
        zf = zipfile.ZipFile(archive)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{archive.name} is not a readable zip archive: {exc}") from None
    dest_resolved = dest.resolve()
    with zf:
        total = 0
        for member in zf.infolist():
            name = PurePosixPath(member.filename.replace("\\", "/"))
            mode = member.external_attr >> 16
            if name.is_absolute() or ".." in name.parts or (name.parts and ":" in name.parts[0]):
                raise ModelError(f"unsafe path in archive: {member.filename!r}")
            if stat.S_ISLNK(mode):
                raise ModelError(f"symbolic link in archive refused: {member.filename!r}")
            target = (dest / name).resolve()
            if target != dest_resolved and dest_resolved not in target.parents:
                raise ModelError(f"unsafe path in archive: {member.filename!r}")
            total += member.file_size
            if total > MAX_UNPACKED_BYTES:
                raise ModelError("archive unpacks to more than the allowed size")
        for member in zf.infolist():
            name = PurePosixPath(member.filename.replace("\\", "/"))
            target = dest.joinpath(*name.parts)
            if member.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1024 * 1024)


def install_model(
    source: Path,
    models_root: Path,
    *,
    name: str | None = None,
    force: bool = False,
    configuration: str = DEFAULT_CONFIGURATION,
    fold: str = DEFAULT_FOLD,
) -> ModelInfo:
    """Validate a model zip or folder and copy it to ``models_root/<name>/<training folder>``.

    ``name`` defaults to the dataset folder's name (e.g. ``Dataset001_DEFACE``). The copy is
    staged next to the destination and moved in with one rename, so a failed install leaves
    nothing half-written. Returns the installed model's info.
    """
    source = Path(source)
    models_root = Path(models_root).expanduser()
    if not source.exists():
        raise ModelError(f"model source not found: {source}")
    if name is not None and (not name or name in (".", "..") or "/" in name or "\\" in name):
        raise ModelError(f"invalid model name {name!r}")
    models_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".install-", dir=models_root))
    try:
        if source.is_dir():
            unpacked = source
        elif zipfile.is_zipfile(source):
            unpacked = staging / "unpacked"
            unpacked.mkdir()
            _safe_extract(source, unpacked)
        else:
            raise ModelError(f"{source.name} is neither a folder nor a zip archive")
        training_dir = resolve_training_dir(unpacked, configuration)
        validate_training_dir(training_dir, fold=fold)
        dataset_name = training_dir.parent.name
        if training_dir == unpacked or not dataset_name.startswith("Dataset"):
            dataset_name = _load_json(training_dir / "plans.json", "plans.json").get(
                "dataset_name", "model"
            )
        final_name = name or str(dataset_name)
        if "/" in final_name or final_name in ("", ".", ".."):
            raise ModelError(f"invalid model name {final_name!r}")
        built = staging / "model"
        built.mkdir()
        shutil.copytree(training_dir, built / training_dir.name, symlinks=False)
        dest = models_root / final_name
        if dest.exists():
            if not force:
                raise ModelError(f"model {final_name!r} is already installed (use --force)")
            old = staging / "old"
            os.replace(dest, old)
        os.replace(built, dest)
        return validate_training_dir(dest / training_dir.name, fold=fold, load_checkpoint=False)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def list_models(models_root: Path) -> list[tuple[Path, ModelInfo | ModelError]]:
    """Every folder under ``models_root`` with its info, or the error that makes it unusable."""
    models_root = Path(models_root).expanduser()
    if not models_root.is_dir():
        return []
    out: list[tuple[Path, ModelInfo | ModelError]] = []
    for entry in sorted(models_root.iterdir()):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        try:
            out.append(
                (entry, validate_training_dir(resolve_training_dir(entry), load_checkpoint=False))
            )
        except ModelError as exc:
            out.append((entry, exc))
    return out


def resolve_model_dir(model_dir: Path | None, models_root: Path) -> Path:
    """The training folder to load: ``model_dir`` if set, else the single installed model."""
    if model_dir is not None:
        return resolve_training_dir(Path(model_dir).expanduser())
    usable = [info for _, info in list_models(models_root) if isinstance(info, ModelInfo)]
    if not usable:
        raise ModelError(
            "no nnU-Net model installed: run `defacegate models install ZIP_OR_DIR` "
            "or set deface.model_dir"
        )
    if len(usable) > 1:
        raise ModelError(
            f"{len(usable)} models installed ({[i.name for i in usable]}); "
            "choose one with deface.model_dir"
        )
    return usable[0].training_dir
