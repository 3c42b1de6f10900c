"""Stage 4, report (cpu queue): encode the run's results as DICOM and put the study on the worklist.

Objects: SEG of the organ masks and TID 1500 measurement SR (``reports.build_measurement_objects``), findings SR,
narrative SR and a Key Object Selection of the key images (``reports.build_reading_objects``) — all in the source
study, UIDs derived from the run, so encoding the same run again (a retried stage, a re-delivery) produces the same
UIDs and replaces rather than duplicates. Files land in ``<data_dir>/results/<study>/run-<n>/``; ``result_objects``
rows are replaced as a whole.

The SEG and the measurement SR need no model answer: the ``measurements`` side task (workers/stages/measurements.py)
encodes them while inference runs. When its files are all there, this stage takes them as they are (they are what
it would write); otherwise it encodes them itself.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pydicom.sr.coding import Code
from sqlalchemy import delete, select

from db.models import Finding, OrganMeasurement, PipelineRun, ResultObject
from db.session import session_scope
from omnict_node.logs import log_event
from workers.pipeline import StageContext, cyclic_gc_paused
from workers.stages.assemble import replace_atomically, study_files_by_series
from workers.stages.segment import load_label_names, load_labels

log = logging.getLogger("omnict.stage.report")


# Written by the measurements side task: the SEG and measurement SR files it encoded, and where it delivered them.
EARLY_OBJECTS_FILE = "measurement_objects.json"


def results_dir(context: StageContext) -> Path:
    return context.settings.data_dir / "results" / context.study_instance_uid / f"run-{context.run_number}"


@dataclass(frozen=True)
class ObjectFile:
    """One encoded result object on disk: what its ``result_objects`` row records."""

    kind: str  # seg, measurement_sr, findings_sr, narrative_sr, kos
    path: str  # relative to the data directory
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    size_bytes: int


def _write_object_files(context: StageContext, objects) -> list[ObjectFile]:
    """Write a ``reports`` object group (its ``named()`` datasets) into the run's results folder."""
    from reports import write_objects

    named = objects.named()
    paths = write_objects([dataset for _, dataset in named], results_dir(context))
    return [ObjectFile(kind, str(path.relative_to(context.settings.data_dir)), str(ds.SOPClassUID),
                       str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID),
                       path.stat().st_size)
            for (kind, ds), path in zip(named, paths, strict=True)]


def label_map_on_source_slices(label_map: np.ndarray, assembled: dict, n_source_slices: int) -> np.ndarray:
    """The label map with one plane per source image. The assembled volume has one plane per source slice unless
    gaps were filled by resampling; then each source slice takes the nearest volume plane."""
    if label_map.shape[0] == n_source_slices:
        return label_map
    spacing_z = assembled["spacing_zyx_mm"][0]
    positions = np.asarray(assembled.get("source_positions_mm") or [], dtype=float)
    if positions.size != n_source_slices:
        raise ValueError(f"cannot align a {label_map.shape[0]}-plane label map with {n_source_slices} source slices")
    planes = np.clip(np.rint((positions - positions[0]) / spacing_z).astype(int), 0, label_map.shape[0] - 1)
    return label_map[planes]


def _answers(context: StageContext, session) -> list:
    from reports.inputs import VqaAnswer

    answers = []
    for finding in session.scalars(select(Finding).where(Finding.run_id == context.run_id).order_by(Finding.id)):
        code = Code(finding.code_value, finding.code_scheme, finding.code_meaning) if finding.code_value else None
        answers.append(VqaAnswer(
            question=finding.question,
            answer=finding.answer,
            coded_answer=None if finding.positive is None else _presence(finding.positive),
            finding=code,
            finding_site=_coded_organ_or_none(finding.organ),
            key_images=tuple(finding.key_sop_instance_uids or ()),
            urgency="emergency" if finding.critical and finding.positive else
                    ("urgent" if finding.positive and finding.urgency_weight > 0 else "routine"),
        ))
    return answers


def _presence(positive: bool):
    from reports.coding import ABSENT, PRESENT

    return PRESENT if positive else ABSENT


def _coded_organ_or_none(organ: str | None) -> str | None:
    from reports.coding import organ_coding

    if not organ:
        return None
    try:
        organ_coding(organ)
    except KeyError:
        return None
    return organ


def _organs(context: StageContext, session, labels: dict[int, str]) -> list:
    from reports.coding import organ_coding
    from reports.inputs import OrganMeasurement as ReportedOrgan

    measured = {m.organ: m for m in session.scalars(select(OrganMeasurement).where(OrganMeasurement.run_id == context.run_id))}
    organs = []
    for value, name in sorted(labels.items()):
        if name not in measured:
            continue
        try:
            organ_coding(name)
        except KeyError:  # a label without a SNOMED CT coding cannot be encoded as a SEG segment
            log_event(log, "pipeline.report.organ_skipped", run_id=context.run_id, organ=name)
            continue
        m = measured[name]
        organs.append(ReportedOrgan(name, value, m.volume_ml, m.mean_hu, m.std_hu))
    return organs


