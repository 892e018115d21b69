"""`defacegate phantom OUT_DIR`: write a synthetic head-and-neck CTA series and its ground truth."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gateway.config import Settings

NAME = "phantom"
HELP = "write a synthetic head-and-neck CTA phantom (DICOM) with a ground-truth facemask"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fov", choices=("head", "head_neck"), default="head_neck")
    parser.add_argument("--yaw", type=float, default=0.0, help="degrees, + nose to the left")
    parser.add_argument("--pitch", type=float, default=0.0, help="degrees, + chin down")
    parser.add_argument("--roll", type=float, default=0.0, help="degrees, + vertex to the left")
    parser.add_argument("--tilt", type=float, default=0.0, help="gantry tilt, degrees")
    parser.add_argument("--slice-thickness", type=float, default=1.0, metavar="MM")
    parser.add_argument("--matrix", type=int, default=256, metavar="N")
    parser.add_argument("--slices", type=int, default=None, metavar="N")
    parser.add_argument("--pixel-spacing", type=float, default=None, metavar="MM")
    parser.add_argument("--noise", type=float, default=10.0, metavar="SD", help="HU")
    parser.add_argument("--eye-shield", choices=("metal", "leadglass"), default=None)
    parser.add_argument("--tube", action="store_true", help="endotracheal tube")
    parser.add_argument("--head-holder", action="store_true", help="head holder and table")
    parser.add_argument("--phi", action="store_true", help="header full of planted test PHI")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from inference.phantom import PhantomOptions, generate_phantom, write_phantom

    try:
        options = PhantomOptions(
            seed=args.seed,
            fov=args.fov,
            yaw=args.yaw,
            pitch=args.pitch,
            roll=args.roll,
            tilt=args.tilt,
            slice_thickness=args.slice_thickness,
            matrix=args.matrix,
            n_slices=args.slices,
            pixel_spacing=args.pixel_spacing,
            noise=args.noise,
            eye_shield=args.eye_shield,
            tube=args.tube,
            head_holder=args.head_holder,
            phi=args.phi,
        )
    except ValueError as exc:
        print(f"defacegate phantom: {exc}", file=sys.stderr)
        return 2
    if args.out_dir.exists() and any(args.out_dir.iterdir()):
        print(f"defacegate phantom: {args.out_dir} exists and is not empty", file=sys.stderr)
        return 2
    phantom = generate_phantom(options)
    dicom_dir = write_phantom(phantom, args.out_dir)
    summary = {
        "series": str(dicom_dir),
        "instances": int(phantom.geometry.shape[0]),
        "facemask": str(args.out_dir / "facemask.nii.gz"),
        "intracranial": str(args.out_dir / "intracranial.nii.gz"),
        "metadata": str(args.out_dir / "phantom.json"),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"series: {summary['series']} ({summary['instances']} instances)")
        print(f"ground truth: {summary['facemask']}, {summary['intracranial']}")
    return 0
