"""dciodvfy (dicom3tools) on de-identified output: no error the input did not already have."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from anonymizer import deidentify
from tests.support.deid import ALL_OPTIONS, phi_series, profile, to_bytes


def _errors(path: Path) -> set[str]:
    """dciodvfy's error lines; asserts it recognised the file as a CT Image first."""
    dciodvfy = shutil.which("dciodvfy")
    assert dciodvfy, "dciodvfy (Debian package dicom3tools) is required"
    proc = subprocess.run(
        [dciodvfy, str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    lines = (proc.stdout + proc.stderr).splitlines()
    assert "CTImage" in lines, "dciodvfy did not identify the IOD"
    return {line.strip() for line in lines if line.startswith("Error")}


@pytest.mark.parametrize("options", [{}, ALL_OPTIONS], ids=["default", "all-options"])
def test_no_new_dciodvfy_errors(tmp_path: Path, options: dict[str, bool]) -> None:
    series, _ = phi_series(5, slices=1)
    src, dst = tmp_path / "in.dcm", tmp_path / "out.dcm"
    src.write_bytes(to_bytes(series[0]))
    dst.write_bytes(to_bytes(deidentify(series[0], profile(**options), facemask_applied=True)))
    before, after = _errors(src), _errors(dst)
    assert after - before == set()
