"""The Celery application: broker choice, queues and delivery guarantees.

Embedded mode (default) uses kombu's filesystem transport under ``<data_dir>/broker``, made safe against torn
messages (:mod:`workers.broker`): a real Celery worker process, no servers. Production uses Redis
(``workers.broker_url = "redis://..."``).

Guarantees are not left to the broker alone: the database is the record of every run's state, stages are
idempotent, and the node re-dispatches runs that are complete but undispatched (see dicom_node.completeness).
"""

from __future__ import annotations

from celery import Celery

from omnict_node.config import Settings

CPU_QUEUE = "cpu"
GPU_QUEUE = "gpu"

# How often an idle worker looks into the embedded broker's queue folder (kombu's default is 1 s). Every stage hand-off
# waits for the next poll, so the default cost up to 1 s per stage (~0.5 s on average, five hand-offs per run). At
# 20 ms a hand-off waits at most 20 ms (50 ms at the former 0.05 s, four hand-offs on a run's critical path); the
# price, measured on the 2-core machine (CPU time of an idle `omnict-node worker -Q cpu` over 20 s): 1.1-1.4 % of a
# core per idle worker, against 0.65 % at 50 ms.
FILESYSTEM_POLLING_INTERVAL_S = 0.02


def make_celery(settings: Settings) -> Celery:
    """Build the Celery app for ``settings``; the settings ride on the app as ``app.omnict_settings``."""
    app = Celery("omnict", broker=settings.workers.broker_url, include=["workers.tasks"], set_as_current=True)
    conf: dict = dict(
        task_default_queue=CPU_QUEUE,
        task_acks_late=True,  # a task is acknowledged only after it ran: a crashed worker's task is redelivered
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # one heavy model task per process at a time
        task_ignore_result=True,  # results live in our database, not in a result backend
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        worker_send_task_events=False,
        task_serializer="json",
        accept_content=["json"],
    )
    if settings.is_embedded_broker:
        folder = settings.broker_dir
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        conf["broker_url"] = "filesystem://localhost//"
        conf["broker_transport"] = "workers.broker:Transport"  # kombu's, with whole messages only (see there)
        conf["broker_transport_options"] = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            "control_folder": str(folder / "control"),  # kombu's default is ./control in the working directory
            "polling_interval": FILESYSTEM_POLLING_INTERVAL_S,
        }
    else:
        # Redis redelivers an unacknowledged task after the visibility timeout (a worker killed mid-task).
        conf["broker_transport_options"] = {"visibility_timeout": 3600}
    app.conf.update(conf)
    app.omnict_settings = settings  # type: ignore[attr-defined]
    return app
