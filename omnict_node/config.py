"""All configuration of the node, in one typed model.

Sources, lowest precedence first: the defaults below (which need no servers: an SQLite file and an embedded
Celery transport under one data folder), a TOML file (``omnict-node --config FILE``), then environment variables
``OMNICT_<SECTION>__<FIELD>`` (for example ``OMNICT_DATABASE__URL`` or ``OMNICT_DICOM__PORT``).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from api.settings import ApiAuthSettings, WorklistRules  # pure pydantic models: no web framework imported

DEFAULT_DATA_DIR = Path(os.environ.get("OMNICT_DATA_DIR", "omnict-data"))


class Section(BaseModel):
    """A configuration section: unknown keys are errors (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid")


class TlsSettings(Section):
    """DICOM TLS (PS3.15 B.1). Off unless ``enabled``; paths are PEM files."""

    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = Field(None, description="CA bundle that peer certificates must chain to.")
    require_peer_certificate: bool = True


class PeerSettings(Section):
    """One DICOM peer allowed to open associations (calling AE title + source address)."""

    ae_title: str
    host: str = Field(description="IP address the association must come from; '*' for any address.")
    port: int | None = Field(None, description="The peer's own SCP port: a C-MOVE destination, and where results go "
                                               "when this peer sent the study and no destinations are configured.")
    tls: TlsSettings = Field(default_factory=TlsSettings)


class DestinationSettings(Section):
    """A DICOM node results are sent to (C-STORE SCP)."""

    ae_title: str
    host: str
    port: int
    tls: TlsSettings = Field(default_factory=TlsSettings)


class DicomSettings(Section):
    """The node's DICOM application entity."""

    ae_title: str = "OMNICT"
    host: str = "127.0.0.1"
    port: int = 11112
    max_pdu_bytes: int = Field(131072, description="Maximum PDU length we accept (dcmtk sends at most 128 KiB).")
    allowed_peers: list[PeerSettings] = Field(
        default_factory=list,
        description="Calling AE + address allow-list; empty means any peer (a warning is logged at start).",
    )
    max_associations: int = 10
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    tls: TlsSettings = Field(default_factory=TlsSettings)
    destinations: list[DestinationSettings] = Field(
        default_factory=list,
        description="Where results go; empty means back to the AE that sent the study (if known as a peer).",
    )


class StorageSettings(Section):
    """Where received instances live, and when the node stops accepting data."""

    root: Path | None = Field(None, description="Instance store; default <data_dir>/storage.")
    quarantine: Path | None = Field(None, description="Undecodable or conflicting instances; default <data_dir>/quarantine.")
    min_free_bytes: int = Field(5 * 1024**3, description="Below this free space, C-STORE answers 0xA700.")
    max_used_fraction: float = Field(0.95, description="Above this used fraction of the volume, C-STORE answers 0xA700.")
    reject_associations_under_pressure: bool = True
    fsync: bool = Field(True, description="fsync each file and its directory before success goes out. Never off in production.")


class DatabaseSettings(Section):
    url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<data_dir>/omnict.db.")
    echo: bool = False
    registration_batch_max: int = Field(256, description="Most instance registrations committed in one transaction.")
    fsync_registrations: bool = Field(
        False, description="Flush every instance-registration commit to disk on its own. Off by default: the "
                           "instance files are always fsynced before success is answered, and at start the SCP "
                           "registers any stored file whose row a power cut rolled back (dicom_node.reconcile).")


class CompletenessSettings(Section):
    """When a study counts as complete (timers are kept in the database, so they survive restarts)."""

    series_quiet_s: float = Field(60.0, description="A series is stable after this long without a new instance.")
    study_quiet_s: float = Field(180.0, description="A study is complete after this long without a new instance, "
                                                     "and only when every series is stable.")
    hard_limit_s: float = Field(5400.0, description="A study still receiving this long after its first instance is completed anyway.")
    sweep_interval_s: float = 1.0


class WorkerSettings(Section):
    broker_url: str | None = Field(None, description="Celery broker; default: embedded filesystem transport under <data_dir>/broker.")
    concurrency: int = 1
    embedded_worker: bool = Field(True, description="`omnict-node serve` starts its worker processes itself.")
    embedded_queues: list[str] = Field(
        ["gpu", "cpu"], min_length=1,
        description="The embedded worker processes, one per entry, each consuming the queues it names (comma-separated): "
                    "by default one for the models and one for encoding and delivery, so that the SEG and measurement "
                    "SR are encoded and sent while inference runs; [\"cpu,gpu\"] for a single process.")
    embedded_threads: int | None = Field(
        None, ge=1,
        description="Compute threads (OMP_NUM_THREADS: torch, BLAS) of each embedded worker process; default: the "
                    "machine's cores shared out among them (at least 1), so that inference and the encoding beside it "
                    "do not fight over the same cores. An OMP_NUM_THREADS already set in the environment wins.")
    task_max_retries: int = 5
    retry_backoff_s: float = 5.0
    stall_timeout_s: float = Field(120.0, ge=20.0, description="A stage whose worker sent no heartbeat (every 5 s) for this "
                                                               "long is run again (its worker died); a run untouched this long after a "
                                                               "stage finished or after its dispatch gets its next stage again (the "
                                                               "message was lost).")


class ModelSettings(Section):
    checkpoint: Path | None = Field(None, description="OmniCT checkpoint directory; default: the shipped demo checkpoint.")
    protocol: Path | None = Field(None, description="Question protocol (TOML); default: workers/protocols/default.toml.")
    max_new_tokens: int = 24
    report_max_new_tokens: int = 160
    closed_answers: Literal["rank", "generate"] = Field(
        "rank", description="Protocol (yes/no) questions: 'rank' answers with the likelier of Yes / No under the model "
                            "(always a valid answer); 'generate' keeps the model's greedy text.")
    device: str = "cpu"
    segmentation_backend: str = Field("classical", description="'classical' (no weights) or 'totalsegmentator'.")
    totalseg_weights: Path | None = Field(None, description="Local TotalSegmentator weights folder (never downloaded).")


class ApiSettings(Section):
    """The query API and worklist web page (``api/``); tokens and worklist rules are typed in api/settings.py."""

    host: str = "127.0.0.1"
    port: int = 8042
    enabled: bool = True
    threads: int = Field(8, description="Threads serving the (synchronous) database endpoints.")
    auth: ApiAuthSettings = Field(default_factory=ApiAuthSettings)
    worklist: WorklistRules = Field(default_factory=WorklistRules)


class Settings(BaseSettings):
    """The node's whole configuration."""

    model_config = SettingsConfigDict(env_prefix="OMNICT_", env_nested_delimiter="__", extra="forbid")

    data_dir: Path = DEFAULT_DATA_DIR
    log_level: str = "INFO"
    dicom: DicomSettings = Field(default_factory=DicomSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    completeness: CompletenessSettings = Field(default_factory=CompletenessSettings)
    workers: WorkerSettings = Field(default_factory=WorkerSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the TOML file, which arrives as init kwargs (see load_settings).
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _fill_derived_paths(self) -> "Settings":
        self.data_dir = self.data_dir.expanduser().absolute()
        if self.storage.root is None:
            self.storage.root = self.data_dir / "storage"
        if self.storage.quarantine is None:
            self.storage.quarantine = self.data_dir / "quarantine"
        if self.database.url is None:
            self.database.url = f"sqlite:///{self.data_dir / 'omnict.db'}"
        if self.workers.broker_url is None:
            self.workers.broker_url = "filesystem://"
        return self

    def to_environment(self) -> dict[str, str]:
        """``OMNICT_*`` variables that reproduce these settings exactly in a child process (sections as JSON)."""
        env = {"OMNICT_DATA_DIR": str(self.data_dir), "OMNICT_LOG_LEVEL": self.log_level}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, BaseModel):
                env[f"OMNICT_{name.upper()}"] = value.model_dump_json()
        return env

    @property
    def broker_dir(self) -> Path:
        """Folder of the embedded filesystem broker (used when broker_url is ``filesystem://``)."""
        return self.data_dir / "broker"

    @property
    def is_embedded_broker(self) -> bool:
        return str(self.workers.broker_url).startswith("filesystem://")


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build the settings from an optional TOML file, ``OMNICT_*`` environment variables and explicit overrides.

    ``OMNICT_CONFIG`` names the TOML file when ``config_file`` is not given.
    """
    config_file = config_file or os.environ.get("OMNICT_CONFIG")
    values: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"configuration file not found: {path}")
        values = tomllib.loads(path.read_text())
    _deep_update(values, overrides)
    return Settings(**values)


def _deep_update(target: dict[str, Any], updates: dict[str, Any]) -> None:
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value
