"""Build a tiny but valid nnU-Net v2 results folder, so tests run nnU-Net's real predictor.

The folder is what ``nnUNetv2_train`` writes (``DatasetXXX_Name/nnUNetTrainer__nnUNetPlans__
3d_fullres/{dataset.json, plans.json, dataset_fingerprint.json, fold_all/
checkpoint_final.pth}``): plans.json has the keys nnU-Net's ExperimentPlanner emits, the network
is built by ``nnUNetTrainer.build_network_architecture`` from those plans (a small
PlainConvUNet), and the checkpoint dict has the keys of ``nnUNetTrainer.save_checkpoint``.

The weights come from a few CPU Adam steps on a synthetic "head": an ellipsoid of soft
tissue around a bone block in air, label 1 = soft tissue. That is a purely local task a tiny
network learns in seconds, which is all the tests need: predictions that are non-trivial,
deterministic and checkable against the known answer. It is not a face model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference.geometry import Geometry

TRAINER = "nnUNetTrainer"
PLANS = "nnUNetPlans"
CONFIGURATION = "3d_fullres"
#: CT intensity statistics as nnU-Net's fingerprint would store them for a face label.
CT_INTENSITY = {
    "max": 1500.0,
    "mean": 20.0,
    "median": 30.0,
    "min": -1024.0,
    "percentile_00_5": -1000.0,
    "percentile_99_5": 1000.0,
    "std": 150.0,
}
SOFT_TISSUE_HU = (-300.0, 300.0)


@dataclass(frozen=True)
class TinyModelSpec:
    """Size knobs of the test model (kept tiny for CI; the benchmark uses a bigger patch)."""

    patch_size: tuple[int, int, int] = (32, 32, 32)
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    features: tuple[int, ...] = (4, 8, 16)
    train_steps: int = 60
    train_patch: tuple[int, int, int] = (24, 24, 24)
    seed: int = 0
    dataset_name: str = "Dataset999_TinyFace"
    labels: tuple[tuple[str, int], ...] = (("background", 0), ("face", 1))


def plans_json(spec: TinyModelSpec) -> dict[str, Any]:
    """plans.json with the structure of nnU-Net's default ExperimentPlanner output."""
    n_stages = len(spec.features)
    strides = [[1, 1, 1]] + [[2, 2, 2]] * (n_stages - 1)
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n_stages,
            "features_per_stage": list(spec.features),
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * n_stages,
            "strides": strides,
            "n_conv_per_stage": [2] * n_stages,
            "n_conv_per_stage_decoder": [2] * (n_stages - 1),
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    fullres = {
        "data_identifier": f"{PLANS}_{CONFIGURATION}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": list(spec.patch_size),
        "median_image_size_in_voxels": [150, 256, 256],
        "spacing": list(spec.spacing),
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {
            "is_seg": False,
            "order": 3,
            "order_z": 0,
            "force_separate_z": None,
        },
        "resampling_fn_seg_kwargs": {
            "is_seg": True,
            "order": 1,
            "order_z": 0,
            "force_separate_z": None,
        },
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {
            "is_seg": False,
            "order": 1,
            "order_z": 0,
            "force_separate_z": None,
        },
        "architecture": arch,
        "batch_dice": False,
    }
    return {
        "dataset_name": spec.dataset_name,
        "plans_name": PLANS,
        "original_median_spacing_after_transp": list(spec.spacing),
        "original_median_shape_after_transp": [150, 256, 256],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {CONFIGURATION: fullres},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": dict(CT_INTENSITY)},
    }


def dataset_json(spec: TinyModelSpec) -> dict[str, Any]:
    """dataset.json as in nnU-Net v2's dataset format (channel_names, labels, ...)."""
    return {
        "channel_names": {"0": "CT"},
        "labels": dict(spec.labels),
        "numTraining": 2,
        "file_ending": ".nii.gz",
    }


