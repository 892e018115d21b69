"""The durable spool: received instances and de-identified outputs on (shared) disk.

Layout under ``root``::

    series/<SeriesInstanceUID>/in/<SOPInstanceUID>.dcm       as received, raw bytes
    series/<SeriesInstanceUID>/out/<generation>/<new SOP UID>.dcm   de-identified job output
    incoming/.<random>.tmp                                   instances still arriving

Every write goes to a temporary file (in the same directory, or in ``incoming/`` for an
instance the SCP writes while it arrives: :meth:`Spool.commit`), is fsync'ed and then
``os.replace``'d into place, and the directory is fsync'ed, so a file either exists whole
or not at all (STYLE §3). Names come from validated UIDs only (:func:`gateway.keys.safe_uid`).
Outputs of a job appear at once: they are written into a hidden sibling directory that is
renamed when complete.
"""

from __future__ import annotations

import contextlib
import errno
import filecmp
import os
import queue
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from enum import Enum
from pathlib import Path

from pydicom import dcmwrite
from pydicom.dataset import Dataset

from gateway.keys import safe_uid

_SUFFIX = ".dcm"
#: Instances the SCP writes while they arrive (gateway.store_lane), same file system.
INCOMING = "incoming"


class SpoolFullError(OSError):
    """The spool is below its free-space floor or the disk is full: refuse, retry later."""


class StoreOutcome(Enum):
    """What storing an instance did."""

    NEW = "new"
    DUPLICATE = "duplicate"  # identical bytes already spooled: nothing changed
    REPLACED = "replaced"  # same SOP Instance UID, different bytes: the newer copy wins


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see either nothing or all of it."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            if fsync:
                # fdatasync: the data and the size (needed to read it back), not the
                # timestamps: ~20% cheaper than fsync for a new file, equally durable.
                os.fdatasync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_dir(path.parent)


def _outcome(path: Path, same: Callable[[], bool]) -> StoreOutcome:
    """What storing an instance at ``path`` would be: NEW, or against the copy already
    there (``same()`` compares it with the new bytes) DUPLICATE or REPLACED."""
    if not path.exists():
        return StoreOutcome.NEW
    return StoreOutcome.DUPLICATE if same() else StoreOutcome.REPLACED


@contextlib.contextmanager
def _disk_full_as_spool_full() -> Iterator[None]:
    try:
        yield
    except SpoolFullError:
        raise
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise SpoolFullError(exc.errno, "spool disk full") from exc
        raise


