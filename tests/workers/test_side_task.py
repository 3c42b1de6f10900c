"""The side tasks: the SEG encoded by ``seg_object`` while the segment stage measures the organs, the measurement
SR encoded on it and both sent by ``measurements`` while inference runs, then taken by the report stage as they are
and not sent again by the deliver stage. The stages run in this process, one after the other as the workers would
run them, on the real database (SQLite and PostgreSQL) and with a real Orthanc."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from db.models import Delivery, PipelineRun, ResultObject, RunState, StageRecord
from dicom_node.completeness import force_complete
from omnict_core.phantom import PhantomSpec, generate_study, write_dicom_study
from omnict_node.config import DestinationSettings
from tests.dicom_node.test_delivery import orthanc_sop_uids
from tests.dicom_node.test_qr import _register
from workers.pipeline import WorkerResources, execute_side_task, execute_stage, run_work_dir
from workers.stages.measurements import MEASUREMENT_RECORD, MEASUREMENTS, SEGMENTATION_OBJECT, SEGMENTATION_RECORD


@pytest.fixture
def segmented(settings, session_factory, orthanc, tmp_path):
    """A complete phantom study whose run has been assembled and segmented; results go to the test's Orthanc. The
    side tasks the segment stage started are in ``resources.started`` with whether the label files existed then."""
    destination = DestinationSettings(ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port)
    settings = settings.model_copy(update={"dicom": settings.dicom.model_copy(update={"destinations": [destination]})})
    study = generate_study(PhantomSpec(seed=21, slices=32, size=128, findings=["pleural_effusion:side=left"]))
    files = write_dicom_study(study, tmp_path / "study", localizer=False, ground_truth=False).ct_files
    _register(session_factory, settings, files)
    with session_factory.begin() as session:
        run_id = force_complete(session, study.uids["study"])
    resources = WorkerResources(settings, session_factory)
    assert execute_stage(resources, run_id, "assemble") is not None
    started = []
    work_dir = _work_dir(resources, run_id)
    resources.started = started
    assert execute_stage(resources, run_id, "segment", side_task_starter=lambda task: started.append(
        (task.name, (work_dir / "labels.npy").is_file() and (work_dir / "labels.json").is_file()))) is not None
    return resources, run_id


def _work_dir(resources: WorkerResources, run_id: int) -> Path:
    with resources.session_factory() as session:
        run = session.get(PipelineRun, run_id)
        return run_work_dir(resources.settings, run.study.study_instance_uid, run.run_number)


def _early_record(resources: WorkerResources, run_id: int) -> dict:
    return json.loads((_work_dir(resources, run_id) / MEASUREMENT_RECORD).read_text())


def _result_rows(resources: WorkerResources, run_id: int) -> dict[str, ResultObject]:
    with resources.session_factory() as session:
        return {o.kind: o for o in session.scalars(select(ResultObject).where(ResultObject.run_id == run_id))}


def _finish_run(resources: WorkerResources, run_id: int) -> None:
    for stage in ("infer", "report", "deliver"):
        execute_stage(resources, run_id, stage)
    with resources.session_factory() as session:
        run = session.get(PipelineRun, run_id)
        assert run.state == RunState.DELIVERED, run.error


def test_side_task_objects_are_taken_by_report_and_not_sent_again(segmented, orthanc, monkeypatch):
    import dicom_node.delivery

    resources, run_id = segmented
    execute_side_task(resources, run_id, MEASUREMENTS)
    record = _early_record(resources, run_id)
    early = {o["kind"]: o for o in record["objects"]}
    assert set(early) == {"seg", "measurement_sr"}
    [(destination, delivered)] = record["delivered"].items()
    assert sorted(delivered) == sorted(o["sop_instance_uid"] for o in early.values())
    assert sorted(orthanc_sop_uids(orthanc)) == sorted(delivered)  # in the PACS before inference has even run
    seg_file = resources.settings.data_dir / early["seg"]["path"]
    written = seg_file.stat()

    sent_later: list[str] = []  # the files the deliver stage sends
    send = dicom_node.delivery.deliver_with_settings
    monkeypatch.setattr(dicom_node.delivery, "deliver_with_settings",
                        lambda files, *args, **kwargs: (sent_later.extend(p.name for p in files),
                                                        send(files, *args, **kwargs))[1])
    _finish_run(resources, run_id)
    rows = _result_rows(resources, run_id)
    assert set(rows) == {"seg", "measurement_sr", "findings_sr", "narrative_sr", "kos"}
    assert sorted(sent_later) == sorted(Path(rows[k].path).name for k in ("findings_sr", "narrative_sr", "kos"))
    for kind in ("seg", "measurement_sr"):
        assert (rows[kind].sop_instance_uid, rows[kind].path) == (early[kind]["sop_instance_uid"], early[kind]["path"])
    after = seg_file.stat()
    assert (after.st_ino, after.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)  # taken, not encoded again
    uids = orthanc_sop_uids(orthanc)
    assert sorted(uids) == sorted(o.sop_instance_uid for o in rows.values())  # each object once
    with resources.session_factory() as session:
        [delivery] = session.scalars(select(Delivery).where(Delivery.run_id == run_id)).all()
        side = session.scalars(select(StageRecord).where(StageRecord.run_id == run_id,
                                                         StageRecord.stage == "measurements")).all()
    assert delivery.destination == destination and delivery.state == "delivered"
    assert sorted(delivery.sop_instance_uids) == sorted(uids)
    assert [(s.outcome, s.attempt) for s in side] == [("ok", 1)]

    execute_side_task(resources, run_id, MEASUREMENTS)  # a late or redelivered side task: the run is past it
    with resources.session_factory() as session:
        assert session.query(StageRecord).filter_by(run_id=run_id, stage="measurements").count() == 1


def test_report_encodes_the_measurement_objects_itself_when_the_side_tasks_files_are_incomplete(segmented, orthanc):
    resources, run_id = segmented
    execute_side_task(resources, run_id, MEASUREMENTS)
    early = {o["kind"]: o for o in _early_record(resources, run_id)["objects"]}
    seg_file = resources.settings.data_dir / early["seg"]["path"]
    side_task_bytes = seg_file.read_bytes()
    seg_file.unlink()  # as if the side task had died while writing

    _finish_run(resources, run_id)
    rows = _result_rows(resources, run_id)
    assert rows["seg"].sop_instance_uid == early["seg"]["sop_instance_uid"]
    assert seg_file.read_bytes() == side_task_bytes  # the same run encodes the same object, byte for byte
    assert sorted(orthanc_sop_uids(orthanc)) == sorted(o.sop_instance_uid for o in rows.values())


def test_segmentation_side_task_starts_with_the_label_map_and_its_seg_is_taken_as_it_is(segmented, orthanc):
    resources, run_id = segmented
    assert resources.started == [("seg_object", True)]  # started from inside the stage, its inputs written
    with resources.session_factory() as session:  # the organs were measured after it was started
        assert session.get(PipelineRun, run_id).state == RunState.SEGMENTING
    execute_side_task(resources, run_id, SEGMENTATION_OBJECT)
    work_dir = _work_dir(resources, run_id)
    [seg] = json.loads((work_dir / SEGMENTATION_RECORD).read_text())["objects"]
    seg_file = resources.settings.data_dir / seg["path"]
    written = seg_file.stat()
    assert orthanc_sop_uids(orthanc) == []  # encoded only: sending waits for the segment stage to end

    execute_side_task(resources, run_id, MEASUREMENTS)
    early = {o["kind"]: o for o in _early_record(resources, run_id)["objects"]}
    assert early["seg"] == seg
    after = seg_file.stat()
    assert (after.st_ino, after.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)  # not encoded twice
    sr_file = resources.settings.data_dir / early["measurement_sr"]["path"]
    sr_bytes, seg_bytes = sr_file.read_bytes(), seg_file.read_bytes()
    _finish_run(resources, run_id)
    assert sorted(orthanc_sop_uids(orthanc)) == sorted(o.sop_instance_uid for o in _result_rows(resources, run_id).values())

    # Without any record (every side task lost), the measurement objects come out the same, byte for byte.
    for name in (SEGMENTATION_RECORD, MEASUREMENT_RECORD):
        (work_dir / name).unlink()
    with resources.session_factory.begin() as session:  # as an operator's rerun of the report stage would find it
        session.get(PipelineRun, run_id).state = RunState.INFERRING
    seg_file.unlink()
    sr_file.unlink()
    assert execute_stage(resources, run_id, "report") is not None
    assert (seg_file.read_bytes(), sr_file.read_bytes()) == (seg_bytes, sr_bytes)


def test_a_seg_encoded_from_an_earlier_label_map_is_encoded_again(segmented):
    import numpy as np

    resources, run_id = segmented
    execute_side_task(resources, run_id, SEGMENTATION_OBJECT)
    work_dir = _work_dir(resources, run_id)
    [seg] = json.loads((work_dir / SEGMENTATION_RECORD).read_text())["objects"]
    seg_file = resources.settings.data_dir / seg["path"]
    first = seg_file.stat()
    labels = np.load(work_dir / "labels.npy")  # a retried segment stage writes its label map again
    with open(work_dir / "labels.npy.new", "wb") as fh:
        np.save(fh, labels)
    (work_dir / "labels.npy.new").replace(work_dir / "labels.npy")

    execute_side_task(resources, run_id, MEASUREMENTS)
    again = seg_file.stat()
    assert (again.st_ino, again.st_mtime_ns) != (first.st_ino, first.st_mtime_ns)
    assert json.loads((work_dir / SEGMENTATION_RECORD).read_text())["objects"] == [seg]  # the same object, anew


def test_measurements_waits_for_a_seg_object_running_in_another_worker(segmented, monkeypatch, caplog):
    """Prefork cpu workers may run ``measurements`` while ``seg_object`` still encodes in another process: it waits
    for that SEG instead of encoding it a second time; a 'running' row whose worker died is waited for only so long."""
    import logging
    import threading

    from workers.stages import measurements

    resources, run_id = segmented
    encodes, waiting = [], threading.Event()
    encode = measurements.encode_segmentation
    monkeypatch.setattr(measurements, "encode_segmentation", lambda *a: encodes.append(1) or encode(*a))
    running = measurements.seg_object_running

    def observed(context, started_within_s=None):
        busy = running(context, started_within_s)
        if busy:
            waiting.set()
        return busy

    monkeypatch.setattr(measurements, "seg_object_running", observed)
    with resources.session_factory.begin() as session:  # another process's attempt, its row 'running'
        other = StageRecord(run_id=run_id, stage="seg_object", attempt=1, worker="elsewhere:1")
        session.add(other)
    thread = threading.Thread(target=execute_side_task, args=(resources, run_id, MEASUREMENTS))
    thread.start()
    assert waiting.wait(120)  # measurements found seg_object running and waits
    execute_side_task(resources, run_id, SEGMENTATION_OBJECT)  # that attempt's work (here, in this process)
    with resources.session_factory.begin() as session:
        session.get(StageRecord, other.id).outcome = "ok"
    thread.join(120)
    assert not thread.is_alive() and len(encodes) == 1  # the SEG was encoded once, by seg_object
    work_dir = _work_dir(resources, run_id)
    [seg] = json.loads((work_dir / SEGMENTATION_RECORD).read_text())["objects"]
    assert {o["kind"]: o for o in _early_record(resources, run_id)["objects"]}["seg"] == seg

    # a seg_object whose worker died: its row stays 'running'; the wait gives up and the SEG is encoded here
    (work_dir / SEGMENTATION_RECORD).unlink()
    (work_dir / MEASUREMENT_RECORD).unlink()
    with resources.session_factory.begin() as session:
        session.add(StageRecord(run_id=run_id, stage="seg_object", attempt=3, worker="died:2"))
    monkeypatch.setattr(measurements, "SEG_OBJECT_WAIT_S", 0.3)
    with caplog.at_level(logging.WARNING, logger="omnict.stage.measurements"):
        execute_side_task(resources, run_id, MEASUREMENTS)
    assert len(encodes) == 2 and (work_dir / MEASUREMENT_RECORD).is_file()
    assert "pipeline.side_task.wait_gave_up" in caplog.text
