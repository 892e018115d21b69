"""The defacing pipeline as composable stages, shared by ``defacegate deface`` and the workers.

assemble → engine.mask → replace_masked → write_back → de-identify each instance → write.

Fail closed: an exception in any stage means nothing is produced for the input and a
:class:`StageError` names the stage (its ``error`` is the original exception, whose *type*
decides the outcome: reject/quarantine a SeriesError, FacemaskError or
DeidentificationError; anything else is a bug). :func:`deface_to_directory` assembles every
series before any engine runs and writes into a temporary sibling directory that is renamed
into place only when everything succeeded, so OUTPUT is either complete or absent.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from gateway.config import DefaceSettings, DeidSettings, Settings
from gateway.keys import safe_uid
from inference.engines import FacemaskEngine
from inference.errors import FacemaskError, FaceStillVisibleError, ImplausibleMaskError
from inference.geometry import Geometry
from inference.replace import fill_value, replace_masked
from inference.series import SeriesVolume, SliceRef, assemble, load_datasets
from inference.writeback import output_syntax, write_back

log = logging.getLogger(__name__)

Deidentify = Callable[[Dataset], Dataset]
#: ``progress(stage, done, total)``: called as work advances (for a progress bar).
Progress = Callable[[str, int, int], None]

STAGES = ("read", "assemble", "mask", "audit", "replace", "writeback", "deidentify", "write")
_BONE_RANK = {"keep": 0, "smooth": 1, "remove": 2}


class StageError(Exception):
    """A pipeline stage failed for one series; ``error`` is the original exception."""

    def __init__(self, stage: str, label: str, error: BaseException) -> None:
        self.stage = stage
        self.label = label
        self.error = error
        super().__init__(f"{label}: {stage} failed: {type(error).__name__}: {error}")


@dataclass
class SeriesResult:
    """One defaced, de-identified series, ready to write or forward."""

    label: str
    datasets: list[Dataset]
    mask: np.ndarray
    geometry: Geometry
    slices: list[SliceRef]
    fill_hu: float
    masked_voxels: int
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    transfer_syntaxes: list[str] = field(default_factory=list)
    #: The privacy audit's outcome (``inference.audit.AuditedMask``); None when disabled.
    audit: Any = None

    @property
    def quarantined_by_audit(self) -> bool:
        """Defaced and de-identified, but a face is still detected: hold it for review."""
        from inference.audit.report import Verdict

        return self.audit is not None and self.audit.decision.verdict is not Verdict.PASS

    @property
    def series_uid(self) -> str:
        """The new (de-identified) SeriesInstanceUID."""
        return str(self.datasets[0].SeriesInstanceUID)

    def summary(self) -> dict[str, Any]:
        """JSON-ready counts and timings; pseudonymous UIDs only."""
        return {
            "label": self.label,
            "series_uid": self.series_uid,
            "instances": len(self.datasets),
            "slices": int(self.mask.shape[0]),
            "shape": list(self.mask.shape),
            "spacing_mm": [round(float(s), 4) for s in self.geometry.spacing],
            "tilt_degrees": round(self.geometry.tilt_degrees, 3),
            "masked_voxels": self.masked_voxels,
            "masked_fraction": round(self.masked_voxels / max(1, self.mask.size), 6),
            "fill_hu": self.fill_hu,
            "transfer_syntaxes": sorted(set(self.transfer_syntaxes)),
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "warnings": list(self.warnings),
            "audit": None
            if self.audit is None
            else {
                "verdict": self.audit.decision.verdict.value,
                "reasons": list(self.audit.decision.reasons),
                "bone": self.audit.bone,
            },
        }


@dataclass
class Summary:
    """What :func:`deface_to_directory` did."""

    output: Path
    engine: str
    series: list[SeriesResult]
    files: int
    random_key: bool
    seconds: float
    mask_files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "engine": self.engine,
            "files": self.files,
            "random_key": self.random_key,
            "seconds": round(self.seconds, 3),
            "mask_files": self.mask_files,
            "series": [s.summary() for s in self.series],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# ------------------------------------------------------------------------------ components


def engine_from_settings(deface: DefaceSettings) -> FacemaskEngine:
    """Build the configured engine; imports lazily so torch is loaded only for nnU-Net."""
    if deface.engine == "nnunet":
        from inference.engines.nnunet import NnUNetEngine, NnUNetOptions
        from inference.models import resolve_model_dir

        model_dir = resolve_model_dir(deface.model_dir, deface.models_root)
        options = NnUNetOptions(roi=deface.roi, tta=deface.tta, axes=deface.model_axes)
        return NnUNetEngine(model_dir, options)
    from inference.engines.anatomical import AnatomicalEngine, AnatomicalOptions

    return AnatomicalEngine(
        AnatomicalOptions(
            bone=deface.bone,
            include_ears=deface.include_ears,
            surface_band_mm=deface.surface_band_mm,
        )
    )


def engine_for_bone(engine: FacemaskEngine, bone: str) -> FacemaskEngine:
    """The same engine with another ``bone`` setting, for the audit's escalation. Engines
    without that option (nnU-Net) are returned unchanged: escalation cannot strengthen them,
    so a face that stays visible ends in quarantine."""
    options = getattr(engine, "options", None)
    if options is None or not hasattr(options, "bone") or options.bone == bone:
        return engine
    return type(engine)(dataclasses.replace(options, bone=bone))  # type: ignore[call-arg]


class _Precomputed:
    """An engine that returns a mask already computed (the audit's first level)."""

    def __init__(self, name: str, mask: np.ndarray) -> None:
        self.name, self._mask = name, mask

    def mask(self, hu: np.ndarray, geometry: Geometry) -> np.ndarray:
        return self._mask


def audit_mask(
    engine: FacemaskEngine, mask: np.ndarray, volume: SeriesVolume, settings: Settings
) -> Any:
    """Audit the defaced volume; escalate ``bone`` from the configured level upwards.

    Returns the ``AuditedMask``; raises :class:`ImplausibleMaskError` when the gate finds the
    mask itself implausible (a stronger setting would not help, and there is nothing a
    reviewer could release).
    """
    from inference.audit.report import Verdict, audited_mask

    start = _BONE_RANK.get(settings.deface.bone, 0)
    levels = [b for b in settings.audit.escalation if _BONE_RANK[b] >= start]
    levels = levels or [settings.deface.bone]
    config = settings.audit.model_copy(update={"escalation": tuple(levels)})

    def factory(bone: str) -> FacemaskEngine:
        if bone == levels[0]:
            return _Precomputed(engine.name, mask)  # type: ignore[return-value]
        return engine_for_bone(engine, bone)

    outcome = audited_mask(factory, volume.hu, volume.geometry, config, settings.deface.fill)
    if outcome.history and outcome.history[-1][1].verdict is Verdict.QUARANTINE:
        raise ImplausibleMaskError(outcome.decision.reasons, outcome)
    return outcome


def profile_from_settings(deid: DeidSettings, key: bytes | None = None) -> Any:
    """An :class:`anonymizer.Profile` from the settings (``key`` overrides ``deid.key``)."""
    from anonymizer import Profile

    if key is None:
        if deid.key is None:
            raise ValueError("no de-identification key configured (deid.key)")
        key = deid.key.get_secret_value().encode("utf-8")
    names = {f.name for f in dataclasses.fields(Profile) if f.init} - {"key"}
    values = {n: getattr(deid, n) for n in names if n in DeidSettings.model_fields}
    if "retain_safe_private" in values:
        values["retain_safe_private"] = tuple(values["retain_safe_private"])
    return Profile(key=key, **values)


def deidentifier(profile_or_fn: Any) -> Deidentify:
    """A per-instance de-identification function from a callable or an anonymizer profile."""
    if callable(profile_or_fn):
        return profile_or_fn  # type: ignore[no-any-return]
    from anonymizer import deidentify

    def _apply(ds: Dataset) -> Dataset:
        return deidentify(ds, profile_or_fn, facemask_applied=True)

    return _apply


# -------------------------------------------------------------------------------- pipeline


@contextmanager
def _stage(name: str, label: str, timings: dict[str, float]) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    except StageError:
        raise
    except Exception as exc:
        raise StageError(name, label, exc) from exc
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def assemble_input(
    inputs: Sequence[Dataset] | Sequence[Path | str], settings: Settings
) -> tuple[list[SeriesVolume], dict[str, float]]:
    """Read (if paths) and assemble every series; raises :class:`StageError`."""
    timings: dict[str, float] = {}
    items = list(inputs)
    if items and not isinstance(items[0], Dataset):
        with _stage("read", "input", timings):
            datasets = load_datasets([Path(p) for p in items])  # type: ignore[arg-type]
    else:
        datasets = items  # type: ignore[assignment]
    with _stage("assemble", "input", timings):
        volumes = assemble(
            datasets,
            min_slices=settings.volume.min_slices,
            allow_gaps=settings.volume.allow_gaps,
        )
    return volumes, timings


def deface_volume(
    volume: SeriesVolume,
    engine: FacemaskEngine,
    deidentify: Deidentify,
    settings: Settings,
    *,
    label: str = "series",
    progress: Progress | None = None,
) -> SeriesResult:
    """mask → replace → write back → de-identify one assembled series."""
    timings: dict[str, float] = {}
    if progress is not None:
        progress(f"{label}: facemask", 0, 1)
    with _stage("mask", label, timings):
        mask = np.asarray(engine.mask(volume.hu, volume.geometry))
        if mask.shape != volume.hu.shape or mask.dtype != np.bool_:
            raise TypeError(f"engine returned a {mask.dtype} mask of shape {mask.shape}")
        if not mask.any():
            # Nothing to deface would still be recorded as "facemask applied": fail closed.
            raise FacemaskError(f"the {engine.name} engine returned an empty facemask")
    audited = None
    if settings.audit.enabled:
        with _stage("audit", label, timings):
            audited = audit_mask(engine, mask, volume, settings)
            mask = audited.mask
    with _stage("replace", label, timings):
        fill = fill_value(volume.hu, settings.deface.fill)
        defaced = audited.defaced if audited is not None else replace_masked(volume.hu, mask, fill)
        if audited is not None:
            audited.defaced = None  # the report keeps its renders; the volume goes
    with _stage("writeback", label, timings):
        written = write_back(volume, defaced)
        del defaced
    syntaxes = [str(output_syntax(ds)) for ds in volume.datasets]
    out: list[Dataset] = []
    with _stage("deidentify", label, timings):
        for i, ds in enumerate(written, start=1):
            out.append(deidentify(ds))
            if progress is not None:
                progress(f"{label}: de-identify", i, len(written))
    return SeriesResult(
        label=label,
        datasets=out,
        mask=mask,
        geometry=volume.geometry,
        slices=list(volume.slices),
        fill_hu=float(fill),
        masked_voxels=int(mask.sum()),
        timings=timings,
        warnings=list(volume.warnings),
        transfer_syntaxes=syntaxes,
        audit=audited,
    )


def process_series(
    inputs: Sequence[Dataset] | Sequence[Path | str],
    engine: FacemaskEngine,
    deidentify: Deidentify | Any,
    settings: Settings,
    *,
    progress: Progress | None = None,
) -> list[SeriesResult]:
    """Deface and de-identify every series of ``inputs`` (datasets, files or directories).

    ``deidentify`` is a ``Dataset -> Dataset`` function or an ``anonymizer.Profile``.
    All series are assembled (validated) before the engine runs on any of them.
    """
    deid = deidentifier(deidentify)
    volumes, timings = assemble_input(inputs, settings)
    results = []
    for i, volume in enumerate(volumes, start=1):
        label = f"series #{i} of {len(volumes)}"
        result = deface_volume(volume, engine, deid, settings, label=label, progress=progress)
        result.timings = {**timings, **result.timings} if i == 1 else result.timings
        results.append(result)
        volume.hu = np.empty((0, 0, 0), np.float32)  # free the volume early
    return results


def _uid_name(uid: object) -> str:
    try:
        return safe_uid(str(uid or ""))
    except ValueError:
        raise ValueError("de-identified instance has no valid UID to name its file") from None


def write_series(result: SeriesResult, directory: Path, *, progress: Progress | None = None) -> int:
    """Write the instances of ``result`` into ``directory/<new series UID>/<new SOP UID>.dcm``."""
    series_dir = directory / _uid_name(result.series_uid)
    series_dir.mkdir(parents=True, exist_ok=False)
    for i, ds in enumerate(result.datasets, start=1):
        if progress is not None:
            progress(f"{result.label}: write", i, len(result.datasets))
        meta = ds.file_meta
        # The file meta must name the *new* instance, never the original one.
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        path = series_dir / f"{_uid_name(ds.SOPInstanceUID)}.dcm"
        if path.exists():
            raise ValueError("two de-identified instances share a SOP Instance UID")
        ds.save_as(path, enforce_file_format=True)
    return len(result.datasets)


def _write_masks(
    result: SeriesResult, directory: Path, *, seg: bool, nifti: bool, engine: str
) -> list[str]:
    from inference.seg import facemask_segmentation, write_mask_nifti

    names: list[str] = []
    mask_dir = directory / "masks"
    mask_dir.mkdir(exist_ok=True)
    stem = _uid_name(result.series_uid)
    if seg:
        seg_ds = facemask_segmentation(
            result.mask, result.datasets, result.slices, algorithm=f"defacegate-{engine}"
        )
        seg_ds.save_as(mask_dir / f"{stem}.seg.dcm", enforce_file_format=True)
        names.append(f"masks/{stem}.seg.dcm")
    if nifti:
        write_mask_nifti(result.mask, result.geometry, mask_dir / f"{stem}.nii.gz")
        names.append(f"masks/{stem}.nii.gz")
    return names


def deface_to_directory(
    input: Path | Sequence[Path],
    output: Path,
    settings: Settings,
    engine: FacemaskEngine | None = None,
    *,
    deidentify: Deidentify | Any | None = None,
    overwrite: bool = False,
    save_mask: bool = False,
    save_mask_nifti: bool = False,
    progress: Progress | None = None,
) -> Summary:
    """Deface every series under ``input`` into the new directory ``output``, atomically.

    Without ``deidentify`` the anonymizer profile comes from ``settings.deid``; if no key is
    configured a random per-run key is used (``Summary.random_key``): pseudonyms then differ
    between runs.
    """
    start = time.perf_counter()
    output = Path(output)
    inputs = [Path(input)] if isinstance(input, str | Path) else [Path(p) for p in input]
    out_abs = output.resolve()
    for p in inputs:
        p_abs = p.resolve()
        if out_abs == p_abs or out_abs in p_abs.parents or p_abs in out_abs.parents:
            # --overwrite would delete the originals; inside INPUT, a rerun would read OUTPUT.
            raise ValueError("OUTPUT must not be INPUT, contain it, or lie inside it")
    if output.exists() and not overwrite:
        raise FileExistsError(f"output {output} already exists (use --overwrite)")
    random_key = False
    profile = None
    if deidentify is None:
        key = None
        if settings.deid.key is None:
            key, random_key = secrets.token_bytes(32), True
        deidentify = profile = profile_from_settings(settings.deid, key)
    volumes, timings = assemble_input(inputs, settings)  # reject before loading an engine
    if engine is None:
        with _stage("engine", "input", timings):
            engine = engine_from_settings(settings.deface)
    deid = deidentifier(deidentify)

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        results: list[SeriesResult] = []
        files = 0
        mask_files: list[str] = []
        reid: list[Any] = []
        for i, volume in enumerate(volumes, start=1):
            label = f"series #{i} of {len(volumes)}"
            result = deface_volume(volume, engine, deid, settings, label=label, progress=progress)
            volume.hu = np.empty((0, 0, 0), np.float32)
            if result.quarantined_by_audit:
                # Offline too: a face the detector still finds is never written out.
                reasons = tuple(result.audit.decision.reasons)
                raise StageError("audit", label, FaceStillVisibleError(reasons, result.audit))
            if profile is not None and settings.deid.reid_lookup_path is not None:
                from anonymizer import reid_record

                reid.append(reid_record(volume.datasets[0], profile))
            if i == 1:
                result.timings = {**timings, **result.timings}
            with _stage("write", label, result.timings):
                files += write_series(result, tmp, progress=progress)
                if save_mask or save_mask_nifti:
                    mask_files += _write_masks(
                        result, tmp, seg=save_mask, nifti=save_mask_nifti, engine=engine.name
                    )
            results.append(result)
        _replace_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if reid and settings.deid.reid_lookup_path is not None:
        from anonymizer import write_reid_records

        # The lookup (PHI) goes only where the administrator configured it, after success.
        write_reid_records(settings.deid.reid_lookup_path, reid)
    return Summary(
        output=output,
        engine=engine.name,
        series=results,
        files=files,
        random_key=random_key,
        seconds=time.perf_counter() - start,
        mask_files=mask_files,
    )


def _replace_dir(tmp: Path, output: Path) -> None:
    """Move the finished ``tmp`` to ``output``; an existing ``output`` is replaced."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; give it a normal mkdir's mode
    if not output.exists():
        os.replace(tmp, output)
        return
    old = output.with_name(f".{output.name}.old-{secrets.token_hex(4)}")
    os.replace(output, old)
    try:
        os.replace(tmp, output)
    except BaseException:
        os.replace(old, output)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()
