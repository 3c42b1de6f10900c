"""Stage 4, report (cpu queue): encode the run's results as DICOM and put the study on the worklist.

Objects: SEG of the organ masks and TID 1500 measurement SR (workers/stages/measurements.py), findings SR,
narrative SR and a Key Object Selection of the key images (``reports.build_reading_objects``) — all in the source
study, UIDs derived from the run, so encoding the same run again (a retried stage, a re-delivery) produces the same
UIDs and replaces rather than duplicates. Files land in ``<data_dir>/results/<study>/run-<n>/``; ``result_objects``
rows are replaced as a whole.

The SEG and the measurement SR need no model answer: two side tasks (workers/stages/measurements.py) encode them
while the models run. This stage takes their files as they are when intact (they are what it would write) and
encodes what is missing itself.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydicom.sr.coding import Code
from sqlalchemy import delete, select

from db.models import Finding, ResultObject
from db.session import session_scope
from omnict_node.logs import log_event
from workers.pipeline import StageContext, cyclic_gc_paused
from workers.stages.assemble import source_series
from workers.stages.measurements import (
    measured_organs,
    measurement_files,
    segment_labels,
)
from workers.stages.objects import ObjectFile, results_dir, run_identity, write_object_files

log = logging.getLogger("omnict.stage.report")


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
    from reports.coding import has_organ_coding

    return organ if organ and has_organ_coding(organ) else None


def report(context: StageContext) -> dict:
    from api.worklist import refresh_worklist_item
    from reports import build_reading_objects

    with cyclic_gc_paused():
        source, run = source_series(context), run_identity(context)
        labels = segment_labels(context)
        organs = measured_organs(context, labels)
        with session_scope(context.session_factory) as session:
            answers = _answers(context, session)
        # the side tasks' files, or encoded here
        measured, reused = measurement_files(context, source, run, labels, organs)
        reading = build_reading_objects(source, organs, answers, model_algorithm(context.results.get("infer", {})),
                                        run)
        files = measured + write_object_files(context, reading.named())
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


def _remove_other_objects(folder: Path, files: list[ObjectFile]) -> None:
    """Remove object files of the run's folder that are not among ``files`` (left by an earlier attempt whose
    objects differed): the folder holds exactly the objects of the ``result_objects`` rows."""
    keep = {Path(f.path).name for f in files}
    for path in folder.glob("*.dcm"):
        if path.name not in keep:
            path.unlink(missing_ok=True)
