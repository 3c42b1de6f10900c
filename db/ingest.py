"""Registering received instances: the database half of "acknowledged means durable".

The storage SCP writes each instance durably, then hands an :class:`InstanceRecord` here (batched by
``dicom_node.registrar`` so that one transaction commits many instances). Registration

* upserts the study, series and instance rows and moves their ``last_received_at`` timers forward (the
  completeness sweeper reads those timers, so they must be in the database to survive a restart);
* is idempotent: registering the same SOP Instance UID again changes nothing (an identical re-send does not even
  move the timers, so a resend cannot postpone a study forever);
* opens a new pipeline run when an instance arrives for a study whose latest run has already left RECEIVING,
  so a late instance is never lost (trigger ``late_instance``).

It runs on the ingest hot path, so it is set-based Core SQL — a handful of statements per batch, whatever its size.
Order matters against the completeness sweeper: the study's timer is moved FIRST, and only then is its latest run
read. The sweeper completes a run only if the study's timer is still old (``dicom_node.completeness.mark_complete``),
so either it sees our new timer and waits, or it completed the run before our read and we open a new run.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import Connection, DateTime, bindparam, case, insert, select, text, update
from sqlalchemy.orm import Session

from db.models import Instance, Series, Study, utcnow

_INSTANCES, _SERIES, _STUDIES = Instance.__table__, Series.__table__, Study.__table__


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
    created: bool  # False: the instance was already registered (identical re-send or replacement)
    opened_run_number: int | None  # a new run was opened by this instance


# (study UID, series UID) -> (study row id, series row id), kept by a long-lived caller (the SCP's registrar) to
# skip two lookups per instance. Rows are never deleted while the node runs; a caller whose transaction fails
# must clear it anyway (it cannot tell which cached row was involved).
KnownSeries = dict[tuple[str, str], tuple[int, int]]


def register_instances(target: Session | Connection, records: Sequence[InstanceRecord],
                       known_series: KnownSeries | None = None) -> list[RegistrationOutcome]:
    """Upsert ``records`` in the current transaction of ``target`` (the caller commits). Returns one outcome
    per record. ``known_series``: see :data:`KnownSeries` (read and filled here)."""
    if not records:
        return []
    # Core statements on a connection, not ORM ones: on this hot path the ORM's per-statement compile state
    # cost more CPU than the SQL itself (profiled under the ingest bench).
    conn = target.connection() if isinstance(target, Session) else target
    existing = _existing(conn, records)
    new: dict[str, InstanceRecord] = {}
    for record in records:  # the first of several records with one SOP Instance UID in a batch wins
        if record.sop_instance_uid not in existing and record.sop_instance_uid not in new:
            new[record.sop_instance_uid] = record
    replaced = [r for r in records if r.sop_instance_uid in existing and r.replaces_existing]
    changed = list(new.values()) + replaced

    study_ids, series_ids = _row_ids(conn, records, known_series)
    _move_timers(conn, changed, study_ids, series_ids, new)
    if new:
        conn.execute(insert(_INSTANCES), [_instance_row(r, series_ids) for r in new.values()])
    for record in replaced:
        conn.execute(
            update(_INSTANCES).where(_INSTANCES.c.sop_instance_uid == record.sop_instance_uid).values(
                revision=_INSTANCES.c.revision + 1, path=record.path, size_bytes=record.size_bytes,
                transfer_syntax_uid=record.transfer_syntax_uid, received_at=record.received_at,
                association_id=record.association_id))
    opened = _ensure_open_runs(conn, {study_ids[r.study_instance_uid] for r in changed})

    outcomes = []
    for record in records:
        created = new.get(record.sop_instance_uid) is record
        is_change = created or (record.sop_instance_uid in existing and record.replaces_existing)
        run_number = opened.pop(study_ids[record.study_instance_uid], None) if is_change else None
        outcomes.append(RegistrationOutcome(record.sop_instance_uid, created, run_number))
    return outcomes


def _row_ids(conn: Connection, records: Sequence[InstanceRecord],
             known_series: KnownSeries | None) -> tuple[dict[str, int], dict[str, int]]:
    """Study and series row ids of ``records`` (created when missing), from ``known_series`` when it has them all."""
    keys = {(r.study_instance_uid, r.series_instance_uid) for r in records}
    if known_series is not None and keys <= known_series.keys():
        return ({study: known_series[(study, series)][0] for study, series in keys},
                {series: known_series[(study, series)][1] for study, series in keys})
    study_ids = _ensure_studies(conn, records)
    series_ids = _ensure_series(conn, records, study_ids)
    if known_series is not None:
        known_series.update({(study, series): (study_ids[study], series_ids[series]) for study, series in keys})
    return study_ids, series_ids


def _instance_row(record: InstanceRecord, series_ids: dict[str, int]) -> dict:
    return {
        "series_id": series_ids[record.series_instance_uid],
        "sop_instance_uid": record.sop_instance_uid,
        "sop_class_uid": record.sop_class_uid,
        "transfer_syntax_uid": record.transfer_syntax_uid,
        "instance_number": record.instance_number,
        "path": record.path,
        "size_bytes": record.size_bytes,
        "received_at": record.received_at,
        "association_id": record.association_id,
        "revision": 1,
    }


# The statement of every single-instance registration, built once (building it costs more than running it; study
# and series lookups need no such care: the SCP's registrar caches their row ids, see KnownSeries).
_ONE_EXISTING = select(_INSTANCES.c.sop_instance_uid).where(_INSTANCES.c.sop_instance_uid == bindparam("uid"))


def _existing(conn: Connection, records: Sequence[InstanceRecord]) -> set[str]:
    """The SOP Instance UIDs among ``records`` that are already registered."""
    uids = {r.sop_instance_uid for r in records}
    if len(uids) == 1:
        return set(conn.scalars(_ONE_EXISTING, {"uid": next(iter(uids))}))
    return set(conn.scalars(select(_INSTANCES.c.sop_instance_uid).where(_INSTANCES.c.sop_instance_uid.in_(uids))))


def _ensure_studies(conn: Connection, records: Sequence[InstanceRecord]) -> dict[str, int]:
    wanted = {r.study_instance_uid: r for r in records}
    found = dict(conn.execute(select(_STUDIES.c.study_instance_uid, _STUDIES.c.id)
                              .where(_STUDIES.c.study_instance_uid.in_(list(wanted)))).all())
    for uid, record in wanted.items():
        if uid not in found:
            found[uid] = conn.scalar(insert(_STUDIES).values(
                study_instance_uid=uid, modalities=record.modality, study_date=record.study_date,
                requested_priority=record.requested_priority, source_ae_title=record.calling_ae_title,
                first_received_at=record.received_at, last_received_at=record.received_at, instance_count=0,
                created_at=utcnow()).returning(_STUDIES.c.id))
    return found


def _ensure_series(conn: Connection, records: Sequence[InstanceRecord], study_ids: dict[str, int]) -> dict[str, int]:
    wanted = {r.series_instance_uid: r for r in records}
    found = dict(conn.execute(select(_SERIES.c.series_instance_uid, _SERIES.c.id)
                              .where(_SERIES.c.series_instance_uid.in_(list(wanted)))).all())
    for uid, record in wanted.items():
        if uid in found:
            continue
        study_id = study_ids[record.study_instance_uid]
        found[uid] = conn.scalar(insert(_SERIES).values(
            study_id=study_id, series_instance_uid=uid, modality=record.modality, series_number=record.series_number,
            first_received_at=record.received_at, last_received_at=record.received_at, instance_count=0
        ).returning(_SERIES.c.id))
        _merge_modality(conn, study_id, record.modality)
    return found


def _merge_modality(conn: Connection, study_id: int, modality: str | None) -> None:
    if not modality:
        return
    current = conn.scalar(select(_STUDIES.c.modalities).where(_STUDIES.c.id == study_id)) or ""
    present = set(filter(None, current.split("\\")))
    if modality not in present:
        merged = "\\".join(sorted(present | {modality}))[:64]
        conn.execute(update(_STUDIES).where(_STUDIES.c.id == study_id).values(modalities=merged))


def _timer_update(model) -> object:
    """UPDATE <table> SET instance_count += :added, last_received_at = max(last_received_at, :at) WHERE id = :row_id.
    Built once per table: rebuilding it per batch costs more CPU than running it (SQLAlchemy cache keys)."""
    columns = model.__table__.c
    return (update(model.__table__).where(columns.id == bindparam("row_id")).values(
        instance_count=columns.instance_count + bindparam("added"),
        last_received_at=case((columns.last_received_at < bindparam("at", type_=DateTime(timezone=True)),
                               bindparam("at", type_=DateTime(timezone=True))), else_=columns.last_received_at)))


_TIMER_UPDATES = ((Series, "series_instance_uid", _timer_update(Series)), (Study, "study_instance_uid", _timer_update(Study)))


def _move_timers(conn: Connection, changed: Sequence[InstanceRecord], study_ids: dict[str, int],
                 series_ids: dict[str, int], new: dict[str, InstanceRecord]) -> None:
    """Bump counts (new instances) and ``last_received_at`` (new or replaced) of the series and studies touched."""
    ids_of = {Series: series_ids, Study: study_ids}
    for model, key, statement in _TIMER_UPDATES:
        ids = ids_of[model]
        added: dict[int, int] = defaultdict(int)
        latest: dict[int, dt.datetime] = {}
        for record in changed:
            row_id = ids[getattr(record, key)]
            latest[row_id] = max(latest.get(row_id, record.received_at), record.received_at)
            if new.get(record.sop_instance_uid) is record:
                added[row_id] += 1
        if latest:
            conn.execute(statement, [{"row_id": row_id, "added": added[row_id], "at": at}
                                        for row_id, at in latest.items()])


# One statement per study: open a run in RECEIVING unless the study already has one. Two concurrent registrars
# racing here violate UNIQUE(study_id, run_number) and the loser retries (dicom_node.registrar), seeing the open run.
_OPEN_RUN_IF_NONE = text("""
    INSERT INTO pipeline_runs (study_id, run_number, state, "trigger", opened_at, updated_at)
    SELECT :study_id, COALESCE(MAX(run_number), 0) + 1, 'receiving',
           CASE WHEN MAX(run_number) IS NULL THEN 'received' ELSE 'late_instance' END, :now, :now
    FROM pipeline_runs WHERE study_id = :study_id
    HAVING NOT EXISTS (SELECT 1 FROM pipeline_runs WHERE study_id = :study_id AND state = 'receiving')
    RETURNING run_number
""").bindparams(bindparam("now", type_=DateTime(timezone=True)))  # stored exactly like ORM-written timestamps


def _ensure_open_runs(conn: Connection, study_ids: set[int]) -> dict[int, int]:
    """Make sure each study has a run in RECEIVING; return {study_id: run_number} for runs opened here."""
    opened: dict[int, int] = {}
    now = utcnow()
    for study_id in sorted(study_ids):
        number = conn.execute(_OPEN_RUN_IF_NONE, {"study_id": study_id, "now": now}).scalar()
        if number is not None:
            opened[study_id] = number
    return opened
