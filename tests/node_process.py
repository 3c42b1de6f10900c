"""The node as a real process (``omnict-node serve``), for tests that kill and restart it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import select

from db.models import PipelineRun, Study
from db.session import make_engine, make_session_factory, session_scope
from omnict_node.config import Settings
from tests.services import wait_for_port


def settings_environment(settings: Settings) -> dict[str, str]:
    """Environment variables that reproduce ``settings`` in a child process (the API stays off)."""
    env = dict(os.environ, TCP_NODELAY="1", PYTHONUNBUFFERED="1")
    env.pop("OMNICT_CONFIG", None)
    env.update(settings.to_environment())
    env["OMNICT_API__ENABLED"] = "false"
    return env


class NodeProcess:
    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.session_factory = make_session_factory(make_engine(settings.database.url))

    def start(self) -> "NodeProcess":
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "omnict_node", "serve"],
                                        env=settings_environment(self.settings), stdout=log, stderr=log,
                                        start_new_session=True)
        wait_for_port(self.settings.dicom.port, timeout=60)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """kill -9 the node and everything it started (its worker child too)."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def runs(self, study_uid: str) -> list[PipelineRun]:
        with session_scope(self.session_factory) as session:
            return session.scalars(select(PipelineRun).join(Study).where(Study.study_instance_uid == study_uid)
                                   .order_by(PipelineRun.run_number)).all()

    def wait_for_run(self, study_uid: str, predicate, timeout: float = 120.0) -> list[PipelineRun]:
        deadline = time.monotonic() + timeout
        runs: list[PipelineRun] = []
        while time.monotonic() < deadline:
            runs = self.runs(study_uid)
            if runs and predicate(runs):
                return runs
            if self.process and self.process.poll() is not None:
                raise AssertionError(f"node exited with {self.process.returncode}:\n{self.log_text()[-4000:]}")
            time.sleep(0.2)
        states = [(r.run_number, r.state.value, r.error) for r in runs]
        raise AssertionError(f"timed out waiting; runs={states}\n{self.log_text()[-4000:]}")
