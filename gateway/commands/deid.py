"""`defacegate deid`: review a de-identification profile on a file, or apply it (header only).

``--dry-run`` prints, per attribute, the original tag, the rule that decided, what happened and
a masked result (lengths only, never values), so an administrator can review the configured
profile before using it. Without ``--dry-run`` the header de-identification (no defacing) is
written to ``--output``; the re-identification lookup is appended when configured.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from gateway.config import Settings
from gateway.keys import safe_uid

NAME = "deid"
HELP = "review (--dry-run) or apply the header de-identification profile to DICOM files"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", type=Path, help="DICOM files")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--dry-run", action="store_true", help="print tag, rule, action, masked result"
    )
    mode.add_argument("--output", "-o", type=Path, help="write de-identified files here")
    parser.add_argument(
        "--config",
        default=argparse.SUPPRESS,  # also accepted before the command; do not clobber it
        help="YAML configuration file (or $DEFACEGATE_CONFIG)",
    )
    parser.add_argument(
        "--facemask-applied",
        action="store_true",
        help="record the Clean Recognizable Visual Features option (only if pixels are defaced)",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    from anonymizer import (
        DeidentificationError,
        deidentify,
        describe,
        explain,
        reid_record,
        write_reid_records,
    )
    from gateway.pipeline import profile_from_settings

    key = None
    if settings.deid.key is None:
        if not args.dry_run:
            print("defacegate deid: no key configured (deid.key)", file=sys.stderr)
            return 2
        key = os.urandom(32)
        print("note: no deid.key configured; a throw-away key is used for this dry run")
    try:
        profile = profile_from_settings(settings.deid, key=key)
    except ValueError as exc:
        print(f"defacegate deid: invalid profile: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        for line in describe(profile)[:9]:
            print(f"# {line}")
    status = 0
    records = []
    for path in args.files:
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError) as exc:
            print(f"{path}: not a readable DICOM file ({type(exc).__name__})", file=sys.stderr)
            status = 1
            continue
        try:
            if args.dry_run:
                print(f"== {path}")
                print(f"{'tag':<34} {'name':<40} {'rule':<28} {'action':<15} result")
                for d in explain(ds, profile, facemask_applied=args.facemask_applied):
                    print(
                        f"{d.path:<34} {d.name[:40]:<40} {d.rule[:28]:<28} "
                        f"{d.effect.value:<15} {d.result}"
                    )
                continue
            new = deidentify(ds, profile, facemask_applied=args.facemask_applied)
        except DeidentificationError as exc:
            print(f"{path}: refused: {exc}", file=sys.stderr)
            status = 1
            continue
        args.output.mkdir(parents=True, exist_ok=True)
        target = args.output / f"{safe_uid(str(new.SOPInstanceUID))}.dcm"
        new.save_as(target, enforce_file_format=True)
        records.append(reid_record(ds, profile))
        print(target)
    if records and settings.deid.reid_lookup_path is not None:
        write_reid_records(settings.deid.reid_lookup_path, records)
    return status
