"""The pipeline of a complete study, independent of Celery: assemble → segment → infer → report → deliver.

Each stage
* claims the run with a conditional state change (from the previous stage's state, or its own state when retried),
  so a duplicate dispatch of the same run is a no-op and a redelivered task resumes where it was;
* is idempotent: it writes its outputs to the run's work folder under fixed names and records them in
  ``pipeline_runs.result``;
* records every attempt (start, end, duration, outcome, error) as a ``run_stages`` row.

Errors: :class:`PermanentStageError` (the data cannot be processed: no CT series, undecodable pixels) puts the run
in FAILED with the reason; any other exception is transient and retried with backoff by the task layer, then
FAILED when the retries are spent.
"""

from __future__ import annotations

import datetime as dt
import gc
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from db.models import PipelineRun, RunState, StageRecord, Study, utcnow
from db.session import session_factory_for, session_scope
from db.states import check_transition
from omnict_node.config import Settings
from omnict_node.logs import log_event

log = logging.getLogger("omnict.pipeline")


class PermanentStageError(Exception):
    """The run cannot succeed by retrying (bad or unsupported input). The run goes to ``run_state``."""

    run_state = RunState.FAILED


class DeliveryFailedError(PermanentStageError):
    """Results exist but could not be delivered: the run waits in DELIVERY_FAILED for an operator's redelivery."""

    run_state = RunState.DELIVERY_FAILED


@dataclass
class StageContext:
    """What a stage function gets: the run, its study, where to write, and earlier stages' results."""

    run_id: int
    run_number: int
    study_instance_uid: str
    settings: Settings
    session_factory: sessionmaker[Session]
    work_dir: Path
    results: dict[str, Any]
    resources: "WorkerResources"
    final_attempt: bool = False  # no retry follows if this attempt fails transiently
    # Dispatches a side task of this run by name (the task layer's; None where stages run in-process, e.g. tests).
    side_task_starter: Callable[["SideTask"], None] | None = None

    def start_side_task(self, task: "SideTask") -> None:
        """Start ``task`` now, from inside the stage, once the outputs it needs are written (see
        ``Stage.early_side_tasks``). A dispatch that fails is logged and the stage goes on: the main line does
        the side task's work itself."""
        if self.side_task_starter is None:
            return
        try:
            self.side_task_starter(task)
        except Exception as exc:  # noqa: BLE001 - the broker's error must not fail the stage
            log_event(log, "pipeline.side_task.not_started", logging.WARNING, run_id=self.run_id, task=task.name,
                      error=type(exc).__name__)


StageFunction = Callable[[StageContext], dict[str, Any]]


@dataclass(frozen=True)
class SideTask:
    """Work dispatched beside the main line — when a stage has succeeded (``Stage.side_tasks``) or from inside it once
    the outputs it needs are written (``Stage.early_side_tasks``) — to run while the next stages do (on a worker of
    its own queue). It never changes the run's state and its failure fails nothing: the main line's stages do
    the same work themselves when its results are not there. ``while_states``: a run in any other state skips it
    (the main line has got there first)."""

    name: str
    queue: str
    function: StageFunction
    while_states: frozenset[RunState]


@dataclass(frozen=True)
class Stage:
    name: str
    state: RunState
    queue: str  # "cpu" or "gpu"
    function: StageFunction
    side_tasks: tuple[SideTask, ...] = ()  # dispatched with the next stage when this one succeeds
    # started by the stage function itself (StageContext.start_side_task) once the outputs they need are written
    early_side_tasks: tuple[SideTask, ...] = ()


@dataclass
class WorkerResources:
    """Per-process state kept warm between tasks (database engine, loaded models)."""

    settings: Settings
    session_factory: sessionmaker[Session]
    cache: dict[str, Any] = field(default_factory=dict)
    # The worker's preload thread and a task may ask for the same model at once: one loads it, the other waits
    # (a lock per key: a task that needs the segmenter does not wait for the engine being loaded).
    _locks: dict[str, threading.Lock] = field(default_factory=dict, repr=False)
    _locks_guard: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> "WorkerResources":
        return cls(settings, session_factory_for(settings.database.url))

    def get_or_create(self, key: str, factory: Callable[[], Any]) -> Any:
        """One instance per process (a model is loaded once and kept warm)."""
        with self._locks_guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self.cache:
                self.cache[key] = factory()
                freeze_long_lived_objects()
            return self.cache[key]


