"""SQLAlchemy 2 models: what the node knows about every study, instance, run, delivery and association.

Schema changes go through Alembic (``db/migrations``); ``omnict-node db upgrade`` applies them. Every type here
works on PostgreSQL (production, tests) and SQLite (embedded default).

No patient names, IDs or birth dates are stored here: the node keys everything by UIDs, and the DICOM files
themselves are the record of the patient data.
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import JSON, TypeDecorator

UID = String(64)  # DICOM UIDs are at most 64 characters (PS3.5 9.1)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class UtcDateTime(TypeDecorator):
    """``DateTime(timezone=True)`` read back as aware UTC on every database: SQLite returns naive values, and
    everything stored here is UTC (:func:`utcnow`)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: dt.datetime | None, dialect) -> dt.datetime | None:
        return as_utc(value) if value is not None else None


def as_utc(value: dt.datetime) -> dt.datetime:
    """A datetime read back from the database as aware UTC. ORM columns get this from :class:`UtcDateTime`;
    rows of hand-written SQL (``text()`` / Core selects of expressions) do not, and SQLite returns them naive."""
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dt.datetime: UtcDateTime()}


class RunState(str, enum.Enum):
    """States of a pipeline run; see db.states for the allowed transitions."""

    RECEIVING = "receiving"
    COMPLETE = "complete"
    ASSEMBLING = "assembling"
    SEGMENTING = "segmenting"
    INFERRING = "inferring"
    REPORTING = "reporting"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    DELIVERY_FAILED = "delivery_failed"
    FAILED = "failed"


def _enum(e: type[enum.Enum], name: str) -> Enum:
    # Stored as plain strings (no native PG enum) so new states need no ALTER TYPE.
    return Enum(e, name=name, native_enum=False, length=32, values_callable=lambda x: [m.value for m in x])


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True, index=True)
    modalities: Mapped[str | None] = mapped_column(String(64))
    study_date: Mapped[str | None] = mapped_column(String(8))
    requested_priority: Mapped[str | None] = mapped_column(String(16), doc="DICOM (0040,1003) / (0040,A010)-style priority of the order, when sent.")
    source_ae_title: Mapped[str | None] = mapped_column(String(16), doc="Calling AE of the association that sent the first instance.")
    first_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    series: Mapped[list["Series"]] = relationship(back_populates="study", cascade="all, delete-orphan")
    runs: Mapped[list["PipelineRun"]] = relationship(back_populates="study", order_by="PipelineRun.run_number")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True, index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    first_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list["Instance"]] = relationship(back_populates="series", cascade="all, delete-orphan")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text, doc="Relative to the storage root.")
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id", ondelete="SET NULL"))
    revision: Mapped[int] = mapped_column(Integer, default=1, doc="Bumped when a different dataset replaces this SOP Instance UID.")

    series: Mapped[Series] = relationship(back_populates="instances")


class PipelineRun(Base):
    """One pass of the pipeline over a study. A late instance after a run left RECEIVING opens a new run."""

    __tablename__ = "pipeline_runs"
    __table_args__ = (UniqueConstraint("study_id", "run_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    run_number: Mapped[int] = mapped_column(Integer)
    state: Mapped[RunState] = mapped_column(_enum(RunState, "run_state"), default=RunState.RECEIVING, index=True)
    trigger: Mapped[str] = mapped_column(String(16), default="received", doc="received | late_instance | forced | rerun")
    opened_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[dt.datetime | None] = mapped_column(doc="When the study was declared complete.")
    completion_reason: Mapped[str | None] = mapped_column(String(16), doc="quiet | hard_limit | forced")
    dispatched_at: Mapped[dt.datetime | None] = mapped_column(doc="When the first stage was handed to the workers.")
    finished_at: Mapped[dt.datetime | None] = mapped_column()
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict | None] = mapped_column(JSON, doc="Stage outputs: selected series, volume geometry, findings summary.")

    study: Mapped[Study] = relationship(back_populates="runs")
    stages: Mapped[list["StageRecord"]] = relationship(back_populates="run", order_by="StageRecord.id", cascade="all, delete-orphan")


Index("ix_runs_study_state", PipelineRun.study_id, PipelineRun.state)


class StageRecord(Base):
    """Timing and outcome of one stage attempt of a run."""

    __tablename__ = "run_stages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("pipeline_runs.id", ondelete="CASCADE"), index=True)
    stage: Mapped[str] = mapped_column(String(32))
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column()
    duration_s: Mapped[float | None] = mapped_column(Float)
    outcome: Mapped[str] = mapped_column(String(16), default="running", doc="running | ok | retry | failed")
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(128))

    run: Mapped[PipelineRun] = relationship(back_populates="stages")


