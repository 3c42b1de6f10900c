"""The radiologists' worklist: how urgent each study is, in which order to read, and who is reading what.

Priority of an item (higher reads first), with the weights from :class:`api.settings.WorklistRules`::

    score = priority_weights[order priority]          # DICOM (0040,1003): STAT / HIGH / MEDIUM / ROUTINE / LOW
          + urgency_score                             # from the findings: max positive weight + a fraction of the rest
          + stat_weight  if a critical finding         # any critical finding makes the study STAT
          + min(aging_cap, aging_per_hour * hours since ready_at)   # waiting studies rise, so none starves

The same formula exists twice: :func:`priority_score` (pure Python, for tests, the CLI and documentation) and
:func:`priority_expression` (SQL, so the database sorts 10,000 items and returns only the top page). A test keeps
them equal.

Every change of an item (created, refreshed, claimed, released, completed, reopened) is an ``AuditEvent`` row.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy import Float, Integer, Select, and_, bindparam, case, func, literal, or_, select, update
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import ColumnElement, FunctionElement

from api.settings import Role, WorklistRules
from db.models import AuditEvent, Finding, PipelineRun, RunState, Study, WorklistItem, as_utc, utcnow
from omnict_node.logs import log_event

log = logging.getLogger("omnict.worklist")

STATUSES = ("unread", "claimed", "completed")
OPEN_STATUSES = ("unread", "claimed")


# ---------------------------------------------------------------------------------------------------------------
# Pure priority functions
# ---------------------------------------------------------------------------------------------------------------
class FindingLike(Protocol):
    positive: bool | None
    critical: bool
    urgency_weight: float


def urgency_from_findings(findings: Iterable[FindingLike], rules: WorklistRules) -> tuple[float, bool]:
    """(urgency_score, stat) of a run's findings.

    Only present findings count (``positive is True``). The score is the largest weight plus
    ``rules.secondary_fraction`` of the others: one severe finding dominates, several findings still add up.
    A critical finding counts unless the model said it is absent (``positive is False``).
    """
    weights: list[float] = []
    stat = False
    for finding in findings:
        if finding.critical and finding.positive is not False:
            stat = True
        if finding.positive is True and finding.urgency_weight:
            weights.append(float(finding.urgency_weight))
    if not weights:
        return 0.0, stat
    weights.sort(reverse=True)
    return weights[0] + rules.secondary_fraction * sum(weights[1:]), stat


def hours_between(earlier: dt.datetime, later: dt.datetime) -> float:
    return max(0.0, (as_utc(later) - as_utc(earlier)).total_seconds() / 3600.0)


def aging_bonus(hours_waiting: float, rules: WorklistRules) -> float:
    return min(rules.aging_cap, rules.aging_per_hour * max(0.0, hours_waiting))


def base_score(urgency_score: float, stat: bool, requested_priority: str | None, rules: WorklistRules) -> float:
    """The time-independent part of the score."""
    return rules.priority_weight(requested_priority) + urgency_score + (rules.stat_weight if stat else 0.0)


def priority_score(urgency_score: float, stat: bool, requested_priority: str | None, ready_at: dt.datetime,
                   now: dt.datetime, rules: WorklistRules) -> float:
    """The item's priority at ``now`` (the formula in the module docstring)."""
    return base_score(urgency_score, stat, requested_priority, rules) + aging_bonus(hours_between(ready_at, now), rules)


def urgency_level(stat: bool, urgency_score: float, requested_priority: str | None, rules: WorklistRules) -> str:
    """The badge: ``stat`` (critical finding or STAT order), ``urgent`` (HIGH order or score ≥ threshold), ``routine``."""
    priority = (requested_priority or "").strip().upper()
    if stat or priority == "STAT":
        return "stat"
    if priority == "HIGH" or urgency_score >= rules.urgent_threshold:
        return "urgent"
    return "routine"


# ---------------------------------------------------------------------------------------------------------------
# The same score in SQL
# ---------------------------------------------------------------------------------------------------------------
class hours_since(FunctionElement):  # noqa: N801 - reads like the SQL function it renders to
    """Hours from a timestamp column to a bound ``now``, never negative; rendered per dialect."""

    type = Float()
    inherit_cache = True


