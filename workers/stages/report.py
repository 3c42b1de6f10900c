"""Stage 4, report (cpu queue): encode the run's results as DICOM and put the study on the worklist.

Objects (``reports.build_result_objects``): SEG of the organ masks, TID 1500 measurement SR, findings SR, narrative
SR and a Key Object Selection of the key images — all in the source study, UIDs derived from the run, so encoding
the same run again (a retried stage, a re-delivery) produces the same UIDs and replaces rather than duplicates.
Files land in ``<data_dir>/results/<study>/run-<n>/``; ``result_objects`` rows are replaced as a whole.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
from pydicom.sr.coding import Code
from sqlalchemy import delete, select

from db.models import Finding, OrganMeasurement, PipelineRun, ResultObject
from db.session import session_scope
from omnict_node.logs import log_event
from workers.pipeline import StageContext, cyclic_gc_paused
from workers.stages.assemble import study_files_by_series
from workers.stages.segment import load_label_map

log = logging.getLogger("omnict.stage.report")


def results_dir(context: StageContext) -> Path:
    return context.settings.data_dir / "results" / context.study_instance_uid / f"run-{context.run_number}"


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
    from reports import SourceSeries

    assembled = context.results["assemble"]
    series_files = study_files_by_series(context)[assembled["series_instance_uid"]]
    with cyclic_gc_paused():
        source = SourceSeries.from_files(series_files)
        label_map, labels = load_label_map(context)
        label_map = label_map_on_source_slices(label_map, assembled, len(source.datasets))
        with session_scope(context.session_factory) as session:
            answers = _answers(context, session)
            organs = _organs(context, session, labels)
            completed_at = session.scalar(select(PipelineRun.completed_at).where(PipelineRun.id == context.run_id))
        segmentation = context.results.get("segment", {})
        inference = context.results.get("infer", {})
        objects, paths = _encode(context, source, label_map, organs, answers, segmentation, inference, completed_at)
    kinds = [kind for kind, obj in (("seg", objects.segmentation), ("measurement_sr", objects.measurement_report),
                                    ("findings_sr", objects.findings_report), ("narrative_sr", objects.narrative_report),
                                    ("kos", objects.key_objects)) if obj is not None]  # the order of datasets()
    with session_scope(context.session_factory) as session:
        session.execute(delete(ResultObject).where(ResultObject.run_id == context.run_id))
        for kind, dataset, path in zip(kinds, objects.datasets(), paths, strict=True):
            session.add(ResultObject(
                run_id=context.run_id, kind=kind, sop_class_uid=dataset.SOPClassUID,
                sop_instance_uid=dataset.SOPInstanceUID, series_instance_uid=dataset.SeriesInstanceUID,
                study_instance_uid=dataset.StudyInstanceUID, path=str(path.relative_to(context.settings.data_dir)),
                size_bytes=path.stat().st_size))
        session.flush()
        refresh_worklist_item(session, context.run_id, rules=context.settings.api.worklist)
    log_event(log, "pipeline.report.done", run_id=context.run_id, objects=len(paths))
    return {"objects": [str(p.relative_to(context.settings.data_dir)) for p in paths],
            "narrative": objects.narrative_text}


def _encode(context: StageContext, source, label_map, organs, answers, segmentation: dict, inference: dict,
            completed_at):
    from reports import AlgorithmInfo, RunIdentity, build_result_objects

    objects = build_result_objects(
        source, label_map, organs, answers,
        AlgorithmInfo("OmniCT", str(inference.get("model_version", "unknown")),
                      {"checkpoint": str(inference.get("checkpoint", "")), "protocol": str(inference.get("protocol", ""))}),
        RunIdentity(context.study_instance_uid, f"{context.study_instance_uid}/run-{context.run_number}",
                    created=completed_at),
        segmentation_algorithm=AlgorithmInfo(str(segmentation.get("backend", "unknown")),
                                             str(segmentation.get("backend_version", "unknown"))),
    )
    folder = results_dir(context)
    shutil.rmtree(folder, ignore_errors=True)  # a retried stage writes the same objects again
    paths = objects.write(folder)
    return objects, paths