def report(context: StageContext) -> dict:
    from api.worklist import refresh_worklist_item
    from reports import build_reading_objects

    with cyclic_gc_paused():
        source, organs, run = measurement_inputs(context)
        with session_scope(context.session_factory) as session:
            answers = _answers(context, session)
        measured = early_measurement_files(context)
        reused = measured is not None
        if measured is None:
            measured = encode_measurement_files(context, source, organs, run)
        reading = build_reading_objects(source, organs, answers, model_algorithm(context.results.get("infer", {})),
                                        run)
        files = measured + _write_object_files(context, reading)
    _remove_other_objects(results_dir(context), files)
    with session_scope(context.session_factory) as session:
        session.execute(delete(ResultObject).where(ResultObject.run_id == context.run_id))
        for f in files:
            session.add(ResultObject(
                run_id=context.run_id, kind=f.kind, sop_class_uid=f.sop_class_uid, sop_instance_uid=f.sop_instance_uid,
                series_instance_uid=f.series_instance_uid, study_instance_uid=f.study_instance_uid, path=f.path,
                size_bytes=f.size_bytes))
        session.flush()
        refresh_worklist_item(session, context.run_id, rules=context.settings.api.worklist)
    log_event(log, "pipeline.report.done", run_id=context.run_id, objects=len(files), measurements_reused=reused)
    return {"objects": [f.path for f in files], "narrative": reading.narrative_text}


def model_algorithm(inference: dict):
    """Algorithm Identification of the findings, narrative and KOS: the OmniCT checkpoint and question protocol."""
    from reports import AlgorithmInfo

    return AlgorithmInfo("OmniCT", str(inference.get("model_version", "unknown")),
                         {"checkpoint": str(inference.get("checkpoint", "")),
                          "protocol": str(inference.get("protocol", ""))})


def _read_source_series(context: StageContext):
    """The headers of the analysed series (the source of every result object's patient, study and references)."""
    from reports import SourceSeries

    assembled = context.results["assemble"]
    return SourceSeries.from_files(study_files_by_series(context)[assembled["series_instance_uid"]])


def _run_identity(context: StageContext, session):
    """The identity every object UID derives from (the same run gives the same UIDs), dated at the study's
    completion."""
    from reports import RunIdentity

    completed_at = session.scalar(select(PipelineRun.completed_at).where(PipelineRun.id == context.run_id))
    return RunIdentity(context.study_instance_uid, f"{context.study_instance_uid}/run-{context.run_number}",
                       created=completed_at)


def measurement_inputs(context: StageContext):
    """(source series, reported organs, run identity) for the measurement objects."""
    source = _read_source_series(context)
    with session_scope(context.session_factory) as session:
        return source, _organs(context, session, load_label_names(context)), _run_identity(context, session)


def encode_measurement_files(context: StageContext, source, organs: list, run) -> list[ObjectFile]:
    """Encode and write the SEG and the TID 1500 measurement SR of the run (they depend on the segmentation only)."""
    from reports import AlgorithmInfo, build_measurement_objects

    label_map = label_map_on_source_slices(load_labels(context), context.results["assemble"], len(source.datasets))
    segmentation = context.results.get("segment", {})
    algorithm = AlgorithmInfo(str(segmentation.get("backend", "unknown")),
                              str(segmentation.get("backend_version", "unknown")))
    return _write_object_files(context, build_measurement_objects(source, label_map, organs, algorithm, run))


def record_early_objects(context: StageContext, files: list[ObjectFile], delivered: dict[str, list[str]]) -> None:
    """The measurements side task's record: its files, and per destination the SOP Instance UIDs it delivered."""
    replace_atomically(context.work_dir / EARLY_OBJECTS_FILE, lambda fh: fh.write(json.dumps(
        {"objects": [asdict(f) for f in files], "delivered": delivered}).encode()))


def early_measurement_files(context: StageContext) -> list[ObjectFile] | None:
    """The SEG and measurement SR the side task encoded for this run, or None unless all its files are there."""
    record = _early_record(context)
    if record is None:
        return None
    files = [ObjectFile(**f) for f in record.get("objects", [])]
    data_dir = context.settings.data_dir
    if not files or any(not (data_dir / f.path).is_file() or (data_dir / f.path).stat().st_size != f.size_bytes
                        for f in files):
        return None
    return files


def early_deliveries(context: StageContext) -> dict[str, list[str]]:
    """Per destination label, the SOP Instance UIDs the side task delivered (empty when it did not)."""
    record = _early_record(context)
    return dict(record.get("delivered", {})) if record else {}


def _early_record(context: StageContext) -> dict | None:
    try:
        return json.loads((context.work_dir / EARLY_OBJECTS_FILE).read_text())
    except (OSError, ValueError):
        return None


def _remove_other_objects(folder: Path, files: list[ObjectFile]) -> None:
    """Remove object files of the run's folder that are not among ``files`` (left by an earlier attempt whose
    objects differed): the folder holds exactly the objects of the ``result_objects`` rows."""
    keep = {Path(f.path).name for f in files}
    for path in folder.glob("*.dcm"):
        if path.name not in keep:
            path.unlink(missing_ok=True)
