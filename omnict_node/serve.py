"""``omnict-node serve``: the whole node in one command on the embedded defaults.

Runs the storage SCP, the completeness sweeper (which dispatches complete studies to the pipeline) and, unless
``workers.embedded_worker`` is off, real Celery worker processes that it restarts if they die: by default one for the
gpu queue (models) and one for the cpu queue (``workers.embedded_queues``). Production deployments run the same pieces
as separate containers (see docker-compose.yml): ``serve`` with ``embedded_worker = false`` plus
``omnict-node worker -Q gpu`` / ``-Q cpu``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import click

from omnict_node.cli import NodeContext, pass_node
from omnict_node.config import Settings
from omnict_node.logs import configure_logging, log_event

log = logging.getLogger("omnict.node")


def embedded_worker_threads(settings: Settings) -> int:
    """Compute threads per embedded worker process (``workers.embedded_threads``, default the cores shared out). On
    the 2-core reference machine torch's default of one thread per core in each of the two processes made every
    stage slower: the pipeline took 7.0-9.0 s for a 300-slice study against 5.9-6.8 s with one thread each."""
    configured = settings.workers.embedded_threads
    if configured is not None:
        return configured
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // len(settings.workers.embedded_queues))


class EmbeddedWorker:
    """A supervised ``omnict-node worker -Q <queues>`` child process (restarted if it exits unexpectedly)."""

    def __init__(self, config_file: Path | None, settings: Settings, queues: str) -> None:
        self.config_file = config_file
        self.settings = settings
        self.queues = queues
        self.process: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def _command(self) -> list[str]:
        command = [sys.executable, "-m", "omnict_node"]
        if self.config_file:
            command += ["--config", str(self.config_file)]
        return command + ["worker", "-Q", self.queues]

    def _environment(self) -> dict[str, str]:
        # The child must see the same effective settings, including overrides made in code (tests, demo).
        environment = {**os.environ, **self.settings.to_environment()}
        environment.setdefault("OMP_NUM_THREADS", str(embedded_worker_threads(self.settings)))
        return environment

    def start(self) -> None:
        self._spawn()
        self._thread = threading.Thread(target=self._supervise, name="worker-supervisor", daemon=True)
        self._thread.start()

    def _spawn(self) -> None:
        self.process = subprocess.Popen(self._command(), env=self._environment())
        log_event(log, "worker.started", pid=self.process.pid, queues=self.queues)

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            code = self.process.wait() if self.process else 0
            if self._stopping.is_set():
                return
            log_event(log, "worker.exited", logging.WARNING, code=code, queues=self.queues)
            self._stopping.wait(1.0)
            if not self._stopping.is_set():
                self._spawn()

    def request_stop(self) -> None:
        """SIGTERM (Celery's warm shutdown: the task in hand finishes); :meth:`wait_stopped` waits for it."""
        self._stopping.set()
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout_s: float = 30.0) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class ApiServer:
    """The query API / worklist page (uvicorn) on a thread of the node process."""

    def __init__(self, settings: Settings, session_factory) -> None:
        import uvicorn

        from api.app import create_app

        config = uvicorn.Config(create_app(settings, session_factory), host=settings.api.host, port=settings.api.port,
                                access_log=False, log_level="warning")
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # the node owns SIGINT/SIGTERM
        self._thread = threading.Thread(target=self.server.run, name="api", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(15)


class Node:
    """The running node: SCP (+ query/retrieve), completeness sweeper, stall watchdog, API (+ embedded workers)."""

    def __init__(self, settings: Settings, config_file: Path | None = None) -> None:
        from db.migrate import ensure_schema
        from db.session import make_engine, make_session_factory
        from dicom_node.completeness import CompletenessSweeper
        from dicom_node.qr import add_query_retrieve
        from dicom_node.scp import StorageSCP
        from workers.celery_app import make_celery
        from workers.tasks import dispatch_run, dispatch_stage
        from workers.watchdog import StallWatchdog

        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        ensure_schema(settings.database.url)
        self.engine = make_engine(settings.database.url)
        self.session_factory = make_session_factory(self.engine)
        self.celery = make_celery(settings)
        self.scp = StorageSCP(settings, self.session_factory,
                              extra_services=lambda ae: add_query_retrieve(ae, settings, self.session_factory))
        self.sweeper = CompletenessSweeper(settings.completeness, self.session_factory,
                                           lambda run_id: dispatch_run(self.celery, run_id))
        self.watchdog = StallWatchdog(self.session_factory, settings.workers.stall_timeout_s,
                                      lambda run_id, stage: dispatch_stage(self.celery, run_id, stage.name, stage.queue))
        self.workers = [EmbeddedWorker(config_file, settings, queues) for queues in settings.workers.embedded_queues] \
            if settings.workers.embedded_worker else []
        self.api = ApiServer(settings, self.session_factory) if settings.api.enabled else None

    def start(self) -> None:
        self.scp.start()
        self.sweeper.start()
        self.watchdog.start()
        for worker in self.workers:
            worker.start()
        if self.api:
            self.api.start()
        log_event(log, "node.started", ae_title=self.settings.dicom.ae_title, port=self.settings.dicom.port,
                  data_dir=self.settings.data_dir)

    def stop(self) -> None:
        self.scp.stop()
        self.sweeper.stop()
        self.watchdog.stop()
        if self.api:
            self.api.stop()
        for worker in self.workers:  # all at once: each finishes its task in hand
            worker.request_stop()
        for worker in self.workers:
            worker.wait_stopped()
        self.engine.dispose()
        log_event(log, "node.stopped")


@click.command()
@pass_node
def serve(node: NodeContext) -> None:
    """Run the node (SCP, completeness, pipeline worker) until stopped with Ctrl-C or SIGTERM."""
    configure_logging(node.settings.log_level)
    running = Node(node.settings, node.config_file)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    running.start()
    stop.wait()
    running.stop()
