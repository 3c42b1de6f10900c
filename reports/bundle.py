"""All result objects of one run in one call, in the order they should be sent to the PACS."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from highdicom.ko import KeyObjectSelectionDocument
from highdicom.sr import Comprehensive3DSR, ComprehensiveSR, EnhancedSR
from pydicom.dataset import Dataset

from reports.inputs import AlgorithmInfo, OrganMeasurement, RunIdentity, SourceSeries, VqaAnswer
from reports.kos import build_key_object_selection, key_images_of_answers, key_object_description
from reports.measurement_sr import build_measurement_report
from reports.narrative import TEMPLATE_NAME, build_narrative_report, render_narrative
from reports.seg import SegmentationResult, build_segmentation
from reports.vqa_sr import build_findings_report


@dataclass(frozen=True)
class ResultObjects:
    segmentation: SegmentationResult
    measurement_report: Comprehensive3DSR
    narrative_report: EnhancedSR
    narrative_text: str
    findings_report: ComprehensiveSR | None  # None when there were no answers
    key_objects: KeyObjectSelectionDocument | None  # None when no answer named a key image

    def datasets(self) -> list[Dataset]:
        """SEG first (the measurement SR references it), then the SRs, then the KOS (it references the findings SR)."""
        ordered = [self.segmentation.dataset, self.measurement_report, self.findings_report, self.narrative_report]
        return [ds for ds in (*ordered, self.key_objects) if ds is not None]

    def write(self, directory: Path) -> list[Path]:
        """Write each object as a DICOM file ``<Modality>_<SOPInstanceUID>.dcm`` under ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for dataset in self.datasets():
            path = directory / f"{dataset.Modality}_{dataset.SOPInstanceUID}.dcm"
            dataset.save_as(path, enforce_file_format=True)
            paths.append(path)
        return paths


def build_result_objects(
    source: SourceSeries,
    label_map: np.ndarray,
    organs: Sequence[OrganMeasurement],
    answers: Sequence[VqaAnswer],
    algorithm: AlgorithmInfo,
    run: RunIdentity,
    *,
    segmentation_algorithm: AlgorithmInfo | None = None,
    narrative_template: str = TEMPLATE_NAME,
) -> ResultObjects:
    """SEG + measurement SR (by ``segmentation_algorithm``, default ``algorithm``), findings SR, narrative SR and
    KOS (by ``algorithm``), all in the source study, each in its own series, UIDs derived from ``run``."""
    seg_algorithm = segmentation_algorithm or algorithm
    segmentation = build_segmentation(source, label_map, organs, seg_algorithm, run)
    measurement_report = build_measurement_report(source, segmentation, organs, seg_algorithm, run, label_map,
                                                  segmentation.areas)  # one pass over the volume for both
    findings = build_findings_report(source, answers, algorithm, run) if answers else None
    text = render_narrative(organs, answers, algorithm, narrative_template)
    narrative = build_narrative_report(source, text, algorithm, run)
    key_images = key_images_of_answers(answers)
    key_objects = None
    if key_images:
        key_objects = build_key_object_selection(
            source,
            key_images,
            algorithm,
            run,
            description=key_object_description(algorithm, answers),
            extra_objects=[findings] if findings is not None else (),
        )
    return ResultObjects(segmentation, measurement_report, narrative, text, findings, key_objects)
