"""Re-dispatching runs whose worker died or whose message was lost.

A running stage touches its run's ``updated_at`` every few seconds (``workers.pipeline.Heartbeat``). When a worker is
killed mid-stage (kill -9, OOM, lost GPU node) the heartbeat stops; after ``workers.stall_timeout_s`` the node
dispatches the same stage again. A run left untouched after a stage finished, or after it was dispatched, lost its
message to the broker (a worker killed while holding it): the node dispatches the stage that was to take it on.
Stages are idempotent and claim their run with a conditional state change, so the run still produces exactly one set
of results (result UIDs derive from the run).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from db.models import PipelineRun, utcnow
from db.session import session_scope
from omnict_node.logs import log_event
from omnict_node.periodic import PeriodicThread
from workers.pipeline import Stage, stalled_runs

log = logging.getLogger("omnict.watchdog")


class StallWatchdog(PeriodicThread):
    name = "stall-watchdog"
    interval_s = 2.0

    def __init__(self, session_factory: sessionmaker[Session], stall_timeout_s: float,
                 dispatch: Callable[[int, Stage], None]) -> None:
        super().__init__()
        self.session_factory = session_factory
        self.stall_timeout_s = stall_timeout_s
        self.dispatch = dispatch

    def check_once(self) -> list[int]:
        """Re-dispatch every stalled run once; returns their ids."""
        with session_scope(self.session_factory) as session:
            stalled = stalled_runs(session, self.stall_timeout_s)
            for run in stalled:  # restart the clock so the next check does not dispatch it again
                session.execute(update(PipelineRun).where(PipelineRun.id == run.run_id).values(updated_at=utcnow()))
        for run in stalled:
            log_event(log, "pipeline.stage.stalled", logging.WARNING, run_id=run.run_id, stage=run.stage.name,
                      reason=run.reason, stall_timeout_s=self.stall_timeout_s)
            self.dispatch(run.run_id, run.stage)
        return [run.run_id for run in stalled]

    def tick(self) -> list[int]:
        return self.check_once()
