"""The whole node as a real process, with real peers: dcmtk storescu, Orthanc, a Celery worker process,
PostgreSQL and Redis. Faults: the node killed (-9) inside a study's quiet period."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from db.models import Instance, PipelineRun, RunState, StageRecord
from db.session import session_scope
from omnict_node.config import load_settings
from tests import services
from tests.dicom_factory import TEST_PATIENT_ID, TEST_PATIENT_NAME, write_ct_series
from tests.node_process import NodeProcess
from tests.realdata import fixed_totalseg_series

pytestmark = pytest.mark.slow


def storescu(settings, folder: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["storescu", *options, "-aet", "TESTSCU", "-aec", settings.dicom.ae_title, "+sd", "+r", "127.0.0.1",
         str(settings.dicom.port), str(folder)],
        capture_output=True, text=True, timeout=120, env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
    )


def assembled(runs: list[PipelineRun]) -> bool:
    return bool(runs[-1].result and "assemble" in runs[-1].result) or runs[-1].state == RunState.FAILED


def stage_attempts(node: NodeProcess, run_id: int, stage: str) -> int:
    with session_scope(node.session_factory) as session:
        return session.scalar(select(func.count(StageRecord.id)).where(StageRecord.run_id == run_id,
                                                                        StageRecord.stage == stage))


@pytest.fixture
def node(settings, tmp_path):
    process = NodeProcess(settings, tmp_path / "node.log").start()
    yield process
    process.stop()


def test_study_sent_by_storescu_completes_once_and_is_assembled(node, settings, tmp_path):
    paths = write_ct_series(tmp_path / "in", n_slices=12, size=32)
    write_ct_series(tmp_path / "in" / "scout", n_slices=1, size=32,
                    study_uid=pydicom.dcmread(paths[0]).StudyInstanceUID, image_type="ORIGINAL\\PRIMARY\\LOCALIZER",
                    series_number=1)
    study_uid = pydicom.dcmread(paths[0]).StudyInstanceUID
    result = storescu(settings, tmp_path / "in")
    assert result.returncode == 0, result.stderr

    runs = node.wait_for_run(study_uid, assembled)
    assert len(runs) == 1
    run = runs[0]
    assert run.error is None, run.error
    assert run.completion_reason == "quiet"
    volume = run.result["assemble"]
    assert volume["shape_zyx"] == [12, 32, 32]
    assert volume["series_instance_uid"] == pydicom.dcmread(paths[0]).SeriesInstanceUID
    assert len(volume["rejected_series"]) == 1  # the localizer
    assert stage_attempts(node, run.id, "assemble") == 1
    # patient data never reaches the log
    text = node.log_text()
    assert TEST_PATIENT_NAME not in text and TEST_PATIENT_ID not in text and "19700101" not in text


def test_node_killed_inside_quiet_period_completes_the_study_once_after_restart(tmp_path, database_url):
    settings = load_settings(
        data_dir=str(tmp_path / "data"), database={"url": database_url}, dicom={"port": services.free_port()},
        storage={"min_free_bytes": 1024**2},
        completeness={"series_quiet_s": 2.0, "study_quiet_s": 3.0, "hard_limit_s": 600, "sweep_interval_s": 0.1},
    )
    paths = write_ct_series(tmp_path / "in", n_slices=6, size=32)
    study_uid = pydicom.dcmread(paths[0]).StudyInstanceUID
    node = NodeProcess(settings, tmp_path / "node.log").start()
    try:
        assert storescu(settings, tmp_path / "in").returncode == 0
        node.kill()  # kill -9 inside the quiet period (3 s)
        runs = node.runs(study_uid)
        assert [(r.run_number, r.state) for r in runs] == [(1, RunState.RECEIVING)]
        time.sleep(1.0)
        node.start()
        runs = node.wait_for_run(study_uid, assembled)
        time.sleep(1.5)  # several more sweeps: nothing completes or runs twice
        runs = node.runs(study_uid)
        assert len(runs) == 1 and runs[0].completed_at is not None
        assert stage_attempts(node, runs[0].id, "assemble") == 1
        with session_scope(node.session_factory) as session:
            assert session.scalar(select(func.count(Instance.id))) == 6
    finally:
        node.stop()


def test_late_instance_after_processing_opens_a_second_run(node, settings, tmp_path):
    paths = write_ct_series(tmp_path / "first", n_slices=5, size=32)
    first = pydicom.dcmread(paths[0])
    assert storescu(settings, tmp_path / "first").returncode == 0
    node.wait_for_run(first.StudyInstanceUID, assembled)
    write_ct_series(tmp_path / "late", n_slices=1, size=32, study_uid=first.StudyInstanceUID,
                    series_uid=first.SeriesInstanceUID, z0=-100.0 + 5 * 2.5)
    assert storescu(settings, tmp_path / "late").returncode == 0
    runs = node.wait_for_run(first.StudyInstanceUID, lambda rs: len(rs) == 2 and assembled(rs))
    assert runs[1].trigger == "late_instance"
    assert runs[1].result["assemble"]["shape_zyx"][0] == 6  # the late slice is part of the new run's volume


def test_orthanc_sends_a_study_to_the_node(node, settings, tmp_path):
    orthanc = services.start_orthanc(tmp_path / "orthanc")
    try:
        paths = write_ct_series(tmp_path / "in", n_slices=8, size=32)
        study_uid = pydicom.dcmread(paths[0]).StudyInstanceUID
        for path in paths:
            orthanc.upload(path)
        orthanc.put_modality("omnict", settings.dicom.ae_title, "127.0.0.1", settings.dicom.port)
        orthanc_study = orthanc.post_json("/tools/lookup", study_uid.encode())[0]["ID"]
        job = orthanc.post_json("/modalities/omnict/store", {"Resources": [orthanc_study], "Synchronous": True})
        assert job["InstancesCount"] == 8 and job["FailedInstancesCount"] == 0
        runs = node.wait_for_run(study_uid, assembled)
        assert runs[0].result["assemble"]["shape_zyx"] == [8, 32, 32]
    finally:
        orthanc.stop()


def test_real_jpeg2000_ct_series_is_received_and_assembled(node, settings, tmp_path):
    paths = fixed_totalseg_series(tmp_path / "real")
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    study_uid = pydicom.dcmread(paths[0]).StudyInstanceUID
    result = storescu(settings, tmp_path / "real", "-xv")  # propose JPEG 2000 lossless: sent as stored
    assert result.returncode == 0, result.stderr
    runs = node.wait_for_run(study_uid, assembled, timeout=180)
    assert runs[0].error is None, runs[0].error
    volume = runs[0].result["assemble"]
    assert volume["shape_zyx"] == [20, 512, 512]
    assert volume["spacing_zyx_mm"][0] == pytest.approx(2.0, abs=0.01)  # from positions, not SliceThickness (3)
    stored = list(Path(settings.storage.root).rglob("*.dcm"))
    assert len(stored) == 20
    assert {pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID for p in stored} == {
        "1.2.840.10008.1.2.4.90"}  # stored as received, never decompressed


def test_production_mode_with_redis_broker_and_postgresql(tmp_path, postgres, redis_url):
    url = postgres.create_database("omnict_prod_mode")
    from db.migrate import upgrade

    upgrade(url)
    settings = load_settings(
        data_dir=str(tmp_path / "data"), database={"url": url}, dicom={"port": services.free_port()},
        storage={"min_free_bytes": 1024**2}, workers={"broker_url": redis_url},
        completeness={"series_quiet_s": 0.5, "study_quiet_s": 1.0, "hard_limit_s": 600, "sweep_interval_s": 0.1},
    )
    import redis

    broker = redis.Redis.from_url(redis_url)
    paths = write_ct_series(tmp_path / "in", n_slices=4, size=32)
    node = NodeProcess(settings, tmp_path / "node.log").start()
    try:
        assert storescu(settings, tmp_path / "in").returncode == 0
        runs = node.wait_for_run(pydicom.dcmread(paths[0]).StudyInstanceUID, assembled)
        assert runs[0].result["assemble"]["shape_zyx"] == [4, 32, 32]
        # the task went through Redis: the cpu queue key was created by the dispatch and the worker consumed it
        assert broker.info("stats")["total_commands_processed"] > 0
        assert broker.llen("cpu") == 0
    finally:
        node.stop()