def synthetic_head(
    shape: tuple[int, int, int] = (48, 56, 56), seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(hu, soft-tissue label): soft-tissue ellipsoid with a bone block inside, in air."""
    rng = np.random.default_rng(seed)
    k, r, c = np.indices(shape, dtype=np.float32)
    centre = (np.array(shape, np.float32) - 1) / 2 + rng.uniform(-2, 2, 3)
    radii = np.array(shape, np.float32) * rng.uniform(0.33, 0.42, 3)
    d = ((k - centre[0]) / radii[0]) ** 2 + ((r - centre[1]) / radii[1]) ** 2
    d += ((c - centre[2]) / radii[2]) ** 2
    hu = np.full(shape, -1000.0, np.float32)
    hu[d <= 1.0] = 40.0
    bone = d <= 0.3
    hu[bone] = 700.0
    hu += rng.normal(0, 15, shape).astype(np.float32)
    label = ((hu > SOFT_TISSUE_HU[0]) & (hu < SOFT_TISSUE_HU[1])).astype(np.uint8)
    return hu, label


def synthetic_geometry(shape: tuple[int, int, int], spacing: float = 2.0) -> Geometry:
    """Axial geometry: rows towards posterior, columns towards left, slices towards superior."""
    return Geometry.from_dicom(
        image_position=np.array([-50.0, -50.0, -40.0]),
        image_orientation=np.array([1.0, 0, 0, 0, 1.0, 0]),
        pixel_spacing=(spacing, spacing),
        slice_step=np.array([0.0, 0.0, spacing]),
        shape=shape,
    )


def _train(network: Any, spec: TinyModelSpec) -> None:
    import torch
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import (
        CTNormalization,
    )

    torch.manual_seed(spec.seed)
    norm = CTNormalization(use_mask_for_norm=False, intensityproperties=dict(CT_INTENSITY))
    vols = [synthetic_head(seed=spec.seed + i) for i in range(2)]
    rng = np.random.default_rng(spec.seed)
    opt = torch.optim.Adam(network.parameters(), lr=3e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    network.train()
    p = np.array(spec.train_patch)
    for _ in range(spec.train_steps):
        xs, ys = [], []
        for hu, label in vols:
            hi = np.maximum(np.array(hu.shape) - p, 0)
            o = [int(rng.integers(0, h + 1)) for h in hi]
            sl = tuple(slice(a, a + n) for a, n in zip(o, p, strict=True))
            xs.append(norm.run(hu[sl].copy())[None])
            ys.append(label[sl].astype(np.int64))
        x = torch.from_numpy(np.stack(xs))
        y = torch.from_numpy(np.stack(ys))
        opt.zero_grad()
        loss = loss_fn(network(x), y)
        loss.backward()
        opt.step()
    network.eval()


def build_model_folder(root: Path, spec: TinyModelSpec | None = None) -> Path:
    """Write ``root/<dataset>/nnUNetTrainer__nnUNetPlans__3d_fullres`` and return it."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    spec = spec or TinyModelSpec()
    plans, dj = plans_json(spec), dataset_json(spec)
    training_dir = Path(root) / spec.dataset_name / f"{TRAINER}__{PLANS}__{CONFIGURATION}"
    (training_dir / "fold_all").mkdir(parents=True, exist_ok=True)
    (training_dir / "plans.json").write_text(json.dumps(plans, indent=2))
    (training_dir / "dataset.json").write_text(json.dumps(dj, indent=2))
    fingerprint = {
        "foreground_intensity_properties_per_channel": {"0": dict(CT_INTENSITY)},
        "median_relative_size_after_cropping": 1.0,
        "shapes_after_crop": [[150, 256, 256]],
        "spacings": [list(spec.spacing)],
    }
    (training_dir / "dataset_fingerprint.json").write_text(json.dumps(fingerprint, indent=2))

    pm = PlansManager(plans)
    cm = pm.get_configuration(CONFIGURATION)
    n_out = pm.get_label_manager(dj).num_segmentation_heads
    torch.manual_seed(spec.seed)
    network = nnUNetTrainer.build_network_architecture(pm, cm, 1, n_out, False)
    if spec.train_steps:
        _train(network, spec)
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    checkpoint = {
        "network_weights": network.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "grad_scaler_state": None,
        "logging": {
            "mean_fg_dice": [],
            "ema_fg_dice": [],
            "dice_per_class_or_region": [],
            "train_losses": [],
            "val_losses": [],
            "lrs": [],
            "epoch_start_timestamps": [],
            "epoch_end_timestamps": [],
        },
        "_best_ema": None,
        "current_epoch": 1,
        "init_args": {
            "plans": plans,
            "configuration": CONFIGURATION,
            "fold": "all",
            "dataset_json": dj,
            "device": torch.device("cpu"),
        },
        "trainer_name": TRAINER,
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    torch.save(checkpoint, training_dir / "fold_all" / "checkpoint_final.pth")
    return training_dir
