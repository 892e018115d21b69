"""The one settings object: YAML file + ``DEFACEGATE_*`` environment variables + defaults.

Precedence (highest first): explicit init kwargs, environment variables
(``DEFACEGATE_SECTION__FIELD``, e.g. ``DEFACEGATE_DEFACE__ENGINE=nnunet``), the YAML file
(``--config FILE`` or ``DEFACEGATE_CONFIG``), then the defaults below. Built once in the
entry point and passed down; nothing reads the environment at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VolumeSettings(_Section):
    """How a received series is turned into a volume (inference.series)."""

    min_slices: int = Field(20, ge=1, description="Fewer slices than this → rejected.")
    allow_gaps: bool = Field(False, description="Accept gaps > 1.5 × median slice spacing.")


class DefaceSettings(_Section):
    """Facemask engine and pixel replacement."""

    engine: Literal["anatomical", "nnunet"] = "anatomical"
    fill: str = Field(
        "air", description="'air' (−1000 HU), 'p10' (CTA-DEFACE: 10th percentile) or a number."
    )
    bone: Literal["keep", "smooth", "remove"] = Field(
        "keep", description="Facial bone handling of the anatomical engine."
    )
    include_ears: bool = False
    surface_band_mm: float = Field(
        0.0, ge=0.0, le=3.0, description="Randomised band at the cut surface (0 = off)."
    )
    model_dir: Path | None = Field(None, description="Installed nnU-Net model folder.")
    models_root: Path = Field(Path("~/.local/share/defacegate/models").expanduser())
    roi: bool = Field(True, description="nnU-Net: predict only on the face ROI crop.")
    tta: bool = Field(False, description="nnU-Net test-time mirroring (×8 CPU time).")
    model_axes: str = Field(
        "SAL",
        pattern=r"^(native|[LRAPSI]{3})$",
        description="nnU-Net: where the model's array axes point ('SAL' = dcm2niix NIfTI "
        "read by nnU-Net's SimpleITKIO, as CTA-DEFACE) or 'native' (DICOM slice/row/col).",
    )

    @field_validator("models_root", "model_dir")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return None if v is None else Path(v).expanduser()

    @field_validator("fill")
    @classmethod
    def _check_fill(cls, v: str) -> str:
        if v in ("air", "p10"):
            return v
        try:
            float(v)
        except ValueError:
            raise ValueError("fill must be 'air', 'p10' or a number of HU") from None
        return v


class DeidSettings(_Section):
    """Header de-identification profile (PS3.15 Annex E) and pseudonym keys."""

    # Validation errors must never echo the input: it holds the key.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    key: SecretStr | None = Field(
        None, description="HMAC key for UIDs, IDs and date shifts. Required by the gateway."
    )
    key_file: Path | None = Field(
        None, description="File holding the key (e.g. a container secret), instead of key."
    )
    project_prefix: str = Field("DG", pattern=r"^[A-Za-z0-9]{1,16}$")
    retain_longitudinal_modified_dates: bool = False
    retain_patient_characteristics: bool = False
    retain_device_identity: bool = False
    retain_institution_identity: bool = False
    clean_descriptors: bool = True
    retain_safe_private: list[str] = Field(default_factory=list)
    retain_uids: bool = False
    reid_lookup_path: Path | None = None

    @model_validator(mode="after")
    def _load_key(self) -> DeidSettings:
        """Read ``key_file`` once, here in the entry point; check the key's length."""
        if self.key_file is not None:
            if self.key is not None:
                raise ValueError("set deid.key or deid.key_file, not both")
            try:
                text = self.key_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"deid.key_file unreadable: {exc.strerror}") from None
            object.__setattr__(self, "key", SecretStr(text))  # frozen model: set once here
        if self.key is not None and len(self.key.get_secret_value().encode()) < 16:
            raise ValueError("deid.key must be at least 16 bytes")
        return self


class DestinationTLS(_Section):
    """DICOM TLS (PS3.15 B.1) towards one destination; files are PEM."""

    ca_file: Path | None = Field(None, description="CA bundle to verify the destination's cert.")
    cert_file: Path | None = Field(None, description="Client certificate, if the peer wants one.")
    key_file: Path | None = Field(None, description="Private key of cert_file.")
    check_hostname: bool = Field(False, description="Match the certificate against host.")


