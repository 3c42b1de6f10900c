"""Read queries over studies, runs, findings and result objects: shared by the HTTP API and the CLI.

Each function returns plain dicts ready for JSON, built from a fixed, small number of SELECTs (no per-row lazy
loads), so the API's cost over the SQL stays bounded.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from sqlalchemy import and_, bindparam, exists, func, or_, select
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


def study_findings(session: Session, study_uid: str, rules: WorklistRules | None = None,
                   run_number: int | None = None, now: dt.datetime | None = None) -> dict[str, Any]:
    """Every question with its answer and code, the organ measurements, the urgency and the key images of the
    study's results run (see :func:`results_run`). Four or five SELECTs, Core rows (read-only: no ORM objects)."""
    rules = rules or WorklistRules()
    conn = session.connection()
    head = conn.execute(_FINDINGS_HEAD[run_number is not None], {"uid": study_uid, "run_number": run_number}).first()
    if head is None:
        raise NotFound(f"study {study_uid} is not known")
    if head.run_id is None:
        if run_number is not None:
            raise NotFound(f"study {study_uid} has no run {run_number}")
        return {"study_instance_uid": study_uid, "run": None, "urgency": None, "findings": [], "measurements": [],
                "key_images": [], "results": []}
    findings = conn.execute(_RUN_FINDINGS, {"run_id": head.run_id}).all()
    measurements = conn.execute(_RUN_MEASUREMENTS, {"run_id": head.run_id}).all()
    results = conn.execute(_RUN_RESULTS, {"run_id": head.run_id}).all()
    key_uids = list(dict.fromkeys(uid for f in findings for uid in (f.key_sop_instance_uids or [])))
    key_series = _series_of_instances(session, key_uids)
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


def _series_of_instances(session: Session, sop_uids: list[str]) -> dict[str, str | None]:
    if not sop_uids:
        return {}
    rows = session.connection().execute(_KEY_SERIES, {"uids": sop_uids}).all()
    found = dict(rows)
    return {uid: found.get(uid) for uid in sop_uids}


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
