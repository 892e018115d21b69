"""The durable spool: atomic writes, idempotent duplicates, safe names, free-space floor."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from gateway.keys import log_id, safe_uid
from gateway.spool import INCOMING, IncomingFiles, Spool, SpoolFullError, StoreOutcome
from inference.dicomgen import make_ct_series
from inference.geometry import Geometry
from tests.support.pacs import wait_for

SERIES = "1.2.826.0.1.3680043.8.498.1"


def _series(n: int = 3) -> list:
    hu = np.zeros((n, 8, 8), np.float32)
    return make_ct_series(hu, Geometry(affine=np.diag([2.0, 1.0, 1.0, 1.0]), shape=hu.shape))


def test_store_writes_the_exact_bytes_under_the_sop_uid(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    data = b"DICM" * 1000
    assert spool.store(SERIES, "1.2.3.4", data) is StoreOutcome.NEW
    (path,) = spool.instance_paths(SERIES)
    assert path.name == "1.2.3.4.dcm"
    assert path.read_bytes() == data
    # No temporary file is left behind.
    assert [p.name for p in path.parent.iterdir()] == ["1.2.3.4.dcm"]


def test_duplicate_is_idempotent_and_a_changed_copy_replaces(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    assert spool.store(SERIES, "1.2.3.4", b"one") is StoreOutcome.NEW
    assert spool.store(SERIES, "1.2.3.4", b"one") is StoreOutcome.DUPLICATE
    assert spool.store(SERIES, "1.2.3.4", b"two!") is StoreOutcome.REPLACED
    (path,) = spool.instance_paths(SERIES)
    assert path.read_bytes() == b"two!"


@pytest.mark.parametrize("bad", ["../../etc/passwd", "1.2/3", "DOE^JOHN", "", "1." * 40, "1..2"])
def test_names_come_from_valid_uids_only(tmp_path: Path, bad: str) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        spool.store(SERIES, bad, b"x")
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        spool.store(bad, "1.2.3", b"x")
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_safe_uid_strips_padding_and_log_id_hides_the_uid() -> None:
    assert safe_uid("1.2.3\0") == "1.2.3"
    assert len(log_id(SERIES)) == 10 and SERIES not in log_id(SERIES)
    assert log_id(SERIES) == log_id(SERIES) != log_id(SERIES + "1")


def test_free_space_floor_refuses_before_writing(tmp_path: Path) -> None:
    free_mb = shutil.disk_usage(tmp_path).free // (1024 * 1024)
    spool = Spool(tmp_path, free_space_floor_mb=free_mb + 1024)
    with pytest.raises(SpoolFullError):
        spool.store(SERIES, "1.2.3.4", b"x")
    assert spool.instance_paths(SERIES) == []


def test_a_write_the_kernel_refuses_is_spool_full_and_leaves_nothing(tmp_path: Path) -> None:
    """A real failing write (file-size limit → EFBIG, as ENOSPC would fail) in a subprocess."""
    code = f"""
import resource, signal, sys
from pathlib import Path
from gateway.spool import Spool, SpoolFullError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
spool = Spool(Path({str(tmp_path)!r}))
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    spool.store({SERIES!r}, "1.2.3.4", b"x" * 100_000)
except SpoolFullError:
    sys.exit(0)