@contextmanager
def cyclic_gc_paused():
    """No cyclic garbage collection inside: for stage code that creates some hundred thousand short-lived Python
    objects (pydicom datasets and elements: reading a series' headers, encoding the result objects), whose collection
    passes cost a fifth of its time. The objects are freed by reference counting meanwhile; the collector runs as
    usual afterwards."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def freeze_long_lived_objects() -> None:
    """Exempt what a worker keeps for its lifetime (a loaded model: hundreds of thousands of Python objects; imported
    modules) from the cyclic garbage collector's full passes, which every stage otherwise pays again and again (a
    third of a second in the report stage of a 300-slice study, which creates many short-lived DICOM objects).
    ``gc.freeze`` after a collection: only garbage is collected first, later garbage is collected as before; what is
    frozen is still freed by reference counting when released."""
    gc.collect()
    gc.freeze()


def run_work_dir(settings: Settings, study_instance_uid: str, run_number: int) -> Path:
    return settings.data_dir / "work" / study_instance_uid / f"run-{run_number}"


def _stages() -> list[Stage]:
    from workers.stages import STAGES

    return STAGES


def stage_by_name(name: str) -> Stage:
    for stage in _stages():
        if stage.name == name:
            return stage
    raise KeyError(f"unknown pipeline stage: {name}")


def side_task_by_name(name: str) -> SideTask:
    for stage in _stages():
        for task in (*stage.early_side_tasks, *stage.side_tasks):
            if task.name == name:
                return task
    raise KeyError(f"unknown side task: {name}")


def first_stage() -> Stage:
    return _stages()[0]


def next_stage(stage: Stage) -> Stage | None:
    stages = _stages()
    index = stages.index(stage)
    return stages[index + 1] if index + 1 < len(stages) else None


def _state_before(stage: Stage) -> RunState:
    stages = _stages()
    index = stages.index(stage)
    return RunState.COMPLETE if index == 0 else stages[index - 1].state


def execute_stage(resources: WorkerResources, run_id: int, stage_name: str, final_attempt: bool = False,
                  side_task_starter: Callable[[SideTask], None] | None = None) -> Stage | None:
    """Run one stage of one run. Returns the next stage to dispatch, or None (done, skipped or failed).
    ``side_task_starter(task)`` dispatches a side task of the run (see ``Stage.early_side_tasks``).

    Raises any transient exception for the caller's retry policy.
    """
    stage = stage_by_name(stage_name)
    claimed = _claim(resources, run_id, stage)
    if claimed is None:
        return None
    context, record_id = claimed
    context.final_attempt = final_attempt
    context.side_task_starter = side_task_starter
    started = time.monotonic()
    try:
        with Heartbeat(resources.session_factory, run_id):
            output = stage.function(context)
    except PermanentStageError as exc:
        _finish_attempt(resources.session_factory, record_id, started, "failed", str(exc))
        fail_run(resources.session_factory, run_id, f"{stage.name}: {exc}", exc.run_state)
        return None
    except Exception as exc:
        _finish_attempt(resources.session_factory, record_id, started, "retry", f"{type(exc).__name__}: {exc}")
        raise
    _finish_attempt(resources.session_factory, record_id, started, "ok", None)
    following = next_stage(stage)
    with session_scope(resources.session_factory) as session:
        run = session.get(PipelineRun, run_id)
        run.result = {**(run.result or {}), stage.name: output}
        if following is None and stage.state == RunState.DELIVERING:
            check_transition(run.state, RunState.DELIVERED)
            run.state = RunState.DELIVERED
            run.finished_at = utcnow()
    log_event(log, "pipeline.stage.done", run_id=run_id, stage=stage.name, seconds=time.monotonic() - started)
    return following


def _claim(resources: WorkerResources, run_id: int, stage: Stage) -> tuple[StageContext, int] | None:
    """Move the run into ``stage.state`` (from the state before it, or already in it for a retry)."""
    factory = resources.session_factory
    allowed_from = {_state_before(stage), stage.state}
    if stage.state == RunState.DELIVERING:
        allowed_from.add(RunState.DELIVERY_FAILED)  # an operator's redelivery
    with session_scope(factory) as session:
        changed = session.execute(
            update(PipelineRun)
            .where(PipelineRun.id == run_id, PipelineRun.state.in_(allowed_from))
            .values(state=stage.state, updated_at=utcnow())
        ).rowcount
        if changed != 1:
            state = session.scalar(select(PipelineRun.state).where(PipelineRun.id == run_id))
            log_event(log, "pipeline.stage.skipped", run_id=run_id, stage=stage.name, state=getattr(state, "value", state))
            return None
        return _start_attempt(resources, session, session.get(PipelineRun, run_id), stage.name)


def _start_attempt(resources: WorkerResources, session: Session, run: PipelineRun, name: str
                   ) -> tuple[StageContext, int]:
    """Record the attempt of stage (or side task) ``name`` on ``run`` and build its context."""
    study_uid = session.scalar(select(Study.study_instance_uid).where(Study.id == run.study_id))
    attempt = 1 + (session.scalar(
        select(func.count(StageRecord.id)).where(StageRecord.run_id == run.id, StageRecord.stage == name)
    ) or 0)
    record = StageRecord(run_id=run.id, stage=name, attempt=attempt, worker=f"{socket.gethostname()}:{os.getpid()}")
    session.add(record)
    session.flush()
    settings = resources.settings
    context = StageContext(run.id, run.run_number, study_uid, settings, resources.session_factory,
                           run_work_dir(settings, study_uid, run.run_number), dict(run.result or {}), resources)
    context.work_dir.mkdir(parents=True, exist_ok=True)
    return context, record.id


def execute_side_task(resources: WorkerResources, run_id: int, task: SideTask) -> None:
    """Run side task ``task`` for run ``run_id`` once, recorded as a ``run_stages`` row of its own name. Never
    raises for the task's own errors: they are recorded and logged, and the main line covers the work."""
    with session_scope(resources.session_factory) as session:
        run = session.get(PipelineRun, run_id)
        if run is None or run.state not in task.while_states:
            log_event(log, "pipeline.side_task.skipped", run_id=run_id, task=task.name,
                      state=getattr(getattr(run, "state", None), "value", None))
            return
        context, record_id = _start_attempt(resources, session, run, task.name)
    started = time.monotonic()
    try:
        output = task.function(context)
    except Exception as exc:  # noqa: BLE001 - the main line does this work itself
        _finish_attempt(resources.session_factory, record_id, started, "failed", f"{type(exc).__name__}: {exc}")
        log_event(log, "pipeline.side_task.failed", logging.WARNING, run_id=run_id, task=task.name,
                  error=type(exc).__name__)
        return
    _finish_attempt(resources.session_factory, record_id, started, "ok", None)
    log_event(log, "pipeline.side_task.done", run_id=run_id, task=task.name, seconds=time.monotonic() - started,
              **{k: v for k, v in output.items() if isinstance(v, (int, float, str))})


