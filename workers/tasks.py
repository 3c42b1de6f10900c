"""Celery tasks: thin wrappers that run one pipeline stage and hand the run to the next stage's queue."""

from __future__ import annotations

import importlib
import logging
import os
import threading
from pathlib import Path

from celery import current_app, shared_task
from celery.signals import task_prerun, worker_process_init, worker_process_shutdown, worker_shutdown

from omnict_node.logs import log_event
from workers.celery_app import GPU_QUEUE
from workers.pipeline import (
    SideTask,
    WorkerResources,
    execute_side_task,
    execute_stage,
    fail_run,
    first_stage,
    freeze_long_lived_objects,
    side_task_by_name,
    stage_by_name,
)

log = logging.getLogger("omnict.tasks")

RUN_STAGE = "omnict.run_stage"
RUN_SIDE_TASK = "omnict.run_side_task"
PRELOAD_IMPORT_WAIT_S = 300.0  # a task waits this long at most for its worker's preload to import the stages

# What the CPU stages import on first use (DICOM encoding, the network stack, SQL helpers): about a second of imports
# that the first study after a worker start would otherwise wait for. Imported when the worker process starts instead
# (the models are not: they load on first use, as before).
STAGE_DEPENDENCIES = ("omnict_core.io.dicom_series", "reports", "api.worklist", "dicom_node.delivery", "scipy.ndimage",
                      "workers.stages")


# highdicom reads its tables of the standard (JSON, ~0.7 s) on the first SEG it builds; they are cached per process.
HIGHDICOM_TABLES = ("get_iod_module_map", "get_module_attribute_map")


@worker_process_init.connect  # every process that runs tasks (the solo pool's own process sends it too)
def start_preloading(sender=None, **_) -> None:
    """Preload in the background. A task that arrives meanwhile waits for the imports (:func:`wait_for_imports`):
    two threads importing the same packages at once can see a module half initialised (pydicom's circular imports
    raised ImportError in a task that raced the preload, and left the process's modules broken). A worker that
    consumes the gpu queue then loads its models (segmenter, OmniCT engine) into the process's resources, as its
    first segment / infer task would (``WorkerResources.get_or_create``: loaded once, a task that needs one meanwhile
    waits for it). When done, the process marks itself warm (:func:`warm_marker`)."""
    app = getattr(sender, "app", None) or current_app
    settings = getattr(app, "omnict_settings", None)
    # Read here, in the worker's own thread (Celery's current app is per thread); the resources the tasks will use.
    models_to = worker_resources(app) if settings is not None and GPU_QUEUE in getattr(app, "omnict_queues", ()) \
        else None
    imported = app.omnict_imported = threading.Event()

    def preload() -> None:
        try:
            import_stage_dependencies()
        finally:
            imported.set()
        if models_to is not None:
            load_models(models_to)
        freeze_long_lived_objects()  # the modules just imported live as long as the process
        if settings is not None:
            marker = warm_marker(settings.data_dir, os.getpid())
            try:
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"{os.getpid()}\n")
            except OSError as exc:
                log_event(log, "worker.marker_failed", logging.WARNING, error=type(exc).__name__)

    threading.Thread(target=preload, name="omnict-preload", daemon=True).start()


def warm_marker(data_dir: Path, pid: int) -> Path:
    """``<data_dir>/workers/<pid>.warm``: exists while worker process ``pid`` is up with its stage dependencies
    loaded (removed at shutdown; a killed worker leaves its file behind). The pipeline benchmark waits for it."""
    return Path(data_dir) / "workers" / f"{pid}.warm"


@worker_process_shutdown.connect
@worker_shutdown.connect
def remove_warm_marker(**_) -> None:
    settings = getattr(current_app, "omnict_settings", None)
    if settings is not None:
        warm_marker(settings.data_dir, os.getpid()).unlink(missing_ok=True)


def import_stage_dependencies() -> None:
    for name in STAGE_DEPENDENCIES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - a stage that needs it reports the error when it runs
            log_event(log, "worker.preimport_failed", logging.WARNING, module=name, error=type(exc).__name__)
    try:
        importlib.import_module("reports.narrative").load_template()
    except Exception as exc:  # noqa: BLE001 - the report stage reports a broken template when it runs
        log_event(log, "worker.preload_failed", logging.WARNING, module="reports.narrative", error=type(exc).__name__)
    try:
        tables = importlib.import_module("highdicom._standard_utils")
        for name in HIGHDICOM_TABLES:
            getattr(tables, name)()
    except Exception as exc:  # noqa: BLE001 - a private helper of highdicom: without it the first SEG reads them
        log_event(log, "worker.preload_failed", logging.WARNING, module="highdicom", error=type(exc).__name__)


def load_models(resources: WorkerResources) -> None:
    """The gpu-queue models of this process, loaded now rather than by the first study's tasks. A model that cannot
    be loaded (no checkpoint at the configured path, say) is logged here and fails its stage, with the reason, when
    a study needs it."""
    from workers.stages.infer import engine_for
    from workers.stages.segment import segmenter_for

    for name, load in (("segmenter", segmenter_for), ("omnict_engine", engine_for)):
        try:
            load(resources)
        except Exception as exc:  # noqa: BLE001 - reported again by the stage that needs the model
            log_event(log, "worker.model_preload_failed", logging.WARNING, model=name, error=type(exc).__name__)
        else:
            log_event(log, "worker.model_loaded", model=name)


@task_prerun.connect  # every task of the process, before its body
def wait_for_imports(task=None, **_) -> None:
    """Until the worker's preload has imported the stage dependencies (no wait outside a preloading worker)."""
    imported = getattr(getattr(task, "app", None), "omnict_imported", None)
    if imported is not None and not imported.wait(PRELOAD_IMPORT_WAIT_S):
        log_event(log, "worker.preload_slow", logging.WARNING, waited_s=PRELOAD_IMPORT_WAIT_S)


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
        following = execute_stage(resources, run_id, stage_name, final_attempt=final_attempt,
                                  side_task_starter=lambda task: dispatch_side_task(self.app, run_id, task))
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
        for task in stage_by_name(stage_name).side_tasks:
            dispatch_side_task(self.app, run_id, task)


@shared_task(bind=True, name=RUN_SIDE_TASK, acks_late=True, reject_on_worker_lost=True)
def run_side_task(self, run_id: int, task_name: str) -> None:
    """One try, no retry: when a side task fails, the main line's stages do its work (see SideTask)."""
    execute_side_task(worker_resources(self.app), run_id, side_task_by_name(task_name))


def dispatch_side_task(app, run_id: int, task: SideTask) -> None:
    app.send_task(RUN_SIDE_TASK, args=[run_id, task.name], queue=task.queue)


def dispatch_stage(app, run_id: int, stage_name: str, queue: str) -> None:
    app.send_task(RUN_STAGE, args=[run_id, stage_name], queue=queue)


def dispatch_run(app, run_id: int) -> None:
    """Start a complete run at its first stage."""
    stage = first_stage()
    dispatch_stage(app, run_id, stage.name, stage.queue)
