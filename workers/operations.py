"""Operator actions on runs (rerun, redeliver), audit-logged; the `omnict-node study` commands call them."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import AuditEvent, PipelineRun, RunState, Study, utcnow
from db.states import PROCESSING


class OperationError(RuntimeError):
    pass


def _latest_run(session: Session, study_instance_uid: str) -> tuple[Study, PipelineRun | None]:
    study = session.scalars(select(Study).where(Study.study_instance_uid == study_instance_uid)).first()
    if study is None:
        raise OperationError(f"unknown study {study_instance_uid}")
    run = session.scalars(select(PipelineRun).where(PipelineRun.study_id == study.id)
                          .order_by(PipelineRun.run_number.desc())).first()
    return study, run


def open_rerun(session: Session, study_instance_uid: str, actor: str = "cli") -> int:
    """Open a new run in COMPLETE (the node's sweeper dispatches it). Refused while a run is receiving or processing."""
    study, latest = _latest_run(session, study_instance_uid)
    if latest is not None and (latest.state == RunState.RECEIVING or latest.state in PROCESSING):
        raise OperationError(f"run {latest.run_number} of this study is still {latest.state.value}")
    number = (latest.run_number if latest else 0) + 1
    run = PipelineRun(study_id=study.id, run_number=number, state=RunState.COMPLETE, trigger="rerun",
                      completed_at=utcnow(), completion_reason="forced")
    session.add(run)
    session.flush()
    session.add(AuditEvent(event="study.rerun", actor=actor, study_instance_uid=study_instance_uid, run_id=run.id))
    return number


def prepare_redelivery(session: Session, study_instance_uid: str, actor: str = "cli") -> int:
    """Put the latest run back to DELIVERY_FAILED (if it was delivered) so the deliver stage may claim it again."""
    _, latest = _latest_run(session, study_instance_uid)
    if latest is None or latest.state not in (RunState.DELIVERY_FAILED, RunState.DELIVERED):
        state = latest.state.value if latest else "none"
        raise OperationError(f"nothing to redeliver: the latest run is {state}")
    latest.state = RunState.DELIVERY_FAILED
    session.add(AuditEvent(event="study.redeliver", actor=actor, study_instance_uid=study_instance_uid, run_id=latest.id))
    return latest.id