@compiles(hours_since, "postgresql")
def _hours_since_pg(element, compiler, **kw) -> str:
    column, now = list(element.clauses)
    return (f"GREATEST(0.0, EXTRACT(EPOCH FROM ({compiler.process(now, **kw)} - {compiler.process(column, **kw)}))"
            " / 3600.0)")


@compiles(hours_since)
def _hours_since_sqlite(element, compiler, **kw) -> str:
    # SQLite keeps UTC timestamps as text; julianday() parses them (fractional seconds included).
    column, now = list(element.clauses)
    return (f"MAX(0.0, (julianday({compiler.process(now, **kw)}) - julianday({compiler.process(column, **kw)}))"
            " * 24.0)")


class least(FunctionElement):  # noqa: N801 - reads like the SQL function it renders to
    """The smaller of two values: LEAST on PostgreSQL, the two-argument scalar MIN on SQLite."""

    type = Float()
    inherit_cache = True


@compiles(least, "postgresql")
def _least_pg(element, compiler, **kw) -> str:
    return f"LEAST({compiler.process(element.clauses, **kw)})"


@compiles(least)
def _least_sqlite(element, compiler, **kw) -> str:
    return f"MIN({compiler.process(element.clauses, **kw)})"


def priority_expression(rules: WorklistRules) -> ColumnElement[float]:
    """SQL for :func:`priority_score` over ``worklist_items``, at the bound parameter ``now``."""
    # ``now`` is bound as an aware UTC timestamp: PostgreSQL compares it with timestamptz; SQLite's DateTime type
    # writes the same UTC wall-clock text it stores.
    now_param = bindparam("now", type_=WorklistItem.ready_at.type)
    weights = {k.upper(): v for k, v in rules.priority_weights.items()}
    # Simple CASE (one evaluation of the operand per row), LEAST for the cap: the sort evaluates this per item.
    priority_part = case({k: literal(v) for k, v in weights.items()},
                         value=func.upper(WorklistItem.requested_priority), else_=literal(0.0)) \
        if weights else literal(0.0)
    stat_part = case((WorklistItem.stat.is_(True), literal(rules.stat_weight)), else_=literal(0.0))
    aging_part = least(literal(rules.aging_cap),
                       literal(rules.aging_per_hour) * hours_since(WorklistItem.ready_at, now_param))
    return (priority_part + WorklistItem.urgency_score + stat_part + aging_part).label("priority")


# ---------------------------------------------------------------------------------------------------------------
# Reading the worklist
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class WorklistEntry:
    """One row of the sorted worklist."""

    study_instance_uid: str
    status: str
    priority: float
    level: str
    urgency_score: float
    stat: bool
    requested_priority: str | None
    ready_at: dt.datetime
    hours_waiting: float
    claimed_by: str | None
    claimed_at: dt.datetime | None
    completed_at: dt.datetime | None
    run_id: int | None
    run_state: str | None
    modalities: str | None
    study_date: str | None
    positive_findings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "study_instance_uid": self.study_instance_uid,
            "status": self.status,
            "priority": round(self.priority, 3),
            "level": self.level,
            "urgency_score": self.urgency_score,
            "stat": self.stat,
            "requested_priority": self.requested_priority,
            "ready_at": as_utc(self.ready_at).isoformat(),
            "hours_waiting": round(self.hours_waiting, 3),
            "claimed_by": self.claimed_by,
            "claimed_at": as_utc(self.claimed_at).isoformat() if self.claimed_at else None,
            "completed_at": as_utc(self.completed_at).isoformat() if self.completed_at else None,
            "run_id": self.run_id,
            "run_state": self.run_state,
            "modalities": self.modalities,
            "study_date": self.study_date,
            "positive_findings": self.positive_findings,
        }


def _entry_columns(score: ColumnElement[float]) -> tuple:
    item = WorklistItem
    return (Study.study_instance_uid, item.status, item.urgency_score, item.stat, item.requested_priority,
            item.ready_at, item.claimed_by, item.claimed_at, item.completed_at, item.run_id, PipelineRun.state,
            Study.modalities, Study.study_date, score)


# Statements are built once per (rules, filters) and reused: building and cache-keying a SELECT with this many
# CASE branches costs more than running it. Parameters: now, limit, offset (and uid for one entry).
_STATEMENTS: dict[tuple, Select] = {}