def _finish_attempt(factory: sessionmaker[Session], record_id: int, started: float, outcome: str, error: str | None) -> None:
    with session_scope(factory) as session:
        record = session.get(StageRecord, record_id)
        record.finished_at = utcnow()
        record.duration_s = time.monotonic() - started
        record.outcome = outcome
        record.error = error


def fail_run(factory: sessionmaker[Session], run_id: int, reason: str, state: RunState = RunState.FAILED) -> None:
    """Put a run in FAILED (or DELIVERY_FAILED) with ``reason`` (visible in `omnict-node status`)."""
    with session_scope(factory) as session:
        run = session.get(PipelineRun, run_id)
        if run.state in (RunState.DELIVERED, RunState.FAILED):
            return
        run.state = state
        run.error = reason[:4000]
        run.finished_at = utcnow()
    log_event(log, "pipeline.run.failed", logging.ERROR, run_id=run_id, reason=reason[:200])


class Heartbeat:
    """While a stage runs, touch the run's ``updated_at`` every few seconds. A run in a processing state whose
    heartbeat stopped (its worker was killed) is re-dispatched by the node (see :func:`stalled_runs`)."""

    INTERVAL_S = 5.0

    def __init__(self, factory: sessionmaker[Session], run_id: int) -> None:
        self.factory = factory
        self.run_id = run_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{run_id}", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _beat(self) -> None:
        while not self._stop.wait(self.INTERVAL_S):
            try:
                with session_scope(self.factory) as session:
                    session.execute(update(PipelineRun).where(PipelineRun.id == self.run_id).values(updated_at=utcnow()))
            except Exception:  # a missed beat is harmless; the next one retries
                log.debug("heartbeat failed", exc_info=True)


@dataclass(frozen=True)
class StalledRun:
    """A run no worker has touched for the stall timeout, and the stage to dispatch again (see :func:`stalled_runs`)."""

    run_id: int
    stage: Stage
    reason: str  # "heartbeat" (its worker died mid-stage), "handoff" or "dispatch" (a message was lost)


def stalled_runs(session: Session, stall_after_s: float) -> list[StalledRun]:
    """Runs the workers have not touched for ``stall_after_s``, each with the stage that takes it on:

    * inside a stage whose heartbeat stopped (its worker was killed): that stage again, which resumes;
    * a stage done (its attempt ok and its output recorded) whose message to the next stage was lost: the next stage;
    * complete and dispatched, but its first stage never started (the message was lost): the first stage.

    A run whose message only waits in a busy queue gets a second one; that is harmless: a stage claims its run with a
    conditional state change, so the later of the two messages is a no-op.
    """
    stages = _stages()
    by_state = {stage.state: stage for stage in stages}
    cutoff = utcnow() - dt.timedelta(seconds=stall_after_s)
    rows = session.execute(
        select(PipelineRun.id, PipelineRun.state, PipelineRun.result)
        .where(PipelineRun.updated_at < cutoff,
               or_(PipelineRun.state.in_(list(by_state)),
                   and_(PipelineRun.state == RunState.COMPLETE, PipelineRun.dispatched_at.is_not(None))))
    ).all()
    stalled: list[StalledRun] = []
    for run_id, state, result in rows:
        if state == RunState.COMPLETE:
            stalled.append(StalledRun(run_id, stages[0], "dispatch"))
            continue
        stage = by_state[state]
        last_outcome = session.scalar(
            select(StageRecord.outcome).where(StageRecord.run_id == run_id, StageRecord.stage == stage.name)
            .order_by(StageRecord.id.desc()).limit(1))
        following = next_stage(stage)
        if last_outcome == "ok" and following is not None and stage.name in (result or {}):
            stalled.append(StalledRun(run_id, following, "handoff"))
        else:
            stalled.append(StalledRun(run_id, stage, "heartbeat"))
    return stalled
