"""Deciding when a study is complete, exactly once, across restarts.

A study is *complete* when
* every one of its series has been quiet for ``series_quiet_s`` (no series is still inside its own timer —
  mercure issue #32: a study was processed while a large series was still arriving), and
* the study has been quiet for ``study_quiet_s`` since its last instance,
or when its open run has been receiving for ``hard_limit_s`` (a sender that never stops must not block forever),
or when an operator forces it (``omnict-node study complete UID``).

All timers are columns in the database (``studies.last_received_at``, ``series.last_received_at``,
``pipeline_runs.opened_at``), so a node restarted in the middle of a study resumes its timers instead of losing the
study (MONAI Deploy's gateway deletes pending payloads on restart; we do not). Completion is a conditional
``UPDATE ... WHERE state = 'receiving'``: whichever sweeper (or operator) wins the row, the study completes once.

Dispatch to the workers happens after the completion commit. A run that is complete but not yet dispatched (the node
died in between, or an operator forced completion while the node was down) is dispatched by the next sweep.
Workers treat a second dispatch of the same run as a no-op, so the small window between sending and recording
``dispatched_at`` cannot start a run twice.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from db.models import AuditEvent, PipelineRun, RunState, Series, Study, as_utc, utcnow
from db.session import session_scope
from omnict_node.config import CompletenessSettings
from omnict_node.logs import log_event
from omnict_node.periodic import PeriodicThread

log = logging.getLogger("omnict.completeness")

Dispatcher = Callable[[int], None]  # called with a run id once the run is complete


@dataclass(frozen=True)
class CompletedRun:
    run_id: int
    study_instance_uid: str
    reason: str  # quiet | hard_limit | forced


def completion_reason(
    now: dt.datetime,
    run_opened_at: dt.datetime,
    study_last_received_at: dt.datetime,
    series_last_received_at: list[dt.datetime],
    rules: CompletenessSettings,
) -> str | None:
    """Why a receiving run is complete at ``now`` (``'quiet'`` or ``'hard_limit'``), or None if it is not yet."""
    if (now - as_utc(run_opened_at)).total_seconds() >= rules.hard_limit_s:
        return "hard_limit"
    series_stable = all((now - as_utc(t)).total_seconds() >= rules.series_quiet_s for t in series_last_received_at)
    study_quiet = (now - as_utc(study_last_received_at)).total_seconds() >= rules.study_quiet_s
    return "quiet" if series_stable and study_quiet else None


def mark_complete(session: Session, run_id: int, reason: str, now: dt.datetime | None = None,
                  timer_seen: dt.datetime | None = None) -> bool:
    """Move run ``run_id`` from RECEIVING to COMPLETE. True only for the one caller that made the change.

    With ``timer_seen`` (the study's ``last_received_at`` the decision was based on), the change happens only if no
    instance arrived since: registration moves that timer before it looks at the run (db.ingest), so an instance
    racing the sweeper either keeps the study open or finds the run complete and opens a new one.
    """
    condition = [PipelineRun.id == run_id, PipelineRun.state == RunState.RECEIVING]
    if timer_seen is not None:
        condition.append(select(Study.last_received_at).where(Study.id == PipelineRun.study_id)
                         .scalar_subquery() <= timer_seen)
    result = session.execute(
        update(PipelineRun).where(*condition)
        .values(state=RunState.COMPLETE, completed_at=now or utcnow(), completion_reason=reason, updated_at=utcnow())
    )
    return result.rowcount == 1


def force_complete(session: Session, study_instance_uid: str, actor: str = "cli") -> int | None:
    """Complete the study's open run now (operator action, audit-logged). Returns the run id, or None if the
    study has no run in RECEIVING."""
    run = session.scalars(
        select(PipelineRun)
        .join(Study)
        .where(Study.study_instance_uid == study_instance_uid, PipelineRun.state == RunState.RECEIVING)
    ).first()
    if run is None or not mark_complete(session, run.id, "forced"):
        return None
    session.add(AuditEvent(event="study.complete.forced", actor=actor, study_instance_uid=study_instance_uid,
                           run_id=run.id))
    return run.id


class CompletenessSweeper(PeriodicThread):
    """Periodically completes quiet studies and dispatches complete runs to the pipeline."""

    name = "completeness-sweeper"

    def __init__(self, rules: CompletenessSettings, session_factory: sessionmaker[Session], dispatch: Dispatcher) -> None:
        super().__init__()
        self.rules = rules
        self.session_factory = session_factory
        self.dispatch = dispatch
        self.interval_s = rules.sweep_interval_s

    # -- one sweep -------------------------------------------------------------------------------------------
    def sweep_once(self, now: dt.datetime | None = None) -> list[CompletedRun]:
        """Complete every receiving run whose timers have run out, then dispatch what is complete but undispatched."""
        now = now or utcnow()
        completed = self._complete_due_runs(now)
        for run in completed:
            log_event(log, "study.complete", study_uid=run.study_instance_uid, run_id=run.run_id, reason=run.reason)
        self._dispatch_pending(now)
        return completed

    def _complete_due_runs(self, now: dt.datetime) -> list[CompletedRun]:
        completed: list[CompletedRun] = []
        with session_scope(self.session_factory) as session:
            candidates = session.execute(
                select(PipelineRun.id, PipelineRun.opened_at, Study.id, Study.study_instance_uid, Study.last_received_at)
                .join(Study, Study.id == PipelineRun.study_id)
                .where(PipelineRun.state == RunState.RECEIVING)
            ).all()
            if not candidates:
                return completed
            series_times: dict[int, list[dt.datetime]] = {}
            for study_id, last in session.execute(
                select(Series.study_id, Series.last_received_at).where(Series.study_id.in_({c[2] for c in candidates}))
            ):
                series_times.setdefault(study_id, []).append(last)
            for run_id, opened_at, study_id, study_uid, study_last in candidates:
                reason = completion_reason(now, opened_at, study_last, series_times.get(study_id, []), self.rules)
                if reason and mark_complete(session, run_id, reason, now, timer_seen=study_last):
                    completed.append(CompletedRun(run_id, study_uid, reason))
        return completed

    def _dispatch_pending(self, now: dt.datetime) -> None:
        with session_scope(self.session_factory) as session:
            pending = session.scalars(
                select(PipelineRun.id).where(PipelineRun.state == RunState.COMPLETE, PipelineRun.dispatched_at.is_(None))
            ).all()
        for run_id in pending:
            try:
                self.dispatch(run_id)
            except Exception as exc:  # broker down: stays undispatched, retried next sweep
                log_event(log, "pipeline.dispatch.failed", logging.WARNING, run_id=run_id, error=type(exc).__name__)
                continue
            with session_scope(self.session_factory) as session:
                session.execute(update(PipelineRun).where(PipelineRun.id == run_id).values(dispatched_at=now))
            log_event(log, "pipeline.dispatched", run_id=run_id)

    def tick(self) -> list[CompletedRun]:
        return self.sweep_once()