class Destination(_Section):
    """One C-STORE destination (research PACS) the defaced series is forwarded to."""

    ae_title: str = Field(..., min_length=1, max_length=16)
    host: str = Field(..., min_length=1)
    port: int = Field(..., ge=1, le=65535)
    tls: DestinationTLS | None = None


class ForwardSettings(_Section):
    """C-STORE SCU behaviour (gateway.forward)."""

    calling_ae_title: str = Field("DEFACEGATE", min_length=1, max_length=16)
    retries: int = Field(6, ge=0, description="Retries after the first attempt, then dead-letter.")
    backoff_base_s: float = Field(5.0, gt=0, description="First retry delay; doubles each time.")
    backoff_cap_s: float = Field(300.0, gt=0, description="Longest delay between retries.")
    connect_timeout_s: float = Field(10.0, gt=0, description="TCP connect timeout.")
    acse_timeout_s: float = Field(30.0, gt=0, description="Association negotiation timeout.")
    dimse_timeout_s: float = Field(60.0, gt=0, description="Wait for each C-STORE response.")
    network_timeout_s: float = Field(60.0, gt=0, description="Idle association timeout.")
    max_pdu: int = Field(
        0, ge=0, description="Maximum PDU we receive (0 = unlimited; pynetdicom default 16 KiB)."
    )


class CallerSettings(_Section):
    """One calling AE allowed to send to the gateway, optionally only from one source address."""

    ae_title: str = Field(..., min_length=1, max_length=16)
    host: str | None = Field(None, description="Source IP it must connect from (None = any).")


class ScpTLS(_Section):
    """DICOM TLS on the gateway's listening port (PS3.15 B.1); files are PEM."""

    cert_file: Path = Field(..., description="Server certificate chain.")
    key_file: Path = Field(..., description="Private key of cert_file.")
    ca_file: Path | None = Field(None, description="CA bundle that signs client certificates.")
    require_client_cert: bool = Field(False, description="Reject peers without a valid cert.")


class GatewaySettings(_Section):
    """C-STORE SCP, spool and series assembly (gateway.scp, gateway.spool, gateway.state)."""

    ae_title: str = Field("DEFACEGATE", min_length=1, max_length=16)
    host: str = Field("0.0.0.0", description="Listening address.")
    port: int = Field(11112, ge=0, le=65535, description="Listening port (0 = ephemeral).")
    allowed_callers: list[CallerSettings] | None = Field(
        None, description="Calling AE allow-list; None accepts any calling AE (logged)."
    )
    check_called_ae: bool = Field(True, description="Reject associations to another AE title.")
    tls: ScpTLS | None = None
    max_associations: int = Field(10, ge=1)
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(120.0, gt=0)
    max_pdu: int = Field(
        1_048_576, ge=0, description="Largest PDU we accept (0 = unlimited; pynetdicom: 16 KiB)."
    )
    spool_dir: Path = Field(Path("~/.local/share/defacegate/spool").expanduser())
    state_db: Path | None = Field(None, description="SQLite file; default spool_dir/state.db.")
    fsync: bool = Field(True, description="fsync every spooled instance before Success.")
    quiet_period_s: float = Field(10.0, ge=0, description="No new instance this long → stable.")
    max_pending_series: int = Field(
        50, ge=1, description="Unfinished series beyond which new series get Out of Resources."
    )
    free_space_floor_mb: int = Field(1024, ge=0, description="Refuse stores below this free.")
    retention_hours: float | None = Field(
        24.0, ge=0, description="Keep finished series this long (None = forever, 0 = at once)."
    )
    lease_timeout_s: float = Field(
        120.0, gt=0, description="A task silent this long is presumed dead and re-dispatched."
    )
    poll_interval_s: float = Field(0.5, gt=0, description="Scheduler tick.")

    @field_validator("spool_dir", "state_db")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return None if v is None else Path(v).expanduser()

    @property
    def state_path(self) -> Path:
        """Where the SQLite state lives."""
        return self.state_db or self.spool_dir / "state.db"