class Delivery(Base):
    """Results of a run sent to one destination."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("pipeline_runs.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(128), doc="AE@host:port")
    state: Mapped[str] = mapped_column(String(16), default="pending", doc="pending | delivered | failed")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[dt.datetime | None] = mapped_column()
    sop_instance_uids: Mapped[list | None] = mapped_column(JSON)


class Association(Base):
    """Audit log: one row per DICOM association (accepted or rejected)."""

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    called_ae_title: Mapped[str | None] = mapped_column(String(16))
    peer_address: Mapped[str | None] = mapped_column(String(64))
    peer_port: Mapped[int | None] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[dt.datetime | None] = mapped_column()
    duration_s: Mapped[float | None] = mapped_column(Float)
    instances_stored: Mapped[int] = mapped_column(Integer, default=0)
    instances_failed: Mapped[int] = mapped_column(Integer, default=0)
    bytes_received: Mapped[int] = mapped_column(BigInteger, default=0)
    outcome: Mapped[str] = mapped_column(String(16), default="open", doc="open | released | aborted | rejected")
    detail: Mapped[str | None] = mapped_column(Text, doc="Reject reason or abort cause.")
    tls: Mapped[bool] = mapped_column(Boolean, default=False)


class QuarantinedInstance(Base):
    """Bytes the node received but did not accept into the store; kept for an operator."""

    __tablename__ = "quarantine"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(String(32), doc="undecodable | invalid_uid | missing_uid | wrong_sop_class | uid_conflict | ...")
    detail: Mapped[str | None] = mapped_column(Text)
    status_code: Mapped[int | None] = mapped_column(Integer, doc="DIMSE status answered to the sender.")
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    study_instance_uid: Mapped[str | None] = mapped_column(UID)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id", ondelete="SET NULL"))
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)


class AuditEvent(Base):
    """Operator-visible events (forced completion, reruns, state changes by hand)."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    event: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str | None] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    run_id: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[dict | None] = mapped_column(JSON)


class Finding(Base):
    """One answered question of a run's battery (written by the pipeline's infer stage)."""

    __tablename__ = "findings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("pipeline_runs.id", ondelete="CASCADE"), index=True)
    question_id: Mapped[str] = mapped_column(String(64), doc="Identifier of the question in the protocol.")
    question: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text)
    organ: Mapped[str | None] = mapped_column(String(64), doc="TotalSegmentator label name of the finding site.")
    code_value: Mapped[str | None] = mapped_column(String(32))
    code_scheme: Mapped[str | None] = mapped_column(String(16), doc="SCT | DCM | ...")
    code_meaning: Mapped[str | None] = mapped_column(String(128))
    positive: Mapped[bool | None] = mapped_column(Boolean, doc="For judgment questions: the finding is present.")
    critical: Mapped[bool] = mapped_column(Boolean, default=False, doc="A critical finding (e.g. pneumothorax): STAT.")
    urgency_weight: Mapped[float] = mapped_column(Float, default=0.0, doc="Protocol weight when the finding is present.")
    key_slices: Mapped[list | None] = mapped_column(JSON, doc="Source slice indices the answer drew on, most relevant first.")
    key_sop_instance_uids: Mapped[list | None] = mapped_column(JSON)


class OrganMeasurement(Base):
    """Per-organ measurements of a run (segmentation stage)."""

    __tablename__ = "organ_measurements"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("pipeline_runs.id", ondelete="CASCADE"), index=True)
    organ: Mapped[str] = mapped_column(String(64))
    volume_ml: Mapped[float] = mapped_column(Float)
    mean_hu: Mapped[float] = mapped_column(Float)
    std_hu: Mapped[float] = mapped_column(Float)


class ResultObject(Base):
    """A DICOM object the node generated for a run (SR, SEG, KOS), stored under the data folder."""

    __tablename__ = "result_objects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("pipeline_runs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32), doc="measurement_sr | findings_sr | narrative_sr | seg | kos")
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    path: Mapped[str] = mapped_column(Text, doc="Relative to the data folder.")
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class WorklistItem(Base):
    """A study on the radiologists' worklist: its urgency and who is reading it."""

    __tablename__ = "worklist_items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), unique=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("pipeline_runs.id", ondelete="SET NULL"))
    urgency_score: Mapped[float] = mapped_column(Float, default=0.0, doc="From the findings (protocol weights).")
    stat: Mapped[bool] = mapped_column(Boolean, default=False, doc="A critical finding is present.")
    requested_priority: Mapped[str | None] = mapped_column(String(16), doc="The order's DICOM priority (STAT/HIGH/ROUTINE/MEDIUM/LOW).")
    ready_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True, doc="When results became available (aging starts).")
    status: Mapped[str] = mapped_column(String(16), default="unread", index=True, doc="unread | claimed | completed")
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    claimed_at: Mapped[dt.datetime | None] = mapped_column()
    completed_at: Mapped[dt.datetime | None] = mapped_column()
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
