"""The objects the segmentation alone gives — the SEG and the TID 1500 measurement SR — encoded and sent by two side
tasks on the cpu queue while the gpu worker runs the models:

* ``seg_object``: started by the segment stage as soon as its label map is written; encodes the SEG while that
  stage measures the organs.
* ``measurements``: after the segment stage; encodes the measurement SR (it needs the organ measurements) on the SEG
  the first task wrote, and sends both to the destinations while inference runs. Where several cpu worker processes
  run them side by side (prefork), it waits for a ``seg_object`` still running elsewhere (its ``run_stages`` row)
  instead of encoding the same SEG again.

Neither is a stage of the run's state machine (see ``workers.pipeline.SideTask``): the run never waits for them and
cannot fail by them. Whatever they have not done when a later step needs it (still running, failed, their worker
died), that step does itself: :func:`measurement_files` takes what is recorded and intact and encodes the rest. The
price is time, never a missing or a duplicated object: the same run encodes the same bytes, under the same UIDs, so a
second C-STORE replaces.

Records in the run's work folder:

* ``segmentation_object.json``: the SEG file and its segments (label name and value, in Segment Number order), with
  ``segmentation_areas.npy`` (the per-slice label counts, which the measurement SR reuses);
* ``measurement_objects.json``: the SEG and SR files and, per destination, the SOP Instance UIDs delivered there
  (the deliver stage's first attempt does not send those again).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from sqlalchemy import select

from db.models import OrganMeasurement as MeasuredOrgan
from db.models import RunState, StageRecord, utcnow
from db.session import session_scope
from omnict_node.logs import log_event
from workers.celery_app import CPU_QUEUE
from workers.pipeline import SideTask, StageContext, cyclic_gc_paused
from workers.stages.assemble import file_version, replace_atomically, source_series
from workers.stages.objects import (
    ObjectFile,
    as_record,
    label_map_on_source_slices,
    object_files,
    read_record,
    run_identity,
    write_object_files,
    write_record,
)
from workers.stages.segment import LABELS_FILE, load_label_names, load_labels, load_segmentation_algorithm

log = logging.getLogger("omnict.stage.measurements")

SEGMENTATION_RECORD = "segmentation_object.json"
SEGMENTATION_AREAS = "segmentation_areas.npy"
MEASUREMENT_RECORD = "measurement_objects.json"
SEG_OBJECT_TASK = "seg_object"
# A 300-slice SEG encodes in about 1 s; a seg_object attempt silent for this long has lost its worker.
SEG_OBJECT_WAIT_S = 60.0
SEG_OBJECT_POLL_S = 0.05


def segment_labels(context: StageContext) -> list:
    """The SEG's segments (``reports.SegmentLabel``): every label of the run's label map that has a SNOMED CT
    coding, in label value order; a label without one cannot be a segment and is left out of every object."""
    from reports import SegmentLabel
    from reports.coding import has_organ_coding

    return [SegmentLabel(name, value) for value, name in sorted(load_label_names(context).items())
            if has_organ_coding(name)]


def measured_organs(context: StageContext, labels: list) -> list:
    """The segments' organ measurements (``reports.OrganMeasurement``), in segment order; a segment the segment
    stage did not measure is left out."""
    from reports import OrganMeasurement

    with session_scope(context.session_factory) as session:
        measured = {m.organ: m for m in session.scalars(
            select(MeasuredOrgan).where(MeasuredOrgan.run_id == context.run_id))}
    return [OrganMeasurement(label.label_name, label.label_value, m.volume_ml, m.mean_hu, m.std_hu)
            for label in labels if (m := measured.get(label.label_name)) is not None]


def source_label_map(context: StageContext, n_source_slices: int) -> np.ndarray:
    """The run's label map with one plane per source image (read-only, mapped from the segment stage's file)."""
    return label_map_on_source_slices(load_labels(context), context.results["assemble"], n_source_slices)


def _segments(labels: list) -> list[list]:
    return [[label.label_name, label.label_value] for label in labels]


def encode_segmentation(context: StageContext, source, run, labels: list) -> ObjectFile:
    """Encode and write the run's SEG of the segments ``labels`` (:func:`segment_labels`), its per-slice label
    counts, and its record."""
    from reports import build_segmentation

    made_from = _label_map_version(context)  # before reading it: a newer map makes this SEG's record stale
    for name in sorted(set(load_label_names(context).values()) - {label.label_name for label in labels} - {"body"}):
        log_event(log, "pipeline.report.organ_skipped", run_id=context.run_id, organ=name)  # no SNOMED CT coding
    result = build_segmentation(source, source_label_map(context, len(source.datasets)), labels,
                                load_segmentation_algorithm(context), run)
    [seg_file] = write_object_files(context, [("seg", result.dataset)])
    replace_atomically(context.work_dir / SEGMENTATION_AREAS, lambda fh: np.save(fh, result.areas))
    write_record(context, SEGMENTATION_RECORD, {"objects": as_record([seg_file]), "segments": _segments(labels),
                                                "label_map": made_from})
    return seg_file


def _label_map_version(context: StageContext) -> list:
    """Which label map file this is (the segment stage writes a new file, never into the old one: a retried stage
    that segmented differently makes a SEG encoded before it stale)."""
    return list(file_version(context.work_dir / LABELS_FILE))


def segmentation_file(context: StageContext, source, run, labels: list) -> ObjectFile:
    """The run's SEG of the segments ``labels``: the recorded one when it is intact and made of them and of the
    run's current label map, else encoded now."""
    record = read_record(context, SEGMENTATION_RECORD)
    recorded = object_files(record, context.settings.data_dir)
    if (recorded and record.get("label_map") == _label_map_version(context)
            and record.get("segments") == _segments(labels)
            and (context.work_dir / SEGMENTATION_AREAS).is_file()):
        return recorded[0]
    return encode_segmentation(context, source, run, labels)


