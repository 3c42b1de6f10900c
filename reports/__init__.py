"""DICOM encoding of the node's results: SEG, TID 1500 measurement SR, VQA findings SR, narrative SR and KOS.

Plain Python in, highdicom datasets out; no database, no model. One module per level of abstraction:
``coding`` (concepts) → ``inputs`` (dataclasses) → ``uids`` / ``algorithm`` / ``series`` (shared identity) →
``seg`` / ``measurement_sr`` / ``vqa_sr`` / ``narrative`` / ``kos`` (one object each) → ``bundle`` (all of them).
"""

from reports.bundle import (
    MeasurementObjects,
    ReadingObjects,
    ResultObjects,
    build_measurement_objects,
    build_reading_objects,
    build_result_objects,
    write_objects,
)
from reports.coding import FINDINGS, Urgency, finding_code, organ_coding
from reports.inputs import (
    AlgorithmInfo,
    OrganMeasurement,
    SegmentLabel,
    ReportInputError,
    RunIdentity,
    SourceSeries,
    VqaAnswer,
)
from reports.kos import build_key_object_selection
from reports.measurement_sr import build_measurement_report
from reports.narrative import build_narrative_report, render_narrative
from reports.seg import SegmentationResult, build_segmentation
from reports.uids import ObjectKind
from reports.vqa_sr import build_findings_report

__all__ = [
    "AlgorithmInfo",
    "FINDINGS",
    "MeasurementObjects",
    "ObjectKind",
    "OrganMeasurement",
    "SegmentLabel",
    "ReadingObjects",
    "ReportInputError",
    "ResultObjects",
    "RunIdentity",
    "SegmentationResult",
    "SourceSeries",
    "Urgency",
    "VqaAnswer",
    "build_findings_report",
    "build_key_object_selection",
    "build_measurement_objects",
    "build_measurement_report",
    "build_narrative_report",
    "build_reading_objects",
    "build_result_objects",
    "build_segmentation",
    "finding_code",
    "organ_coding",
    "render_narrative",
    "write_objects",
]
