"""From the PACS and back: a phantom study with known findings goes Orthanc → node → pipeline → Orthanc, and the
results are readable with the tools radiology IT uses (Orthanc REST/DICOMweb, dcmtk). Faults: a worker killed
during inference, the PACS down during delivery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from db.models import (Delivery, Finding, OrganMeasurement, PipelineRun, ResultObject, RunState, StageRecord,
                       Study)
from db.session import session_scope
from omnict_core.phantom import PhantomSpec, generate_study, write_dicom_study
from tests.e2e.conftest import make_site
from workers.stages.infer import REPORT_QUESTION_ID

pytestmark = pytest.mark.slow

RESULT_MODALITIES = {"SR", "SEG", "KO"}


def phantom_files(tmp_path: Path, seed: int, findings: list[str], slices: int = 48, size: int = 160):
    study = generate_study(PhantomSpec(seed=seed, slices=slices, size=size, findings=findings))
    paths = write_dicom_study(study, tmp_path / f"phantom-{seed}")
    return study, [*paths.ct_files, *paths.localizer_files]


def delivered(runs) -> bool:
    return runs[-1].state in (RunState.DELIVERED, RunState.FAILED, RunState.DELIVERY_FAILED)


def orthanc_result_series(orthanc, orthanc_study_id: str) -> dict[str, list[str]]:
    """Modality -> instance ids of the result series Orthanc holds for the study."""
    found: dict[str, list[str]] = {}
    for series in orthanc.get_json(f"/studies/{orthanc_study_id}/series"):
        modality = series["MainDicomTags"].get("Modality")
        if modality in RESULT_MODALITIES:
            found.setdefault(modality, []).extend(series["Instances"])
    return found


def dcmtk(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={"PATH": "/usr/bin:/bin", "TCP_NODELAY": "1"})


def test_phantom_study_from_orthanc_comes_back_as_sr_seg_kos(site, tmp_path):
    study, files = phantom_files(tmp_path, seed=11, findings=["pleural_effusion:side=right,amount=large"])
    study_uid = study.uids["study"]
    orthanc_id = site.send_study_from_pacs(files)
    runs = site.node.wait_for_run(study_uid, delivered, timeout=300)
    run = runs[-1]
    assert run.state == RunState.DELIVERED, run.error

    # In Orthanc, in the SAME study, in new series: SEG, SRs (measurements, findings, narrative) and a KOS.
    results = orthanc_result_series(site.orthanc, orthanc_id)
    assert set(results) == RESULT_MODALITIES
    assert len(results["SR"]) == 3 and len(results["SEG"]) == 1 and len(results["KO"]) == 1

    # DICOMweb (what web viewers use) lists the same series.
    with urllib.request.urlopen(f"{site.orthanc.url}/dicom-web/studies/{study_uid}/series") as response:
        qido = json.loads(response.read())
    modalities = sorted(item["00080060"]["Value"][0] for item in qido)
    assert modalities.count("SR") == 3 and "SEG" in modalities and "KO" in modalities

    # The findings SR carries the question about the phantom's finding, the model's answer to it and its code.
    # (Whether that answer is right is the model's accuracy, measured by `omnict-node eval`, not asserted here.)
    with session_scope(site.node.session_factory) as session:
        findings = {f.question_id: f for f in session.scalars(select(Finding).where(Finding.run_id == run.id))}
        objects = session.scalars(select(ResultObject).where(ResultObject.run_id == run.id)).all()
        side_tasks = {r.stage: r.outcome for r in session.scalars(select(StageRecord).where(
            StageRecord.run_id == run.id, StageRecord.stage.in_(("seg_object", "measurements"))))}
    # the SEG and the measurement SR came from the side tasks the segment stage dispatched through Celery
    assert side_tasks == {"seg_object": "ok", "measurements": "ok"}
    effusion = findings["pleural_effusion_right"]
    # protocol questions are ranked by default (model.closed_answers): every answer is Yes or No, and coded as such
    asked = [f for question_id, f in findings.items() if question_id != REPORT_QUESTION_ID]
    assert asked and all(f.answer in ("Yes", "No") and f.positive == (f.answer == "Yes") for f in asked)
    assert effusion.code_value == "60046008" and effusion.organ == "lung_right"
    findings_sr = next(o for o in objects if o.kind == "findings_sr")
    sr_file = tmp_path / "findings.dcm"
    sr_file.write_bytes(urllib.request.urlopen(
        f"{site.orthanc.url}/instances/{_orthanc_instance(site.orthanc, findings_sr.sop_instance_uid)}/file").read())
    dump = dcmtk("dsrdump", "+Pl", str(sr_file))  # +Pl: long text values in full
    assert dump.returncode == 0, dump.stderr
    assert "Is there a pleural effusion in the right hemithorax?" in dump.stdout
    assert effusion.answer in dump.stdout  # the model's answer, verbatim
    assert "Pleural effusion" in dump.stdout  # the coded finding
    html = dcmtk("dsr2html", str(sr_file), str(tmp_path / "findings.html"))
    assert html.returncode == 0, html.stderr
    assert "pleural effusion" in (tmp_path / "findings.html").read_text(errors="replace")

    # The query API answers for the processed study with the same findings, measurements and worklist urgency.
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import ApiAuthSettings

    auth = ApiAuthSettings(tokens=[{"name": "reader", "role": "read", "token": "e2e-read-token"}])
    with TestClient(create_app(site.settings, auth=auth)) as client:
        assert client.get(f"/studies/{study_uid}/findings").status_code == 401
        response = client.get(f"/studies/{study_uid}/findings", headers={"Authorization": "Bearer e2e-read-token"})
        worklist = client.get("/worklist", headers={"Authorization": "Bearer e2e-read-token"}).json()
    assert response.status_code == 200
    body = response.json()
    by_id = {f["question_id"]: f for f in body["findings"]}
    assert by_id["pleural_effusion_right"]["answer"] == effusion.answer
    assert {m["organ"] for m in body["measurements"]} >= {"liver", "lung_left", "lung_right"}
    assert study_uid in json.dumps(worklist)

    # A viewer can also fetch the generated objects from the node itself.
    port = str(site.settings.dicom.port)
    found = dcmtk("findscu", "-S", "-aec", "OMNICT", "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study_uid}",
                  "-k", "Modality", "-k", "SeriesInstanceUID", "127.0.0.1", port)
    assert found.returncode == 0, found.stderr
    assert "SEG" in found.stderr + found.stdout and "KO" in found.stderr + found.stdout
    got_dir = tmp_path / "got"
    got_dir.mkdir()
    got = dcmtk("getscu", "-S", "-aec", "OMNICT", "-od", str(got_dir), "-k", "QueryRetrieveLevel=SERIES",
                "-k", f"StudyInstanceUID={study_uid}", "-k", f"SeriesInstanceUID={findings_sr.series_instance_uid}",
                "127.0.0.1", port)
    assert got.returncode == 0, got.stderr
    assert [pydicom.dcmread(p).SOPInstanceUID for p in got_dir.iterdir()] == [findings_sr.sop_instance_uid]


def _orthanc_instance(orthanc, sop_instance_uid: str) -> str:
    return orthanc.post_json("/tools/lookup", sop_instance_uid.encode())[0]["ID"]


def _worker_pids(node_pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-f", "-P", str(node_pid), "omnict_node worker"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _stage_running(node, study_uid: str, stage: str) -> bool:
    with session_scope(node.session_factory) as session:
        return session.scalar(select(StageRecord.id).join(PipelineRun).join(Study).where(
            Study.study_instance_uid == study_uid, StageRecord.stage == stage,
            StageRecord.outcome == "running").limit(1)) is not None


def _kill_workers_inside_stage(node, study_uid: str, stage: str, timeout: float = 300.0) -> None:
    """kill -9 the embedded workers while `stage` of the study's run is in flight.

    Inference takes about a second, so the stage row is polled every 10 ms rather than the run state every 200 ms.
    The workers are frozen (SIGSTOP) before the row is read again: a stage still `running` then cannot finish."""
    deadline = time.monotonic() + timeout
    while not _stage_running(node, study_uid, stage):
        assert time.monotonic() < deadline, f"stage {stage} never started:\n{node.log_text()[-4000:]}"
        time.sleep(0.01)
    workers = _worker_pids(node.process.pid)
    assert workers, "the embedded worker process was not found"
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    assert _stage_running(node, study_uid, stage), f"stage {stage} finished before the workers stopped"
    for pid in workers:
        os.kill(pid, signal.SIGKILL)


def test_worker_killed_during_inference_completes_once_with_one_set_of_results(tmp_path, pg_url):
    site = make_site(tmp_path, pg_url, stall_timeout_s=20.0)
    try:
        study, files = phantom_files(tmp_path, seed=12, findings=["lung_nodule:size_mm=15"])
        orthanc_id = site.send_study_from_pacs(files)
        _kill_workers_inside_stage(site.node, study.uids["study"], "infer")
        runs = site.node.wait_for_run(study.uids["study"], delivered, timeout=300)
        assert len(runs) == 1 and runs[0].state == RunState.DELIVERED, runs[0].error
        with session_scope(site.node.session_factory) as session:
            infer_attempts = session.scalars(select(StageRecord.outcome).where(
                StageRecord.run_id == runs[0].id, StageRecord.stage == "infer")).all()
        assert len(infer_attempts) >= 2 and infer_attempts[-1] == "ok"  # the killed attempt, then the re-run
        results = orthanc_result_series(site.orthanc, orthanc_id)
        assert {m: len(v) for m, v in results.items()} == {"SR": 3, "SEG": 1, "KO": 1}  # exactly one set
        assert "pipeline.stage.stalled" in site.node.log_text()
    finally:
        site.node.stop()
        site.orthanc.stop()


def test_pacs_down_during_delivery_results_arrive_when_it_is_back(tmp_path, pg_url):
    site = make_site(tmp_path, pg_url, task_max_retries=8)
    try:
        study, files = phantom_files(tmp_path, seed=13, findings=[])
        orthanc_id = site.send_study_from_pacs(files)
        # The PACS goes down before any result is sent: now, inside the study's quiet period (the SEG and the
        # measurement SR go out while inference runs, the rest right after it; a down PACS defers the former to the
        # deliver stage).
        site.orthanc.stop()
        assert not delivered(site.node.runs(study.uids["study"]))

        def failed_once() -> bool:
            runs = site.node.runs(study.uids["study"])
            assert runs[-1].state != RunState.FAILED, runs[-1].error  # fail fast: no delivery will ever happen
            with session_scope(site.node.session_factory) as session:
                rows = session.scalars(select(Delivery)).all()
            return bool(rows) and rows[0].attempts >= 1 and rows[0].state == "pending"

        deadline = time.monotonic() + 300
        while not failed_once():
            assert time.monotonic() < deadline, site.node.log_text()[-3000:]
            time.sleep(0.3)
        site.orthanc.start()
        runs = site.node.wait_for_run(study.uids["study"], delivered, timeout=300)
        assert runs[-1].state == RunState.DELIVERED, runs[-1].error
        with session_scope(site.node.session_factory) as session:
            delivery = session.scalars(select(Delivery)).one()
        assert delivery.state == "delivered" and delivery.attempts >= 2
        results = orthanc_result_series(site.orthanc, orthanc_id)
        assert {m: len(v) for m, v in results.items()} == {"SR": 3, "SEG": 1, "KO": 1}
    finally:
        site.node.stop()
        site.orthanc.stop()


def test_real_ct_series_goes_through_the_whole_pipeline_with_valid_objects(site, tmp_path):
    """The real 20-slice JPEG 2000 CT of the TotalSegmentator sdist: valid SR, SEG and KOS end up in Orthanc."""
    from tests.realdata import fixed_totalseg_series

    files = fixed_totalseg_series(tmp_path / "real")
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    orthanc_id = site.send_study_from_pacs(files)
    runs = site.node.wait_for_run(study_uid, delivered, timeout=300)
    assert runs[-1].state == RunState.DELIVERED, runs[-1].error
    results = orthanc_result_series(site.orthanc, orthanc_id)
    assert {m: len(v) for m, v in results.items()} == {"SR": 3, "SEG": 1, "KO": 1}
    for modality, instance_ids in results.items():
        for instance_id in instance_ids:
            path = tmp_path / f"{modality}-{instance_id}.dcm"
            path.write_bytes(urllib.request.urlopen(f"{site.orthanc.url}/instances/{instance_id}/file").read())
            check = dcmtk("dciodvfy", str(path))
            errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
            assert errors == [], f"{modality}: {errors}"
            if modality == "SR":
                assert dcmtk("dsrdump", str(path)).returncode == 0
    # the measurement SR carries organs the classical backend finds on real CT (liver and spleen on this series)
    with session_scope(site.node.session_factory) as session:
        organs = set(session.scalars(select(OrganMeasurement.organ).where(OrganMeasurement.run_id == runs[-1].id)))
    assert {"liver", "spleen"} <= organs