def _segmentation_as_referenced(context: StageContext, seg_file: ObjectFile, labels: list):
    """The SEG as the measurement SR references it: the header of its file (the SR takes its UIDs and referenced
    series from it, whichever task wrote it), Segment Numbers in ``labels`` order, the recorded per-slice counts."""
    import pydicom

    from reports import SegmentationResult

    header = pydicom.dcmread(context.settings.data_dir / seg_file.path, stop_before_pixels=True)
    return SegmentationResult(header, {label.label_name: n for n, label in enumerate(labels, start=1)},
                              np.load(context.work_dir / SEGMENTATION_AREAS))


def recorded_measurement_files(context: StageContext) -> list[ObjectFile] | None:
    """The SEG and measurement SR the ``measurements`` side task recorded, or None unless all are intact."""
    return object_files(read_record(context, MEASUREMENT_RECORD), context.settings.data_dir)


def measurement_report_file(context: StageContext, source, run, seg_file: ObjectFile, labels: list,
                            organs: list) -> ObjectFile:
    """Encode and write the run's TID 1500 measurement SR of ``organs`` (:func:`measured_organs`) on the SEG in
    ``seg_file`` (of the segments ``labels``)."""
    from reports import build_measurement_report

    report = build_measurement_report(source, _segmentation_as_referenced(context, seg_file, labels), organs,
                                      load_segmentation_algorithm(context), run,
                                      source_label_map(context, len(source.datasets)))
    [report_file] = write_object_files(context, [("measurement_sr", report)])
    return report_file


def measurement_files(context: StageContext, source, run, labels: list, organs: list
                      ) -> tuple[list[ObjectFile], bool]:
    """The run's SEG and TID 1500 measurement SR, and whether they are the ``measurements`` side task's: as recorded
    when intact, else the SEG (:func:`segmentation_file`) and the measurement SR encoded on it now."""
    recorded = recorded_measurement_files(context)
    if recorded is not None:
        return recorded, True
    seg_file = segmentation_file(context, source, run, labels)
    return [seg_file, measurement_report_file(context, source, run, seg_file, labels, organs)], False


def early_deliveries(context: StageContext) -> dict[str, list[str]]:
    """Per destination label, the SOP Instance UIDs the ``measurements`` side task delivered (empty when none)."""
    return dict((read_record(context, MEASUREMENT_RECORD) or {}).get("delivered", {}))


def encode_seg_object(context: StageContext) -> dict:
    with cyclic_gc_paused():
        seg_file = segmentation_file(context, source_series(context), run_identity(context), segment_labels(context))
    return {"size_bytes": seg_file.size_bytes}