def worklist_statement(rules: WorklistRules, statuses: Sequence[str] = OPEN_STATUSES,
                       run_state: str | None = None) -> Select:
    """The one SELECT behind ``GET /worklist``: items joined to their study and run, sorted by priority in SQL.
    Bind ``now`` (aware UTC datetime), ``limit`` and ``offset`` when executing."""
    key = ("list", rules.model_dump_json(), tuple(statuses), run_state)
    statement = _STATEMENTS.get(key)
    if statement is None:
        score = priority_expression(rules)
        # The top-N sort runs over worklist_items alone; only the page's rows are then joined to their study and
        # run (joining all 10,000 first made the query 3x slower on PostgreSQL).
        item = WorklistItem
        top = (select(item.id, item.study_id, item.status, item.urgency_score, item.stat, item.requested_priority,
                      item.ready_at, item.claimed_by, item.claimed_at, item.completed_at, item.run_id, score)
               .where(item.status.in_(list(statuses)))
               .order_by(score.desc(), item.ready_at.asc(), item.id.asc())
               .limit(bindparam("limit", type_=Integer()))
               .offset(bindparam("offset", type_=Integer())))
        if run_state:
            top = top.join(PipelineRun, PipelineRun.id == item.run_id).where(PipelineRun.state == RunState(run_state))
        top = top.subquery("top")
        statement = (
            # Plain columns, not ORM entities: a page is read-only and row tuples are much cheaper to build.
            select(Study.study_instance_uid, top.c.status, top.c.urgency_score, top.c.stat, top.c.requested_priority,
                   top.c.ready_at, top.c.claimed_by, top.c.claimed_at, top.c.completed_at, top.c.run_id,
                   PipelineRun.state, Study.modalities, Study.study_date, top.c.priority)
            .select_from(top)
            .join(Study, Study.id == top.c.study_id)
            .outerjoin(PipelineRun, PipelineRun.id == top.c.run_id)
            .order_by(top.c.priority.desc(), top.c.ready_at.asc(), top.c.id.asc())
        )
        _STATEMENTS[key] = statement
    return statement


def entry_statement(rules: WorklistRules) -> Select:
    """The worklist entry of the study ``uid`` (any status). Bind ``now`` and ``uid``."""
    key = ("entry", rules.model_dump_json())
    statement = _STATEMENTS.get(key)
    if statement is None:
        statement = (select(*_entry_columns(priority_expression(rules)))
                     .join(Study, Study.id == WorklistItem.study_id)
                     .outerjoin(PipelineRun, PipelineRun.id == WorklistItem.run_id)
                     .where(Study.study_instance_uid == bindparam("uid")))
        _STATEMENTS[key] = statement
    return statement


def positive_findings_statement(run_ids: Sequence[int]):
    """Names of the present findings of the listed runs (critical first), for the worklist's summary column."""
    return (
        select(Finding.run_id, Finding.code_meaning, Finding.question_id, Finding.critical)
        .where(Finding.run_id.in_(list(run_ids)), or_(Finding.positive.is_(True),
                                                      and_(Finding.critical.is_(True), Finding.positive.is_(None))))
        .order_by(Finding.run_id, Finding.critical.desc(), Finding.urgency_weight.desc(), Finding.id)
    )


def list_worklist(session: Session, rules: WorklistRules, *, statuses: Sequence[str] = OPEN_STATUSES,
                  run_state: str | None = None, limit: int = 50, offset: int = 0,
                  now: dt.datetime | None = None) -> list[WorklistEntry]:
    """The worklist sorted by priority (highest first), ``limit`` rows. Two queries whatever the page size."""
    now = now or utcnow()
    bad = [s for s in statuses if s not in STATUSES]
    if bad:
        raise ValueError(f"unknown worklist status {bad[0]!r}; use one of {list(STATUSES)}")
    if run_state is not None and run_state not in {s.value for s in RunState}:
        raise ValueError(f"unknown run state {run_state!r}; use one of {[s.value for s in RunState]}")
    # Core execution on the session's connection: no ORM layer for a read-only page.
    rows = session.connection().execute(worklist_statement(rules, statuses, run_state),
                                        {"now": as_utc(now), "limit": limit, "offset": offset}).all()
    entries = [_entry(row, rules, now) for row in rows]
    _fill_positive_findings(session, entries)
    return entries