sys.exit(1)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert Spool(tmp_path).instance_paths(SERIES) == []
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_outputs_appear_all_at_once_named_by_new_uids(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    datasets = _series()
    out = spool.write_outputs(SERIES, 2, datasets)
    assert out == spool.output_dir(SERIES, 2)
    names = sorted(p.name for p in spool.output_paths(SERIES, 2))
    assert names == sorted(f"{ds.SOPInstanceUID}.dcm" for ds in datasets)
    assert dcmread(spool.output_paths(SERIES, 2)[0]).SOPInstanceUID in {
        ds.SOPInstanceUID for ds in datasets
    }
    # A failing write leaves the previous complete output untouched and no temp dir.
    broken = _series(2)
    del broken[1].SOPInstanceUID
    with pytest.raises(AttributeError):
        spool.write_outputs(SERIES, 2, broken)
    assert sorted(p.name for p in spool.output_paths(SERIES, 2)) == names
    assert [p.name for p in out.parent.iterdir()] == ["2"]
    spool.discard_outputs(SERIES, 2)
    assert spool.output_paths(SERIES, 2) == []


def test_series_on_disk_lists_spooled_series(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.store(SERIES, "1.2.3", b"a")
    spool.store("1.2.9", "1.2.4", b"b")
    assert sorted(spool.series_on_disk()) == sorted([SERIES, "1.2.9"])
    spool.remove_series(SERIES)
    assert list(spool.series_on_disk()) == ["1.2.9"]


def _arrived(spool: Spool, data: bytes) -> tuple[Path, int]:
    """An instance as the C data phase leaves it: written to an incoming/ file, still open."""
    path, fd = spool.incoming_file()
    os.write(fd, data)
    return path, fd


def test_commit_moves_an_arrived_instance_into_its_series_with_store_outcomes(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path)
    outcomes = []
    for data in (b"one", b"one", b"two"):
        tmp, fd = _arrived(spool, data)
        try:
            outcomes.append(spool.commit(tmp, fd, SERIES, "1.2.3.4"))
        finally:
            os.close(fd)
        # Committed: renamed away; a duplicate: left for the caller, who removes it.
        assert tmp.exists() == (outcomes[-1] is StoreOutcome.DUPLICATE)
        tmp.unlink(missing_ok=True)
    assert outcomes == [StoreOutcome.NEW, StoreOutcome.DUPLICATE, StoreOutcome.REPLACED]
    (path,) = spool.instance_paths(SERIES)
    assert path.read_bytes() == b"two"
    # A store of the same bytes through the other path agrees that it is a duplicate.
    assert spool.store(SERIES, "1.2.3.4", b"two") is StoreOutcome.DUPLICATE


def test_commit_below_the_free_space_floor_is_spool_full_and_commits_nothing(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path, free_space_floor_mb=shutil.disk_usage(tmp_path).free // 2**20 + 1024)
    tmp, fd = _arrived(spool, b"x" * 1000)
    try:
        with pytest.raises(SpoolFullError):
            spool.commit(tmp, fd, SERIES, "1.2.3.4")
    finally:
        os.close(fd)
    assert tmp.exists() and spool.instance_paths(SERIES) == []


def test_clear_incoming_removes_what_a_stopped_gateway_left(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for _ in range(3):
        os.close(spool.incoming_file()[1])
    spool.store(SERIES, "1.2.3.4", b"kept")
    assert Spool(tmp_path).clear_incoming() == 3
    assert not any((tmp_path / INCOMING).iterdir())
    assert len(spool.instance_paths(SERIES)) == 1


def test_incoming_files_are_made_ahead_in_the_background_and_removed_on_close(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path)
    incoming_dir = tmp_path / INCOMING
    pool = IncomingFiles(spool, depth=4)
    assert not any(incoming_dir.iterdir())  # nothing is made before the first take
    taken = [pool.take()]
    wait_for(lambda: len(list(incoming_dir.iterdir())) == 1 + 4, 5.0, "the pool to fill")
    taken += [pool.take() for _ in range(6)]  # more than it holds: made on demand, then again
    paths = [path for path, _ in taken]
    assert len(set(paths)) == 7 and all(p.parent == incoming_dir for p in paths)
    for _, fd in taken:  # each is a new, empty file, open for writing
        assert os.fstat(fd).st_size == 0 and os.write(fd, b"x") == 1
        os.close(fd)
    wait_for(lambda: len(list(incoming_dir.iterdir())) >= 7 + 3, 5.0, "the pool to refill")
    pool.close()
    assert sorted(incoming_dir.iterdir()) == sorted(paths)  # unused ones removed
    after, fd = pool.take()  # after close: made on demand, no thread
    os.close(fd)
    assert after.exists() and len(list(incoming_dir.iterdir())) == 8
