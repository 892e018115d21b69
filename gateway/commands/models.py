"""`defacegate models`: install and list trained nnU-Net facemask models.

``models install ZIP_OR_DIR [--name NAME] [--force]`` validates an nnU-Net v2 results folder
(or a zip of one, unpacked zip-slip safe) and copies it under ``deface.models_root``; it prints
the installed training folder. ``models list`` shows what is installed and which one the
nnU-Net engine would load (``gateway.pipeline.engine_from_settings`` builds the engine).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gateway.config import Settings
from inference.errors import ModelError
from inference.models import ModelInfo, install_model, list_models, resolve_model_dir

NAME = "models"
HELP = "install or list trained nnU-Net facemask models (e.g. CTA-DEFACE)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    inst = sub.add_parser("install", help="validate and install a model zip or folder")
    inst.add_argument("source", type=Path, metavar="ZIP_OR_DIR")
    inst.add_argument("--name", help="installed name (default: the DatasetXXX_Name folder)")
    inst.add_argument("--force", action="store_true", help="replace an installed model")
    sub.add_parser("list", help="list installed models")


def _describe(info: ModelInfo) -> str:
    return (
        f"{info.configuration}, label {info.face_label_name!r}={info.face_label}, "
        f"patch {list(info.patch_size)}, spacing {list(info.spacing)} mm"
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    root = settings.deface.models_root
    try:
        if args.models_command == "install":
            info = install_model(args.source, root, name=args.name, force=args.force)
            print(info.training_dir)
            print(f"installed {info.name}: {_describe(info)}", file=sys.stderr)
            return 0
        entries = list_models(root)
        if not entries:
            print(f"no models installed under {root}", file=sys.stderr)
            return 0
        try:
            active: Path | None = resolve_model_dir(settings.deface.model_dir, root).resolve()
        except ModelError:
            active = None
        for path, entry in entries:
            if isinstance(entry, ModelInfo):
                mark = "*" if active == entry.training_dir else " "
                print(f"{mark} {path.name}\t{entry.training_dir}\t{_describe(entry)}")
            else:
                print(f"! {path.name}\tINVALID: {entry}")
        return 0
    except ModelError as exc:
        print(f"defacegate models: error: {exc}", file=sys.stderr)
        return 1