def _entry(row, rules: WorklistRules, now: dt.datetime) -> WorklistEntry:
    return WorklistEntry(
        study_instance_uid=row.study_instance_uid, status=row.status, priority=float(row.priority),
        level=urgency_level(row.stat, row.urgency_score, row.requested_priority, rules),
        urgency_score=row.urgency_score, stat=row.stat, requested_priority=row.requested_priority,
        ready_at=as_utc(row.ready_at), hours_waiting=hours_between(row.ready_at, now), claimed_by=row.claimed_by,
        claimed_at=row.claimed_at, completed_at=row.completed_at, run_id=row.run_id,
        run_state=row.state.value if row.state is not None else None, modalities=row.modalities,
        study_date=row.study_date)


def _fill_positive_findings(session: Session, entries: Sequence[WorklistEntry]) -> None:
    by_run = {e.run_id: e for e in entries if e.run_id is not None}
    if by_run:
        for run_id, meaning, question_id, _critical in session.connection().execute(
                positive_findings_statement(list(by_run))):
            name = meaning or question_id
            if name not in by_run[run_id].positive_findings:
                by_run[run_id].positive_findings.append(name)


def get_entry(session: Session, study_uid: str, rules: WorklistRules, now: dt.datetime | None = None,
              with_findings: bool = True) -> WorklistEntry | None:
    """The worklist entry of one study, whatever its status (``with_findings``: fill its positive findings)."""
    now = now or utcnow()
    row = session.connection().execute(entry_statement(rules), {"now": as_utc(now), "uid": study_uid}).first()
    if row is None:
        return None
    entry = _entry(row, rules, now)
    if with_findings:
        _fill_positive_findings(session, [entry])
    return entry


# ---------------------------------------------------------------------------------------------------------------
# Writing: the pipeline's hook, and claims
# ---------------------------------------------------------------------------------------------------------------
class WorklistError(Exception):
    """A worklist change that cannot be made; ``status_code`` is the HTTP answer."""

    status_code = 409


class NotOnWorklist(WorklistError):
    status_code = 404


class NotAllowed(WorklistError):
    status_code = 403


def refresh_worklist_item(session: Session, run_id: int, rules: WorklistRules | None = None,
                          now: dt.datetime | None = None, actor: str = "pipeline") -> WorklistItem:
    """Create or update the worklist item of ``run_id``'s study from that run's findings (the caller commits).

    Call it once the run's ``Finding`` rows are written (and again whenever they change): it is idempotent.
    * urgency_score / stat come from the findings (:func:`urgency_from_findings`); requested_priority from the study;
    * a new item starts ``unread`` with ``ready_at = now`` (aging starts when results are available);
    * a newer run of a study already on the list updates its urgency and keeps its place in time (ready_at), except
      that a ``completed`` item is reopened (``unread``, new ready_at): new results need a new read;
    * an audit event (``worklist.created`` / ``worklist.updated`` / ``worklist.reopened``) is added.
    """
    rules = rules or WorklistRules()
    now = now or utcnow()
    run = session.get(PipelineRun, run_id)
    if run is None:
        raise NotOnWorklist(f"pipeline run {run_id} does not exist")
    study = session.get(Study, run.study_id)
    findings = session.scalars(select(Finding).where(Finding.run_id == run_id)).all()
    urgency, stat = urgency_from_findings(findings, rules)
    item = session.scalars(select(WorklistItem).where(WorklistItem.study_id == run.study_id).with_for_update()).first()
    if item is None:
        item = WorklistItem(study_id=run.study_id, run_id=run_id, ready_at=now, status="unread")
        session.add(item)
        event = "worklist.created"
    elif item.status == "completed" and item.run_id != run_id:
        item.status, item.ready_at = "unread", now
        item.claimed_by = item.claimed_at = item.completed_at = None
        event = "worklist.reopened"
    else:
        event = "worklist.updated"
    item.run_id = run_id
    item.urgency_score = urgency
    item.stat = stat
    item.requested_priority = study.requested_priority if study is not None else None
    item.updated_at = now
    session.add(AuditEvent(event=event, actor=actor, study_instance_uid=study.study_instance_uid if study else None,
                           run_id=run_id, detail={"urgency_score": urgency, "stat": stat,
                                                  "requested_priority": item.requested_priority}))
    session.flush()
    log_event(log, event, study_uid=study.study_instance_uid if study else None, run_id=run_id,
              urgency=urgency, stat=stat)
    return item


