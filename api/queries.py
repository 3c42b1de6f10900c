"""Read queries over studies, runs, findings and result objects: shared by the HTTP API and the CLI.

Each function returns plain dicts ready for JSON, built from a fixed, small number of SELECTs (no per-row lazy
loads), so the API's cost over the SQL stays bounded.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import and_, bindparam, exists, func, or_, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from api.settings import WorklistRules
from api.worklist import get_entry, priority_score, urgency_from_findings, urgency_level
from db.models import (
    Delivery,
    Finding,
    Instance,
    OrganMeasurement,
    PipelineRun,
    ResultObject,
    RunState,
    Series,
    StageRecord,
    Study,
    WorklistItem,
    utcnow,
)


class NotFound(LookupError):
    """The study (or object) is not known to the node."""


def iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).isoformat()


# ---------------------------------------------------------------------------------------------------------------
# Studies
# ---------------------------------------------------------------------------------------------------------------
def latest_runs_subquery():
    """(study_id, run_number) of each study's newest run."""
    return (select(PipelineRun.study_id, func.max(PipelineRun.run_number).label("run_number"))
            .group_by(PipelineRun.study_id).subquery("latest"))


def list_studies(session: Session, *, state: str | None = None, since: dt.datetime | None = None,
                 limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
    """Studies newest first, each with its latest run's state. ``state`` filters on that state, ``since`` on the
    last received instance."""
    if state is not None and state not in {s.value for s in RunState}:
        raise ValueError(f"unknown state {state!r}; use one of {[s.value for s in RunState]}")
    latest = latest_runs_subquery()
    statement = (
        select(Study, PipelineRun)
        .outerjoin(latest, latest.c.study_id == Study.id)
        .outerjoin(PipelineRun, and_(PipelineRun.study_id == Study.id, PipelineRun.run_number == latest.c.run_number))
        .order_by(Study.last_received_at.desc(), Study.id.desc())
        .limit(limit).offset(offset)
    )
    if state is not None:
        statement = statement.where(PipelineRun.state == RunState(state))
    if since is not None:
        statement = statement.where(Study.last_received_at >= since)
    return [_study_summary(study, run) for study, run in session.execute(statement)]


def _study_summary(study: Study, run: PipelineRun | None) -> dict[str, Any]:
    return {
        "study_instance_uid": study.study_instance_uid,
        "modalities": study.modalities,
        "study_date": study.study_date,
        "requested_priority": study.requested_priority,
        "instance_count": study.instance_count,
        "first_received_at": iso(study.first_received_at),
        "last_received_at": iso(study.last_received_at),
        "state": run.state.value if run is not None else None,
        "run_number": run.run_number if run is not None else None,
    }


def _study(session: Session, study_uid: str) -> Study:
    study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
    if study is None:
        raise NotFound(f"study {study_uid} is not known")
    return study


def study_detail(session: Session, study_uid: str, rules: WorklistRules | None = None) -> dict[str, Any]:
    """The study, every run with its stage timings and errors, deliveries, series and the worklist entry."""
    study = _study(session, study_uid)
    runs = session.scalars(select(PipelineRun).where(PipelineRun.study_id == study.id)
                           .order_by(PipelineRun.run_number)).all()
    run_ids = [r.id for r in runs]
    stages: dict[int, list[StageRecord]] = {i: [] for i in run_ids}
    deliveries: dict[int, list[Delivery]] = {i: [] for i in run_ids}
    if run_ids:
        for stage in session.scalars(select(StageRecord).where(StageRecord.run_id.in_(run_ids)).order_by(StageRecord.id)):
            stages[stage.run_id].append(stage)
        for delivery in session.scalars(select(Delivery).where(Delivery.run_id.in_(run_ids)).order_by(Delivery.id)):
            deliveries[delivery.run_id].append(delivery)
    series = session.scalars(select(Series).where(Series.study_id == study.id).order_by(Series.series_number, Series.id)).all()
    entry = get_entry(session, study_uid, rules or WorklistRules())
    latest = runs[-1] if runs else None
    errors = [
        {"run_number": run.run_number, "stage": None, "error": run.error} for run in runs if run.error
    ] + [
        {"run_number": run.run_number, "stage": s.stage, "attempt": s.attempt, "error": s.error}
        for run in runs for s in stages[run.id] if s.error
    ]
    return {
        **_study_summary(study, latest),
        "series": [{"series_instance_uid": s.series_instance_uid, "modality": s.modality, "series_number": s.series_number,
                    "instance_count": s.instance_count} for s in series],
        "runs": [_run_detail(run, stages[run.id], deliveries[run.id]) for run in runs],
        "errors": errors,
        "worklist": entry.as_dict() if entry else None,
    }


def _run_detail(run: PipelineRun, stages: list[StageRecord], deliveries: list[Delivery]) -> dict[str, Any]:
    return {
        "run_id": run.id,
        "run_number": run.run_number,
        "state": run.state.value,
        "trigger": run.trigger,
        "opened_at": iso(run.opened_at),
        "completed_at": iso(run.completed_at),
        "completion_reason": run.completion_reason,
        "dispatched_at": iso(run.dispatched_at),
        "finished_at": iso(run.finished_at),
        "error": run.error,
        "stages": [{"stage": s.stage, "attempt": s.attempt, "outcome": s.outcome, "started_at": iso(s.started_at),
                    "finished_at": iso(s.finished_at), "duration_s": s.duration_s, "error": s.error, "worker": s.worker}
                   for s in stages],
        "deliveries": [{"destination": d.destination, "state": d.state, "attempts": d.attempts,
                        "last_error": d.last_error, "delivered_at": iso(d.delivered_at),
                        "sop_instance_uids": d.sop_instance_uids or []} for d in deliveries],
    }


# ---------------------------------------------------------------------------------------------------------------
# Findings
# ---------------------------------------------------------------------------------------------------------------
def results_run(session: Session, study: Study, run_number: int | None = None) -> PipelineRun | None:
    """The run whose results are shown: ``run_number`` if given, else the newest run that has findings,
    measurements or result objects (a newer run still in progress does not hide the last results)."""
    statement = select(PipelineRun).where(PipelineRun.study_id == study.id)
    if run_number is not None:
        return session.scalars(statement.where(PipelineRun.run_number == run_number)).first()
    has_results = or_(
        exists().where(Finding.run_id == PipelineRun.id),
        exists().where(OrganMeasurement.run_id == PipelineRun.id),
        exists().where(ResultObject.run_id == PipelineRun.id),
    )
    return session.scalars(statement.where(has_results).order_by(PipelineRun.run_number.desc()).limit(1)).first()


def _results_run_id(run_number_given: bool):
    """Scalar subquery: the id of the results run of the study ``studies.id`` (see :func:`results_run`)."""
    runs = PipelineRun.__table__.alias("results_runs")
    statement = select(runs.c.id).where(runs.c.study_id == Study.id)
    if run_number_given:
        return statement.where(runs.c.run_number == bindparam("run_number")).limit(1).scalar_subquery()
    has_results = or_(exists().where(Finding.run_id == runs.c.id),
                      exists().where(OrganMeasurement.run_id == runs.c.id),
                      exists().where(ResultObject.run_id == runs.c.id))
    return statement.where(has_results).order_by(runs.c.run_number.desc()).limit(1).scalar_subquery()


def _findings_head(run_number_given: bool):
    """One row: the study, its results run and its worklist item (the findings page's header). Bind ``uid``."""
    return (
        select(Study.id.label("study_id"), Study.requested_priority.label("study_priority"),
               PipelineRun.id.label("run_id"), PipelineRun.run_number, PipelineRun.state, PipelineRun.finished_at,
               WorklistItem.status.label("wl_status"), WorklistItem.urgency_score.label("wl_urgency"),
               WorklistItem.stat.label("wl_stat"), WorklistItem.requested_priority.label("wl_priority"),
               WorklistItem.ready_at.label("wl_ready_at"))
        .select_from(Study)
        .outerjoin(PipelineRun, PipelineRun.id == _results_run_id(run_number_given))
        .outerjoin(WorklistItem, WorklistItem.study_id == Study.id)
        .where(Study.study_instance_uid == bindparam("uid"))
    )


# Built once: the findings endpoint is hot, and building + cache-keying SELECTs costs more than running them.
_FINDINGS_HEAD = {False: _findings_head(False), True: _findings_head(True)}
_RUN_FINDINGS = select(*Finding.__table__.c).where(Finding.run_id == bindparam("run_id")).order_by(Finding.id)
_RUN_MEASUREMENTS = (select(*OrganMeasurement.__table__.c).where(OrganMeasurement.run_id == bindparam("run_id"))
                     .order_by(OrganMeasurement.organ))
_RUN_RESULTS = select(*ResultObject.__table__.c).where(ResultObject.run_id == bindparam("run_id")).order_by(ResultObject.id)


class _FindingRow(NamedTuple):
    question_id: str
    question: str
    answer: str
    organ: str | None
    code_value: str | None
    code_scheme: str | None
    code_meaning: str | None
    positive: bool | None
    critical: bool
    urgency_weight: float | None
    key_slices: list | None
    key_sop_instance_uids: list | None


class _MeasurementRow(NamedTuple):
    organ: str
    volume_ml: float | None
    mean_hu: float | None
    std_hu: float | None


class _ResultRow(NamedTuple):
    sop_instance_uid: str
    sop_class_uid: str
    kind: str
    series_instance_uid: str
    run_id: int
    size_bytes: int
    created_at: dt.datetime | None
    study_instance_uid: str


def _pg_findings_statement(run_number_given: bool):
    """PostgreSQL: the whole findings page in ONE statement (one round trip instead of five): the header row of
    :func:`_findings_head` plus the run's findings, measurements, result objects and the series of the key images,
    each aggregated server-side into a JSON array of arrays (same ORDER BYs as the portable statements). Bind
    ``uid`` (and ``run_number``)."""
    if run_number_given:
        results_run = ("SELECT rr.id FROM pipeline_runs rr WHERE rr.study_id = s.id "
                       "AND rr.run_number = :run_number LIMIT 1")
    else:
        results_run = ("SELECT rr.id FROM pipeline_runs rr WHERE rr.study_id = s.id AND ("
                       "EXISTS (SELECT 1 FROM findings x WHERE x.run_id = rr.id) "
                       "OR EXISTS (SELECT 1 FROM organ_measurements x WHERE x.run_id = rr.id) "
                       "OR EXISTS (SELECT 1 FROM result_objects x WHERE x.run_id = rr.id)) "
                       "ORDER BY rr.run_number DESC LIMIT 1")
    sql = f"""
SELECT s.id AS study_id, s.requested_priority AS study_priority,
       r.id AS run_id, r.run_number, r.state, r.finished_at,
       w.status AS wl_status, w.urgency_score AS wl_urgency, w.stat AS wl_stat,
       w.requested_priority AS wl_priority, w.ready_at AS wl_ready_at,
       (SELECT json_agg(json_build_array(f.question_id, f.question, f.answer, f.organ, f.code_value, f.code_scheme,
                                         f.code_meaning, f.positive, f.critical, f.urgency_weight, f.key_slices,
                                         f.key_sop_instance_uids) ORDER BY f.id)
          FROM findings f WHERE f.run_id = r.id) AS findings,
       (SELECT json_agg(json_build_array(m.organ, m.volume_ml, m.mean_hu, m.std_hu) ORDER BY m.organ)
          FROM organ_measurements m WHERE m.run_id = r.id) AS measurements,
       (SELECT json_agg(json_build_array(o.sop_instance_uid, o.sop_class_uid, o.kind, o.series_instance_uid,
                                         o.run_id, o.size_bytes, o.created_at, o.study_instance_uid) ORDER BY o.id)
          FROM result_objects o WHERE o.run_id = r.id) AS results,
       (SELECT json_agg(json_build_array(i.sop_instance_uid, se.series_instance_uid))
          FROM instances i JOIN series se ON se.id = i.series_id
         WHERE i.sop_instance_uid IN (
               SELECT json_array_elements_text(CASE WHEN json_typeof(k.key_sop_instance_uids) = 'array'
                                                    THEN k.key_sop_instance_uids ELSE '[]'::json END)
                 FROM findings k WHERE k.run_id = r.id)) AS key_series
FROM studies s
LEFT OUTER JOIN pipeline_runs r ON r.id = ({results_run})
LEFT OUTER JOIN worklist_items w ON w.study_id = s.id
WHERE s.study_instance_uid = :uid"""
    # Typed like the ORM columns, so the row reads exactly as the portable statement's (RunState enum, datetimes).
    # (Keyword form: matched by name, not by position.)
    return text(sql).columns(state=PipelineRun.__table__.c.state.type,
                             finished_at=PipelineRun.__table__.c.finished_at.type,
                             wl_ready_at=WorklistItem.__table__.c.ready_at.type)


_PG_FINDINGS = {False: _pg_findings_statement(False), True: _pg_findings_statement(True)}


def _float(value: Any) -> float | None:
    # JSON from PostgreSQL writes a float8 5.0 as 5: give it back as the float the ORM column returns.
    return None if value is None else float(value)


def _pg_findings_rows(conn, study_uid: str, run_number: int | None):
    head = conn.execute(_PG_FINDINGS[run_number is not None], {"uid": study_uid, "run_number": run_number}).first()
    if head is None or head.run_id is None:
        return head, [], [], [], {}
    findings = [_FindingRow(*f[:9], _float(f[9]), f[10], f[11]) for f in head.findings or ()]
    measurements = [_MeasurementRow(m[0], _float(m[1]), _float(m[2]), _float(m[3])) for m in head.measurements or ()]
    # created_at comes as PostgreSQL's ISO text (same instant, same session time zone): parse it back so iso()
    # writes it exactly as for a datetime read from the column.
    results = [_ResultRow(*o[:6], dt.datetime.fromisoformat(o[6]) if o[6] is not None else None, o[7])
               for o in head.results or ()]
    found = dict(map(tuple, head.key_series or ()))
    return head, findings, measurements, results, found


def _portable_findings_rows(conn: Connection, study_uid: str, run_number: int | None):
    head = conn.execute(_FINDINGS_HEAD[run_number is not None], {"uid": study_uid, "run_number": run_number}).first()
    if head is None or head.run_id is None:
        return head, [], [], [], {}
    findings = conn.execute(_RUN_FINDINGS, {"run_id": head.run_id}).all()
    measurements = conn.execute(_RUN_MEASUREMENTS, {"run_id": head.run_id}).all()
    results = conn.execute(_RUN_RESULTS, {"run_id": head.run_id}).all()
    key_uids = list(dict.fromkeys(uid for f in findings for uid in (f.key_sop_instance_uids or [])))
    found = dict(conn.execute(_KEY_SERIES, {"uids": key_uids}).all()) if key_uids else {}
    return head, findings, measurements, results, found


def study_findings(session: Session | Connection, study_uid: str, rules: WorklistRules | None = None,
                   run_number: int | None = None, now: dt.datetime | None = None) -> dict[str, Any]:
    """Every question with its answer and code, the organ measurements, the urgency and the key images of the
    study's results run (see :func:`results_run`). PostgreSQL: one SELECT with JSON aggregation; elsewhere four
    or five SELECTs. Core rows either way (read-only: no ORM objects), so a plain ``Connection`` does as well as
    a ``Session`` (the API passes a connection: no ORM session to build per request)."""
    rules = rules or WorklistRules()
    conn = session if isinstance(session, Connection) else session.connection()
    rows = _pg_findings_rows if conn.dialect.name == "postgresql" else _portable_findings_rows
    head, findings, measurements, results, found = rows(conn, study_uid, run_number)
    if head is None:
        raise NotFound(f"study {study_uid} is not known")
    if head.run_id is None:
        if run_number is not None:
            raise NotFound(f"study {study_uid} has no run {run_number}")
        return {"study_instance_uid": study_uid, "run": None, "urgency": None, "findings": [], "measurements": [],
                "key_images": [], "results": []}
    key_uids = list(dict.fromkeys(uid for f in findings for uid in (f.key_sop_instance_uids or [])))
    key_series = {uid: found.get(uid) for uid in key_uids}
    urgency_score, stat = urgency_from_findings(findings, rules)
    priority = None
    if head.wl_status is not None:
        # The same formula the worklist sorts by in SQL (tests keep the two equal).
        priority = round(priority_score(head.wl_urgency, head.wl_stat, head.wl_priority, head.wl_ready_at,
                                        now or utcnow(), rules), 3)
    return {
        "study_instance_uid": study_uid,
        "run": {"run_id": head.run_id, "run_number": head.run_number, "state": head.state.value,
                "finished_at": iso(head.finished_at)},
        "urgency": {
            "level": urgency_level(stat, urgency_score, head.study_priority, rules),
            "urgency_score": urgency_score,
            "stat": stat,
            "requested_priority": head.study_priority,
            "priority": priority,
            "worklist_status": head.wl_status,
        },
        "findings": [_finding(f, study_uid, key_series) for f in findings],
        "measurements": [{"organ": m.organ, "volume_ml": m.volume_ml, "mean_hu": m.mean_hu, "std_hu": m.std_hu}
                         for m in measurements],
        "key_images": [_key_image(uid, study_uid, key_series) for uid in key_uids],
        "results": [_result(r) for r in results],
    }


_KEY_SERIES = (select(Instance.sop_instance_uid, Series.series_instance_uid)
               .join(Series, Series.id == Instance.series_id)
               .where(Instance.sop_instance_uid.in_(bindparam("uids", expanding=True))))


def _key_image(sop_uid: str, study_uid: str, key_series: dict[str, str | None]) -> dict[str, Any]:
    return {"sop_instance_uid": sop_uid, "series_instance_uid": key_series.get(sop_uid),
            "available": key_series.get(sop_uid) is not None,
            "png_url": f"/studies/{study_uid}/key-images/{sop_uid}.png"}


def _finding(f, study_uid: str, key_series: dict[str, str | None]) -> dict[str, Any]:
    return {
        "question_id": f.question_id,
        "question": f.question,
        "answer": f.answer,
        "organ": f.organ,
        "code": ({"value": f.code_value, "scheme": f.code_scheme, "meaning": f.code_meaning}
                 if f.code_value else None),
        "positive": f.positive,
        "critical": f.critical,
        "urgency_weight": f.urgency_weight,
        "key_slices": f.key_slices or [],
        "key_images": [_key_image(uid, study_uid, key_series) for uid in (f.key_sop_instance_uids or [])],
    }


# ---------------------------------------------------------------------------------------------------------------
# Result objects
# ---------------------------------------------------------------------------------------------------------------
def _result(r) -> dict[str, Any]:
    return {"sop_instance_uid": r.sop_instance_uid, "sop_class_uid": r.sop_class_uid, "kind": r.kind,
            "series_instance_uid": r.series_instance_uid, "run_id": r.run_id, "size_bytes": r.size_bytes,
            "created_at": iso(r.created_at),
            "url": f"/studies/{r.study_instance_uid}/results/{r.sop_instance_uid}"}


def study_results(session: Session, study_uid: str) -> list[dict[str, Any]]:
    """Every object generated for the study, all runs, oldest first."""
    _study(session, study_uid)
    rows = session.scalars(select(ResultObject).where(ResultObject.study_instance_uid == study_uid)
                           .order_by(ResultObject.id)).all()
    return [_result(r) for r in rows]


def result_file(session: Session, data_dir: Path, study_uid: str, sop_uid: str) -> Path:
    """The file of one generated object; NotFound when the row or the file is missing."""
    row = session.scalars(select(ResultObject).where(ResultObject.sop_instance_uid == sop_uid,
                                                     ResultObject.study_instance_uid == study_uid)).first()
    if row is None:
        raise NotFound(f"no result object {sop_uid} in study {study_uid}")
    return safe_path(data_dir, row.path)


def source_instance_file(session: Session, storage_root: Path, study_uid: str, sop_uid: str) -> Path:
    """The stored file of a received instance of ``study_uid`` (for key-image renderings)."""
    path = session.execute(
        select(Instance.path).join(Series, Series.id == Instance.series_id).join(Study, Study.id == Series.study_id)
        .where(Instance.sop_instance_uid == sop_uid, Study.study_instance_uid == study_uid)
    ).scalar()
    if path is None:
        raise NotFound(f"no instance {sop_uid} in study {study_uid}")
    return safe_path(storage_root, path)


def safe_path(root: Path, relative: str) -> Path:
    """``root/relative``, refusing paths that leave ``root`` (a corrupt row must not serve /etc/passwd)."""
    root = Path(root).resolve()
    path = (root / relative).resolve()
    if root != path and root not in path.parents:
        raise NotFound(f"stored path {relative!r} is outside {root}")
    if not path.is_file():
        raise NotFound(f"stored file {relative!r} is missing")
    return path
