"""`defacegate deface INPUT OUTPUT`: deface and de-identify DICOM series offline.

Exit codes: 0 done; 1 the input was rejected or a stage failed (nothing written);
2 usage error (OUTPUT exists without --overwrite, invalid option or configuration).
"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gateway.config import DefaceSettings, Settings, VolumeSettings
from gateway.pipeline import StageError, deface_to_directory
from inference.errors import DefacegateError

NAME = "deface"
HELP = "deface and de-identify the DICOM series in INPUT into the new directory OUTPUT"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="DICOM file or directory (read recursively)")
    parser.add_argument("output", type=Path, help="new directory for the defaced series")
    parser.add_argument("--engine", choices=["anatomical", "nnunet"], help="facemask engine")
    parser.add_argument("--fill", help="'air' (-1000 HU), 'p10' or a number of HU")
    parser.add_argument("--bone", choices=["keep", "smooth", "remove"], help="facial bone")
    parser.add_argument(
        "--allow-gaps", action="store_true", help="accept gaps > 1.5 x median slice spacing"
    )
    parser.add_argument(
        "--save-mask", action="store_true", help="also write the facemask as DICOM SEG"
    )
    parser.add_argument(
        "--save-mask-nifti", action="store_true", help="also write the facemask as NIfTI"
    )
    parser.add_argument(
        "--no-roi",
        dest="roi",
        action="store_false",
        default=None,
        help="nnU-Net: predict on the whole volume instead of the face ROI crop",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")


def apply_overrides(args: argparse.Namespace, settings: Settings) -> Settings:
    """Command-line options take precedence over the configuration (validated again)."""
    deface: dict[str, Any] = {
        k: v
        for k, v in (
            ("engine", args.engine),
            ("fill", args.fill),
            ("bone", args.bone),
            ("roi", getattr(args, "roi", None)),
        )
        if v is not None
    }
    update: dict[str, Any] = {}
    if deface:
        update["deface"] = DefaceSettings(**{**settings.deface.model_dump(), **deface})
    if args.allow_gaps:
        update["volume"] = VolumeSettings(**{**settings.volume.model_dump(), "allow_gaps": True})
    return settings.model_copy(update=update) if update else settings


def _known_error(exc: BaseException) -> bool:
    """Expected failures whose messages are written to be PHI-free."""
    try:
        from anonymizer import DeidentificationError
    except ImportError:  # anonymizer without the error class: only core errors are known
        return isinstance(exc, DefacegateError)
    return isinstance(exc, DefacegateError | DeidentificationError)


def _fail(message: str, code: int) -> int:
    print(f"defacegate deface: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        settings = apply_overrides(args, settings)
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return _fail(f"invalid option: {errors}", 2)
    out_abs, in_abs = args.output.resolve(), args.input.resolve()
    if out_abs == in_abs or out_abs in in_abs.parents or in_abs in out_abs.parents:
        return _fail("OUTPUT must not be INPUT, contain it, or lie inside it", 2)
    if args.output.exists() and not args.overwrite:
        return _fail(f"output {args.output} already exists (use --overwrite)", 2)
    if not args.input.exists():
        return _fail(f"input {args.input} does not exist", 2)
    if settings.deid.key is None:
        print(
            "defacegate deface: no deid.key configured: using a random key for this run "
            "(pseudonyms will differ between runs)",
            file=sys.stderr,
        )
    # highdicom logs every module it copies into a SEG at INFO: not useful on a terminal.
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    show_progress = sys.stderr.isatty()
    progress_ctx: Any = nullcontext(None)
    if show_progress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        progress_ctx = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TimeElapsedColumn(),
            transient=True,
            console=_stderr_console(),
        )
    try:
        with progress_ctx as bar:
            callback = None
            if bar is not None:
                task = bar.add_task("reading", total=None)

                def callback(stage: str, done: int, total: int) -> None:
                    bar.update(task, description=stage, completed=done, total=total)

            summary = deface_to_directory(
                args.input,
                args.output,
                settings,
                overwrite=args.overwrite,
                save_mask=args.save_mask,
                save_mask_nifti=args.save_mask_nifti,
                progress=callback,
            )
    except StageError as exc:
        where = (
            f"{exc.stage} failed" if exc.label == "input" else f"{exc.label}: {exc.stage} failed"
        )
        if _known_error(exc.error):
            return _fail(f"{where}: {exc.error}", 1)
        # Unexpected: the message may quote header values, so only the type is shown.
        return _fail(f"{where} unexpectedly ({type(exc.error).__name__})", 1)
    except FileExistsError:
        return _fail(f"output {args.output} already exists (use --overwrite)", 2)
    if args.json:
        print(summary.to_json())
    else:
        print(
            f"defaced {len(summary.series)} series ({summary.files} files) with the "
            f"{summary.engine} engine in {summary.seconds:.1f} s -> {summary.output}"
        )
    return 0


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)