class CelerySettings(_Section):
    """Distributed mode (a broker URL) or embedded mode (None: tasks run inside `serve`)."""

    broker_url: str | None = Field(None, description="e.g. redis://host:6379/0; None = embedded.")
    result_backend: str | None = Field(None, description="Task results are not needed.")
    visibility_timeout_s: int = Field(
        6 * 3600, ge=60, description="Redis redelivers unacked tasks after this; ≫ inference."
    )


class AuditSettings(_Section):
    """Privacy audit and QA gate after defacing (inference.audit): render, detect, decide."""

    enabled: bool = Field(True, description="Audit every defaced series before forwarding.")
    detect_threshold: float = Field(
        0.5,
        description="dlib HOG score above which a defaced render counts as a face "
        "(phantoms: faces 1.1–2.3 frontal, defaced skulls ≤ 0.4; see docs/audit.md).",
    )
    reid_distance: float | None = Field(
        None,
        gt=0,
        description="Also escalate when the defaced embedding is closer than this to the "
        "original (dlib: 0.6 for photos; uncalibrated on renders, so off by default).",
    )
    escalation: tuple[Literal["keep", "smooth", "remove"], ...] = Field(
        ("keep", "smooth", "remove"),
        min_length=1,
        description="Engine `bone` settings tried in turn while a face is still detected.",
    )
    render_size: int = Field(512, ge=128, le=2048, description="Render width = height, px.")
    yaws: tuple[float, ...] = Field(
        (-30.0, 0.0, 30.0), min_length=1, description="View angles about superior, degrees."
    )
    iso_hu: float = Field(-400.0, ge=-700.0, le=-200.0, description="Skin iso-surface, HU.")
    upsample: int = Field(
        0, ge=0, le=2, description="dlib HOG pyramid upsampling (renders show ~250 px faces)."
    )
    min_mask_ml: float = Field(20.0, ge=0.0, description="Smaller facemask → implausible.")
    max_brain_overlap_ml: float = Field(
        1.0, ge=0.0, description="Mask volume inside the intracranial space → implausible."
    )
    cnn_detector: bool = Field(
        False, description="Also run dlib's CNN (MMOD) face detector (~+2.5 s CPU per audit)."
    )
    cnn_threshold: float = Field(
        0.5, description="CNN confidence above which a defaced render counts as a face."
    )


class AdminSettings(_Section):
    """HTTP admin API, dashboard and Prometheus metrics (served by `defacegate serve`)."""

    enabled: bool = True
    host: str = Field("127.0.0.1", description="Bind address; non-loopback requires a token.")
    port: int = Field(8080, ge=0, le=65535, description="0 = ephemeral (tests).")
    token: SecretStr | None = Field(None, description="Bearer token for /api and /metrics.")

    @model_validator(mode="after")
    def _token_when_exposed(self) -> AdminSettings:
        loopback = self.host in ("127.0.0.1", "::1", "localhost")
        if self.enabled and not loopback and self.token is None:
            raise ValueError("admin.token is required when admin.host is not a loopback address")
        return self


class Settings(BaseSettings):
    """All configuration of defacegate. See config/defacegate.example.yaml."""

    model_config = SettingsConfigDict(
        env_prefix="DEFACEGATE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,  # errors must not echo secrets (deid.key, broker URLs)
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = Field(
        "text", description="'json': one JSON object per line, for a log shipper."
    )
    volume: VolumeSettings = VolumeSettings()
    deface: DefaceSettings = DefaceSettings()
    deid: DeidSettings = DeidSettings()
    destinations: list[Destination] = Field(
        default_factory=list, description="Where de-identified series are forwarded."
    )
    forward: ForwardSettings = ForwardSettings()
    gateway: GatewaySettings = GatewaySettings()
    celery: CelerySettings = CelerySettings()
    audit: AuditSettings = AuditSettings()
    admin: AdminSettings = AdminSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_file = _CONFIG_FILE.get("path")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        sources.append(file_secret_settings)
        return tuple(sources)


# Passes the chosen file into settings_customise_sources for the duration of load_settings().
_CONFIG_FILE: dict[str, Path | None] = {}


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build the settings object once, from ``config_file`` (or ``$DEFACEGATE_CONFIG``)."""
    path = config_file or os.environ.get("DEFACEGATE_CONFIG")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
    _CONFIG_FILE["path"] = path
    try:
        return Settings(**overrides)
    finally:
        _CONFIG_FILE.clear()
