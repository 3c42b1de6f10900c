"""End-to-end setting: a real Orthanc PACS and the node as real processes, wired to each other.

Orthanc knows the node as modality ``omnict``; the node delivers its results to Orthanc. A phantom study with known
findings is stored into Orthanc, which sends it to the node (``/modalities/omnict/store``), exactly as a PACS
forwarding rule would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from omnict_node.config import load_settings
from tests import services
from tests.node_process import NodeProcess

CHECKPOINT = os.environ.get("OMNICT_TEST_CHECKPOINT")  # default: the shipped demo checkpoint


@dataclass
class Site:
    orthanc: services.OrthancServer
    node: NodeProcess
    settings: object

    def send_study_from_pacs(self, files: list[Path]) -> str:
        """Upload ``files`` to Orthanc and have Orthanc C-STORE the study to the node; returns Orthanc's study id."""
        import pydicom

        for path in files:
            self.orthanc.upload(path)
        study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        orthanc_id = self.orthanc.post_json("/tools/lookup", study_uid.encode())[0]["ID"]
        job = self.orthanc.post_json("/modalities/omnict/store", {"Resources": [orthanc_id], "Synchronous": True})
        assert job["FailedInstancesCount"] == 0, job
        return orthanc_id


def make_site(tmp_path: Path, database_url: str, **worker_overrides) -> Site:
    orthanc = services.start_orthanc(tmp_path / "orthanc")
    node_port = services.free_port()
    model = {"checkpoint": CHECKPOINT} if CHECKPOINT else {}
    settings = load_settings(
        data_dir=str(tmp_path / "node"), database={"url": database_url},
        dicom={"port": node_port, "destinations": [{"ae_title": orthanc.aet, "host": "127.0.0.1",
                                                     "port": orthanc.dicom_port}]},
        storage={"min_free_bytes": 1024**2},
        completeness={"series_quiet_s": 1.0, "study_quiet_s": 1.5, "hard_limit_s": 600, "sweep_interval_s": 0.2},
        workers={"retry_backoff_s": 1.0, **worker_overrides},
        model=model,
    )
    orthanc.put_modality("omnict", settings.dicom.ae_title, "127.0.0.1", node_port)
    node = NodeProcess(settings, tmp_path / "node.log").start()
    return Site(orthanc, node, settings)


@pytest.fixture
def pg_url(postgres, request) -> str:
    """End to end runs on PostgreSQL, as in production (SQLite is covered by tests/omnict_node/test_node.py)."""
    from db.migrate import upgrade

    url = postgres.create_database(f"e2e_{request.node.name[:40].lower()}")
    upgrade(url)
    return url


@pytest.fixture
def site(tmp_path, pg_url):
    site = make_site(tmp_path, pg_url)
    yield site
    site.node.stop()
    site.orthanc.stop()
