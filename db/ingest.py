"""Registering received instances: the database half of "acknowledged means durable".

The storage SCP writes each instance durably, then hands an :class:`InstanceRecord` here (batched by
``dicom_node.registrar`` so that one transaction commits many instances). Registration

* upserts the study, series and instance rows and moves their ``last_received_at`` timers forward (the
  completeness sweeper reads those timers, so they must be in the database to survive a restart);
* is idempotent: registering the same SOP Instance UID at the same path again changes nothing but the timers;
* opens a new pipeline run when an instance arrives for a study whose latest run has already left RECEIVING,
  so a late instance is never lost (trigger ``late_instance``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Instance, PipelineRun, RunState, Series, Study, utcnow


@dataclass(frozen=True)
class InstanceRecord:
    """What the SCP knows about one stored instance (UIDs and file facts only: no patient data)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str  # relative to the storage root
    size_bytes: int
    modality: str | None = None
    series_number: int | None = None
    instance_number: int | None = None
    study_date: str | None = None
    requested_priority: str | None = None
    calling_ae_title: str | None = None
    association_id: int | None = None
    replaces_existing: bool = False  # a different dataset under an already stored SOP Instance UID
    received_at: dt.datetime = field(default_factory=utcnow)


@dataclass(frozen=True)
class RegistrationOutcome:
    sop_instance_uid: str
    created: bool  # False: the instance was already registered (identical re-send)
    opened_run_number: int | None  # a new run was opened by this instance


def register_instances(session: Session, records: Sequence[InstanceRecord]) -> list[RegistrationOutcome]:
    """Upsert ``records`` in the current transaction (the caller commits). Returns one outcome per record."""
    studies = _studies_for(session, records)
    series = _series_for(session, records, studies)
    existing = {
        inst.sop_instance_uid: inst
        for inst in session.scalars(
            select(Instance).where(Instance.sop_instance_uid.in_({r.sop_instance_uid for r in records}))
        )
    }
    changed_study_uids = {
        r.study_instance_uid for r in records if r.sop_instance_uid not in existing or r.replaces_existing
    }
    open_runs = _ensure_open_runs(session, [studies[uid] for uid in changed_study_uids])

    outcomes: list[RegistrationOutcome] = []
    for record in records:
        study = studies[record.study_instance_uid]
        one_series = series[record.series_instance_uid]
        instance = existing.get(record.sop_instance_uid)
        created = instance is None
        if created:
            instance = Instance(
                series=one_series,
                sop_instance_uid=record.sop_instance_uid,
                sop_class_uid=record.sop_class_uid,
                transfer_syntax_uid=record.transfer_syntax_uid,
                instance_number=record.instance_number,
                path=record.path,
                size_bytes=record.size_bytes,
                received_at=record.received_at,
                association_id=record.association_id,
            )
            session.add(instance)
            existing[record.sop_instance_uid] = instance
            one_series.instance_count += 1
            study.instance_count += 1
        elif record.replaces_existing:
            instance.revision += 1
            instance.path = record.path
            instance.size_bytes = record.size_bytes
            instance.transfer_syntax_uid = record.transfer_syntax_uid
            instance.received_at = record.received_at
            instance.association_id = record.association_id
        if created or record.replaces_existing:
            # Only new content moves the completeness timers; an identical re-send does not delay a study.
            _touch(study, one_series, record.received_at)
        opened = open_runs.pop(study.id, None) if (created or record.replaces_existing) else None
        outcomes.append(RegistrationOutcome(record.sop_instance_uid, created, opened))
    return outcomes


def _touch(study: Study, series: Series, at: dt.datetime) -> None:
    study.last_received_at = max(_aware(study.last_received_at), at)
    series.last_received_at = max(_aware(series.last_received_at), at)


def _aware(value: dt.datetime) -> dt.datetime:
    # SQLite returns naive datetimes even for timezone-aware columns; everything we store is UTC.
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def _studies_for(session: Session, records: Sequence[InstanceRecord]) -> dict[str, Study]:
    wanted = {r.study_instance_uid: r for r in records}
    found = {s.study_instance_uid: s for s in session.scalars(select(Study).where(Study.study_instance_uid.in_(wanted)))}
    for uid, record in wanted.items():
        if uid not in found:
            study = Study(
                study_instance_uid=uid,
                modalities=record.modality,
                study_date=record.study_date,
                requested_priority=record.requested_priority,
                source_ae_title=record.calling_ae_title,
                first_received_at=record.received_at,
                last_received_at=record.received_at,
                instance_count=0,
            )
            session.add(study)
            found[uid] = study
        else:
            _merge_modality(found[uid], record.modality)
    session.flush()
    return found


def _merge_modality(study: Study, modality: str | None) -> None:
    if not modality:
        return
    present = set(filter(None, (study.modalities or "").split("\\")))
    if modality not in present:
        study.modalities = "\\".join(sorted(present | {modality}))[:64]


def _series_for(session: Session, records: Sequence[InstanceRecord], studies: dict[str, Study]) -> dict[str, Series]:
    wanted = {r.series_instance_uid: r for r in records}
    found = {s.series_instance_uid: s for s in session.scalars(select(Series).where(Series.series_instance_uid.in_(wanted)))}
    for uid, record in wanted.items():
        if uid not in found:
            one = Series(
                study_id=studies[record.study_instance_uid].id,
                series_instance_uid=uid,
                modality=record.modality,
                series_number=record.series_number,
                first_received_at=record.received_at,
                last_received_at=record.received_at,
                instance_count=0,
            )
            session.add(one)
            found[uid] = one
    session.flush()
    return found


def _ensure_open_runs(session: Session, studies) -> dict[int, int]:
    """Make sure each study has a run in RECEIVING; return {study_id: run_number} for runs opened here."""
    opened: dict[int, int] = {}
    for study in studies:
        latest = session.scalars(
            select(PipelineRun).where(PipelineRun.study_id == study.id).order_by(PipelineRun.run_number.desc()).limit(1)
        ).first()
        if latest is not None and latest.state == RunState.RECEIVING:
            continue
        number = 1 if latest is None else latest.run_number + 1
        session.add(
            PipelineRun(
                study_id=study.id,
                run_number=number,
                state=RunState.RECEIVING,
                trigger="received" if latest is None else "late_instance",
            )
        )
        opened[study.id] = number
    session.flush()
    return opened