class Spool:
    """Files of every series the gateway holds; safe to share between processes and hosts."""

    def __init__(self, root: Path, *, fsync: bool = True, free_space_floor_mb: int = 0) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.floor_bytes = int(free_space_floor_mb) * 1024 * 1024
        (self.root / "series").mkdir(parents=True, exist_ok=True)
        (self.root / INCOMING).mkdir(exist_ok=True)

    # -- paths ---------------------------------------------------------------------------
    def series_dir(self, series_uid: str) -> Path:
        return self.root / "series" / safe_uid(series_uid)

    def input_dir(self, series_uid: str) -> Path:
        return self.series_dir(series_uid) / "in"

    def output_dir(self, series_uid: str, generation: int) -> Path:
        return self.series_dir(series_uid) / "out" / str(int(generation))

    # -- ingest --------------------------------------------------------------------------
    def check_free_space(self, needed: int = 0) -> None:
        """Raise :class:`SpoolFullError` when writing ``needed`` bytes would cross the floor."""
        free = shutil.disk_usage(self.root).free
        if free - needed < self.floor_bytes:
            raise SpoolFullError(errno.ENOSPC, "spool below its free-space floor")

    def instance_path(self, series_uid: str, sop_uid: str) -> Path:
        return self.input_dir(series_uid) / f"{safe_uid(sop_uid)}{_SUFFIX}"

    def _ensure_input_dir(self, directory: Path) -> None:
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            if self.fsync:
                _fsync_dir(directory.parent)
                _fsync_dir(directory.parent.parent)

    def store(self, series_uid: str, sop_uid: str, data: bytes) -> StoreOutcome:
        """Durably store one received instance (raw Part 10 bytes) before Success is sent.

        Idempotent: re-sending identical bytes changes nothing.
        """
        path = self.instance_path(series_uid, sop_uid)
        outcome = _outcome(
            path, lambda: path.stat().st_size == len(data) and path.read_bytes() == data
        )
        if outcome is StoreOutcome.DUPLICATE:
            return outcome
        self.check_free_space(len(data))
        with _disk_full_as_spool_full():
            self._ensure_input_dir(path.parent)
            atomic_write(path, data, fsync=self.fsync)
        return outcome

    def incoming_file(self) -> tuple[Path, int]:
        """A new temporary file in ``incoming/`` (path, descriptor open for reading and
        writing) for an instance written while it arrives; see :meth:`commit` and
        :class:`IncomingFiles`."""
        path = self.root / INCOMING / f".{uuid.uuid4().hex}.tmp"
        return path, os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)

    def commit(self, tmp: Path, fd: int, series_uid: str, sop_uid: str) -> StoreOutcome:
        """:meth:`store` for an instance already written to ``tmp`` (from
        :meth:`incoming_file`, still open as ``fd``): same outcomes, same durability (data
        synced, renamed into place, directory synced). The caller removes ``tmp`` if it is
        still there afterwards (a duplicate, an error)."""
        path = self.instance_path(series_uid, sop_uid)
        outcome = _outcome(path, lambda: filecmp.cmp(tmp, path, shallow=False))
        if outcome is StoreOutcome.DUPLICATE:
            return outcome
        self.check_free_space()  # its bytes are written already
        with _disk_full_as_spool_full():
            if self.fsync:
                os.fdatasync(fd)  # the data and the size (see atomic_write)
            self._ensure_input_dir(path.parent)
            os.replace(tmp, path)
            if self.fsync:
                _fsync_dir(path.parent)
        return outcome

    def clear_incoming(self) -> int:
        """Remove what a stopped gateway left in ``incoming/``: never acknowledged (each
        instance is renamed into its series before Success is sent). At start-up only: a
        spool has one receiving gateway."""
        removed = 0
        for path in (self.root / INCOMING).glob(".*.tmp"):
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    def instance_paths(self, series_uid: str) -> list[Path]:
        """Every spooled instance of the series, in a stable order."""
        directory = self.input_dir(series_uid)
        if not directory.is_dir():
            return []
        return sorted(p for p in directory.iterdir() if p.suffix == _SUFFIX and p.is_file())

    def series_on_disk(self) -> Iterator[str]:
        """Series UIDs that have spooled instances (for start-up recovery)."""
        for d in sorted((self.root / "series").iterdir()):
            if (d / "in").is_dir() and any((d / "in").glob(f"*{_SUFFIX}")):
                yield d.name

    # -- outputs -------------------------------------------------------------------------
    def write_outputs(self, series_uid: str, generation: int, datasets: Iterable[Dataset]) -> Path:
        """Write a job's de-identified instances; they appear all at once or not at all.

        File names are the (new) SOP Instance UIDs. A previous partial attempt of the same
        job is replaced.
        """
        final = self.output_dir(series_uid, generation)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
        tmp.mkdir()
        try:
            for ds in datasets:
                path = tmp / f"{safe_uid(ds.SOPInstanceUID)}{_SUFFIX}"
                dcmwrite(path, ds, enforce_file_format=True)
                if self.fsync:
                    with open(path, "rb") as fh:
                        os.fdatasync(fh.fileno())
            if self.fsync:
                _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            if self.fsync:
                _fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def output_paths(self, series_uid: str, generation: int) -> list[Path]:
        directory = self.output_dir(series_uid, generation)
        if not directory.is_dir():
            return []
        return sorted(p for p in directory.iterdir() if p.suffix == _SUFFIX)

    def discard_outputs(self, series_uid: str, generation: int) -> None:
        """Drop a superseded job's outputs."""
        shutil.rmtree(self.output_dir(series_uid, generation), ignore_errors=True)

    def remove_series(self, series_uid: str) -> None:
        """Delete everything held for a series (after its retention period)."""
        shutil.rmtree(self.series_dir(series_uid), ignore_errors=True)


class IncomingFiles:
    """Empty files in the spool's ``incoming/``, made ahead of need by a background thread.

    Why: creating a file (allocating its inode) took 0.3–0.6 ms of the receiving thread per
    instance on the bench VM's ext4 (without a journal it skips inodes freed in the last
    minutes), a fifth of the time per instance. ``os.open`` releases the GIL, so one thread
    makes them on the other core while instances arrive. Filled on first use and in batches
    (one wake-up per ``depth // 2`` files taken); :meth:`close` removes the unused ones, and
    start-up recovery (:meth:`Spool.clear_incoming`) any that a killed process left.
    """

    def __init__(self, spool: Spool, depth: int = 32) -> None:
        self.spool = spool
        self._depth = depth
        self._ready: queue.SimpleQueue[tuple[Path, int]] = queue.SimpleQueue()
        self._wanted = threading.Event()
        self._closed = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def take(self) -> tuple[Path, int]:
        """A new file (path, descriptor open for reading and writing): a ready one, else one
        made now. Raises OSError as :meth:`Spool.incoming_file` does."""
        if self._thread is None:
            self._start()
        try:
            return self._ready.get_nowait()
        except queue.Empty:
            return self.spool.incoming_file()
        finally:
            if self._ready.qsize() <= self._depth // 2:
                self._wanted.set()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(
                    target=self._fill, name="defacegate-incoming", daemon=True
                )
                self._thread.start()

    def _fill(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            while not self._closed and self._ready.qsize() < self._depth:
                try:
                    self._ready.put(self.spool.incoming_file())
                except OSError:
                    break  # disk full, ...: take() meets it too and its caller answers it
            if self._closed:
                return

    def close(self) -> None:
        """Stop the thread and remove the files nobody took."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._wanted.set()
        if thread is not None:
            thread.join(timeout=10)
        while True:
            try:
                path, fd = self._ready.get_nowait()
            except queue.Empty:
                return
            os.close(fd)
            path.unlink(missing_ok=True)