def _item_for(session: Session, study_uid: str) -> tuple[WorklistItem, Study]:
    row = session.execute(
        select(WorklistItem, Study).join(Study, Study.id == WorklistItem.study_id)
        .where(Study.study_instance_uid == study_uid)
    ).first()
    if row is None:
        raise NotOnWorklist(f"study {study_uid} is not on the worklist")
    return row[0], row[1]


def _conditional_update(session: Session, item: WorklistItem, condition, values: dict) -> bool:
    # A conditional UPDATE (not read-then-write) so two readers claiming at once cannot both win.
    result = session.execute(
        update(WorklistItem).where(WorklistItem.id == item.id, condition).values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return False
    session.refresh(item)
    return True


def _audit(session: Session, event: str, actor: str, study: Study, item: WorklistItem, **detail) -> None:
    session.add(AuditEvent(event=event, actor=actor, study_instance_uid=study.study_instance_uid, run_id=item.run_id,
                           detail=detail or None))
    log_event(log, event, study_uid=study.study_instance_uid, actor=actor)


def claim(session: Session, study_uid: str, actor: str, role: Role, now: dt.datetime | None = None) -> WorklistItem:
    """``unread`` → ``claimed`` by ``actor``. Claiming one's own claim again is a no-op; another's claim is 409."""
    now = now or utcnow()
    item, study = _item_for(session, study_uid)
    if item.status == "claimed" and item.claimed_by == actor:
        return item
    if not _conditional_update(session, item, WorklistItem.status == "unread",
                               {"status": "claimed", "claimed_by": actor, "claimed_at": now, "updated_at": now}):
        session.refresh(item)
        raise WorklistError(f"study {study_uid} is {item.status}" +
                            (f" by {item.claimed_by}" if item.status == "claimed" else "") + "; it cannot be claimed")
    _audit(session, "worklist.claimed", actor, study, item, role=role.value)
    return item


def release(session: Session, study_uid: str, actor: str, role: Role, now: dt.datetime | None = None) -> WorklistItem:
    """``claimed`` → ``unread``. Only the claimer, or an operator, may release a claim."""
    now = now or utcnow()
    item, study = _item_for(session, study_uid)
    if item.status != "claimed":
        raise WorklistError(f"study {study_uid} is {item.status}, not claimed")
    if item.claimed_by != actor and not role.allows(Role.OPERATOR):
        raise NotAllowed(f"study {study_uid} is claimed by another reader; only they or an operator can release it")
    previous = item.claimed_by
    if not _conditional_update(session, item, and_(WorklistItem.status == "claimed",
                                                   WorklistItem.claimed_by == previous),
                               {"status": "unread", "claimed_by": None, "claimed_at": None, "updated_at": now}):
        raise WorklistError(f"study {study_uid} changed meanwhile; try again")
    _audit(session, "worklist.released", actor, study, item, previous_reader=previous, role=role.value)
    return item


def complete(session: Session, study_uid: str, actor: str, role: Role, now: dt.datetime | None = None) -> WorklistItem:
    """``claimed`` (by ``actor``) → ``completed``. An operator may complete any open item."""
    now = now or utcnow()
    item, study = _item_for(session, study_uid)
    if item.status == "completed":
        raise WorklistError(f"study {study_uid} is already completed")
    if role.allows(Role.OPERATOR):
        condition = WorklistItem.status.in_(OPEN_STATUSES)
    elif item.status == "claimed" and item.claimed_by == actor:
        condition = and_(WorklistItem.status == "claimed", WorklistItem.claimed_by == actor)
    elif item.status == "claimed":
        raise NotAllowed(f"study {study_uid} is claimed by another reader")
    else:
        raise WorklistError(f"study {study_uid} is unread: claim it before completing it")
    previous_status = item.status
    if not _conditional_update(session, item, condition, {"status": "completed", "completed_at": now, "updated_at": now}):
        raise WorklistError(f"study {study_uid} changed meanwhile; try again")
    _audit(session, "worklist.completed", actor, study, item, previous_status=previous_status, role=role.value)
    return item
