"""Celery tasks: thin wrappers that run one pipeline stage and hand the run to the next stage's queue."""

from __future__ import annotations

import logging

from celery import shared_task

from omnict_node.logs import log_event
from workers.pipeline import WorkerResources, execute_stage, fail_run, first_stage

log = logging.getLogger("omnict.tasks")

RUN_STAGE = "omnict.run_stage"


def worker_resources(app) -> WorkerResources:
    """The process's resources, created on first use and kept warm (models stay loaded between tasks)."""
    resources = getattr(app, "omnict_resources", None)
    if resources is None:
        resources = WorkerResources.from_settings(app.omnict_settings)
        app.omnict_resources = resources
    return resources


@shared_task(bind=True, name=RUN_STAGE, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def run_stage(self, run_id: int, stage_name: str) -> None:
    resources = worker_resources(self.app)
    settings = resources.settings.workers
    final_attempt = self.request.retries >= settings.task_max_retries
    try:
        following = execute_stage(resources, run_id, stage_name, final_attempt=final_attempt)
    except Exception as exc:
        if final_attempt:
            fail_run(resources.session_factory, run_id, f"{stage_name}: {type(exc).__name__}: {exc} "
                                                        f"(after {self.request.retries + 1} attempts)")
            return
        countdown = settings.retry_backoff_s * (2 ** self.request.retries)
        log_event(log, "pipeline.stage.retry", logging.WARNING, run_id=run_id, stage=stage_name,
                  attempt=self.request.retries + 1, countdown_s=countdown, error=type(exc).__name__)
        raise self.retry(exc=exc, countdown=countdown)
    if following is not None:
        dispatch_stage(self.app, run_id, following.name, following.queue)


def dispatch_stage(app, run_id: int, stage_name: str, queue: str) -> None:
    app.send_task(RUN_STAGE, args=[run_id, stage_name], queue=queue)


def dispatch_run(app, run_id: int) -> None:
    """Start a complete run at its first stage."""
    stage = first_stage()
    dispatch_stage(app, run_id, stage.name, stage.queue)
