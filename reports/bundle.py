"""All result objects of one run, in the order they should be sent to the PACS, in two groups: what the
segmentation alone gives (SEG, TID 1500 measurement SR: :func:`build_measurement_objects`, encoded by the pipeline
while the model runs) and what the model's answers give (findings SR, narrative SR, KOS: :func:`build_reading_objects`);
:func:`build_result_objects` builds both."""

from __future__ import annotations

import os
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


class _ObjectGroup:
    """Datasets with their result kinds (``result_objects.kind``: seg, measurement_sr, findings_sr, narrative_sr,
    kos), in the order they should be sent: an object before any object that references it."""

    def named(self) -> list[tuple[str, Dataset]]:
        raise NotImplementedError

    def datasets(self) -> list[Dataset]:
        return [dataset for _, dataset in self.named()]


@dataclass(frozen=True)
class MeasurementObjects(_ObjectGroup):
    """What the segmentation alone gives (no model answer needed): the SEG and the TID 1500 measurement SR."""

    segmentation: SegmentationResult
    measurement_report: Comprehensive3DSR

    def named(self) -> list[tuple[str, Dataset]]:
        return [("seg", self.segmentation.dataset), ("measurement_sr", self.measurement_report)]


@dataclass(frozen=True)
class ReadingObjects(_ObjectGroup):
    """What the model's answers give: findings SR, narrative SR and KOS."""

    narrative_report: EnhancedSR
    narrative_text: str
    findings_report: ComprehensiveSR | None  # None when there were no answers
    key_objects: KeyObjectSelectionDocument | None  # None when no answer named a key image

    def named(self) -> list[tuple[str, Dataset]]:
        pairs = [("findings_sr", self.findings_report), ("narrative_sr", self.narrative_report),
                 ("kos", self.key_objects)]
        return [(kind, dataset) for kind, dataset in pairs if dataset is not None]


@dataclass(frozen=True)
class ResultObjects(_ObjectGroup):
    """Every result object of a run: the measurement objects, then the reading objects."""

    measured: MeasurementObjects
    reading: ReadingObjects

    def named(self) -> list[tuple[str, Dataset]]:
        return self.measured.named() + self.reading.named()

    def write(self, directory: Path) -> list[Path]:
        """Write each object as a DICOM file ``<Modality>_<SOPInstanceUID>.dcm`` under ``directory``."""
        return write_objects(self.datasets(), directory)


def object_file_name(dataset: Dataset) -> str:
    """``<Modality>_<SOPInstanceUID>.dcm``: the same run gives the same names (its UIDs are derived from the run)."""
    return f"{dataset.Modality}_{dataset.SOPInstanceUID}.dcm"


def write_objects(datasets: Sequence[Dataset], directory: Path) -> list[Path]:
    """Write each dataset as a DICOM file (:func:`object_file_name`) under ``directory``, each through a temporary
    file and a rename: a reader (or a second writer of the same run's identical object) never sees half a file."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for dataset in datasets:
        path = directory / object_file_name(dataset)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        dataset.save_as(partial, enforce_file_format=True)
        partial.replace(path)
        paths.append(path)
    return paths


def build_measurement_objects(
    source: SourceSeries,
    label_map: np.ndarray,
    organs: Sequence[OrganMeasurement],
    segmentation_algorithm: AlgorithmInfo,
    run: RunIdentity,
) -> MeasurementObjects:
    """SEG of the organ masks and the TID 1500 measurement SR that references it, by ``segmentation_algorithm``."""
    segmentation = build_segmentation(source, label_map, organs, segmentation_algorithm, run)
    measurement_report = build_measurement_report(source, segmentation, organs, segmentation_algorithm, run,
                                                  label_map)
    return MeasurementObjects(segmentation, measurement_report)


def build_reading_objects(
    source: SourceSeries,
    organs: Sequence[OrganMeasurement],
    answers: Sequence[VqaAnswer],
    algorithm: AlgorithmInfo,
    run: RunIdentity,
    *,
    narrative_template: str = TEMPLATE_NAME,
) -> ReadingObjects:
    """Findings SR, narrative SR (organ measurements and answers) and KOS of the key images, by ``algorithm``."""
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
    return ReadingObjects(narrative, text, findings, key_objects)


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
    return ResultObjects(
        build_measurement_objects(source, label_map, organs, segmentation_algorithm or algorithm, run),
        build_reading_objects(source, organs, answers, algorithm, run, narrative_template=narrative_template))
