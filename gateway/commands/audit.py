"""`defacegate audit ORIGINAL DEFACED [--out DIR]`: privacy audit of a defaced series.

Renders both series' skin surfaces, runs the face detector and the embedding, prints the
audit report and the gate's decision as JSON, and writes the renders as PNGs. Exit status:
0 the gate passes, 1 it would escalate or quarantine, 2 the input is unusable.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from skimage.io import imsave

from gateway.config import Settings
from inference.audit.report import AuditReport, Decision, Verdict, audit, gate
from inference.errors import DefacegateError
from inference.series import SeriesVolume, assemble, load_datasets

NAME = "audit"
HELP = "privacy audit: render original and defaced faces, detect, re-identify, gate"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("original", type=Path, help="folder (or file) of the original series")
    parser.add_argument("defaced", type=Path, help="folder (or file) of the defaced series")
    parser.add_argument(
        "--out", type=Path, default=Path("audit"), help="folder for the PNGs and report.json"
    )


def write_report(report: AuditReport, decision: Decision, folder: Path) -> list[Path]:
    """Write ``report.json`` and one PNG per render (plus a before/after strip) to ``folder``.

    File names carry only the view (``defaced_yaw+30.png``), never anything from the series.
    """
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, image in report.images.items():
        path = folder / f"{name}.png"
        imsave(path, image, check_contrast=False)
        written.append(path)
    before = [im for k, im in report.images.items() if k.startswith("original_")]
    after = [im for k, im in report.images.items() if k.startswith("defaced_")]
    if before and len(before) == len(after):
        strip = folder / "before_after.png"
        imsave(strip, np.vstack([np.hstack(before), np.hstack(after)]), check_contrast=False)
        written.append(strip)
    path = folder / "report.json"
    path.write_text(json.dumps(summary(report, decision), indent=2) + "\n")
    written.append(path)
    return written


def summary(report: AuditReport, decision: Decision) -> dict[str, object]:
    """The JSON document: the report plus the gate's verdict and reasons."""
    return {
        **report.to_dict(),
        "decision": decision.verdict.value,
        "reasons": list(decision.reasons),
    }


def _one_volume(path: Path, settings: Settings, which: str) -> SeriesVolume:
    volumes = assemble(
        load_datasets([path]),
        min_slices=settings.volume.min_slices,
        allow_gaps=settings.volume.allow_gaps,
    )
    if len(volumes) != 1:
        raise ValueError(f"{which} input holds {len(volumes)} series; give one series")
    return volumes[0]


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        original = _one_volume(args.original, settings, "original")
        defaced = _one_volume(args.defaced, settings, "defaced")
    except (DefacegateError, ValueError) as exc:
        print(f"defacegate audit: {exc}", file=sys.stderr)
        return 2
    g0, g1 = original.geometry, defaced.geometry
    if g0.shape != g1.shape or not np.allclose(g0.affine, g1.affine, atol=1e-3):
        print("defacegate audit: original and defaced series differ in geometry", file=sys.stderr)
        return 2
    mask = np.abs(original.hu.astype(np.float32) - defaced.hu.astype(np.float32)) > 0.5
    report = audit(original.hu, defaced.hu, g0, mask, settings.audit)
    decision = gate(report, settings.audit)
    write_report(report, decision, args.out)
    print(json.dumps(summary(report, decision), indent=2))
    log.info("audit written to %s", args.out)
    return 0 if decision.verdict is Verdict.PASS else 1