def publish_measurements(context: StageContext) -> dict:
    from workers.stages.deliver import run_destinations

    targets = run_destinations(context)
    files = recorded_measurement_files(context)
    unsent, delivered = files, {}
    if files is None:
        with cyclic_gc_paused(), ThreadPoolExecutor(1, thread_name_prefix="send-seg") as sender:
            source, run, labels = source_series(context), run_identity(context), segment_labels(context)
            wait_for_seg_object(context)
            seg_file = segmentation_file(context, source, run, labels)
            # Sending a 300-slice study's SEG (28 MB) takes ~0.4 s, mostly the PACS storing it: it goes while the
            # SR is encoded.
            seg_sent = sender.submit(_send, context, [seg_file], targets)
            report_file = measurement_report_file(context, source, run, seg_file, labels,
                                                  measured_organs(context, labels))
            files, unsent = [seg_file, report_file], [report_file]
            write_record(context, MEASUREMENT_RECORD, {"objects": as_record(files), "delivered": {}})
            delivered = seg_sent.result()
    for label, uids in _send(context, unsent, targets).items():
        delivered[label] = [*delivered.get(label, []), *uids]
    write_record(context, MEASUREMENT_RECORD, {"objects": as_record(files), "delivered": delivered})
    return {"objects": len(files), "destinations": len(delivered)}


def seg_object_running(context: StageContext, started_within_s: float | None = None) -> bool:
    """Whether an attempt of this run's ``seg_object`` task is running (its ``run_stages`` row says so), only
    counting attempts started in the last ``started_within_s`` seconds when given."""
    query = select(StageRecord.id).where(StageRecord.run_id == context.run_id, StageRecord.stage == SEG_OBJECT_TASK,
                                         StageRecord.outcome == "running")
    if started_within_s is not None:
        query = query.where(StageRecord.started_at >= utcnow() - dt.timedelta(seconds=started_within_s))
    with context.session_factory() as session:
        return session.scalar(query.limit(1)) is not None


def wait_for_seg_object(context: StageContext) -> None:
    """Wait while ``seg_object`` runs in another worker process (prefork cpu workers run it beside ``measurements``;
    the embedded worker runs them one after the other), so that the SEG is encoded once, not twice. An attempt
    counts for ``SEG_OBJECT_WAIT_S`` after its start: a worker killed inside the task leaves its row 'running', and
    once that row is older this task encodes the SEG itself (the same bytes) and says so."""
    waited = False
    while seg_object_running(context, SEG_OBJECT_WAIT_S):
        waited = True
        time.sleep(SEG_OBJECT_POLL_S)
    if waited and seg_object_running(context):
        log_event(log, "pipeline.side_task.wait_gave_up", logging.WARNING, run_id=context.run_id,
                  task=SEG_OBJECT_TASK, seconds=SEG_OBJECT_WAIT_S)


def _send(context: StageContext, files: list[ObjectFile], targets: list) -> dict[str, list[str]]:
    """C-STORE ``files`` to each destination; per destination label, the SOP Instance UIDs it holds now. What could
    not go (the destination down, an object refused) is logged and left to the deliver stage, with its retries."""
    from dicom_node.delivery import DeliveryError, deliver_with_settings, destination_label

    delivered: dict[str, list[str]] = {}
    for destination in targets:
        label = destination_label(destination)
        try:
            report = deliver_with_settings([context.settings.data_dir / f.path for f in files], destination,
                                           context.settings.dicom)
        except DeliveryError as exc:
            log_event(log, "pipeline.measurements.delivery_deferred", logging.WARNING, run_id=context.run_id,
                      destination=label, transient=exc.transient)
            continue
        delivered[label] = [r.sop_instance_uid for r in report.delivered]
        if not report.ok:
            log_event(log, "pipeline.measurements.delivery_deferred", logging.WARNING, run_id=context.run_id,
                      destination=label, failed=len(report.failed))
    return delivered


SEGMENTATION_OBJECT = SideTask(
    SEG_OBJECT_TASK, CPU_QUEUE, encode_seg_object,
    # from the moment the segment stage has written its label map until inference ends
    while_states=frozenset({RunState.SEGMENTING, RunState.INFERRING}),
)

MEASUREMENTS = SideTask(
    "measurements", CPU_QUEUE, publish_measurements,
    # after segment and until the report stage starts: later, the main line has encoded the objects itself
    while_states=frozenset({RunState.SEGMENTING, RunState.INFERRING}),
)
