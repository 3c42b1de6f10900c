"""What the viewer test shows: a phantom CT study and the node's result objects for it, in a real Orthanc.

``build_phantom_results`` is the one place the content comes from; when the end-to-end fixture (the real node
pipeline delivering to Orthanc) exists, swap it in there. Until then the results are built directly from the same
parts the pipeline uses: the classical segmenter, ``measure_organs`` and ``reports.build_result_objects``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tests.services import OrthancServer

FINDINGS = ["lung_nodule:lobe=lung_upper_lobe_right,size_mm=14", "pleural_effusion:side=right,amount=moderate"]
REPORTED_ORGANS = ("liver", "spleen", "lung_left", "lung_right", "heart")


@dataclass(frozen=True)
class ReportedOrgan:
    name: str  # label name, the measurement group's Tracking Identifier
    site: str  # meaning of its Finding Site code, e.g. "Liver"
    volume_ml: float
    mean_hu: float


@dataclass
class ViewerContent:
    """The study as the viewer should find it: UIDs, files, and the numbers the reports carry."""

    study_instance_uid: str
    patient_id: str
    ct_series_instance_uid: str
    ct_files: list[Path]
    result_files: dict[str, Path]  # kind ("seg", "measurement_sr", "findings_sr", "narrative_sr", "kos") -> file
    result_series: dict[str, str]  # kind -> SeriesInstanceUID
    series_descriptions: dict[str, str]  # kind -> SeriesDescription
    organs: list[ReportedOrgan]
    questions: list[str]
    answers: list[str]
    extra: dict[str, object] = field(default_factory=dict)

    def all_files(self) -> list[Path]:
        return [*self.ct_files, *self.result_files.values()]


def build_phantom_results(work_dir: Path, *, slices: int = 48, size: int = 192) -> ViewerContent:
    """Phantom CT (lung nodule + pleural effusion) and its SEG, measurement SR, findings SR, narrative SR, KOS."""
    from omnict_core.phantom import PhantomSpec, generate_study, write_dicom_study
    from omnict_core.segmentation import make_segmenter, measure_organs
    from reports import AlgorithmInfo, OrganMeasurement, RunIdentity, SourceSeries, VqaAnswer, build_result_objects
    from reports import coding

    study = generate_study(PhantomSpec(seed=7, slices=slices, size=size, findings=list(FINDINGS)))
    paths = write_dicom_study(study, work_dir / "study", localizer=False, ground_truth=False)
    source = SourceSeries.from_files(paths.ct_files)
    # study.hu is (z, y, x) with z ascending, the same order SourceSeries sorts the slices in.
    segmentation = make_segmenter("classical").segment(study.hu, study.spacing)
    measured = measure_organs(segmentation.label_map, study.hu, study.spacing, segmentation.labels)
    value_of = {name: value for value, name in segmentation.labels.items()}
    organs = [OrganMeasurement(name, value_of[name], measured[name].volume_ml, measured[name].hu_mean,
                               measured[name].hu_std)
              for name in REPORTED_ORGANS if name in value_of]
    nodule_slice = _slice_of_finding(study, "lung_nodule")
    effusion_slice = _slice_of_finding(study, "pleural_effusion")
    answers = [
        VqaAnswer(question="Is there a pleural effusion?",
                  answer="Yes, a moderate right-sided pleural effusion.",
                  coded_answer=coding.PRESENT, finding=coding.FINDINGS["pleural_effusion"],
                  finding_site="lung_right", key_images=(effusion_slice,), urgency="urgent"),
        VqaAnswer(question="Is there a lung nodule?",
                  answer="Yes, a 14 mm nodule in the right upper lobe.",
                  coded_answer=coding.PRESENT, finding=coding.FINDINGS["lung_nodule"],
                  finding_site="lung_right", key_images=(nodule_slice,), urgency="routine"),
    ]
    run = RunIdentity(source.study_instance_uid, "viewer-test-run-1", datetime(2026, 11, 22, 9, 0, tzinfo=UTC))
    objects = build_result_objects(
        source, segmentation.label_map, organs, answers, AlgorithmInfo("OmniCT", "0.1.0-test"), run,
        segmentation_algorithm=AlgorithmInfo(segmentation.backend, segmentation.backend_version),
    )
    datasets = {"seg": objects.measured.segmentation.dataset, "measurement_sr": objects.measured.measurement_report,
                "findings_sr": objects.reading.findings_report, "narrative_sr": objects.reading.narrative_report,
                "kos": objects.reading.key_objects}
    result_files, result_series, descriptions = {}, {}, {}
    (work_dir / "results").mkdir(parents=True, exist_ok=True)
    for kind, dataset in datasets.items():
        if dataset is None:
            continue
        result_files[kind] = work_dir / "results" / f"{kind}.dcm"
        dataset.save_as(result_files[kind], enforce_file_format=True)
        result_series[kind] = str(dataset.SeriesInstanceUID)
        descriptions[kind] = str(dataset.get("SeriesDescription", ""))
    return ViewerContent(
        study_instance_uid=source.study_instance_uid,
        patient_id=str(source.first.PatientID),
        ct_series_instance_uid=source.series_instance_uid,
        ct_files=list(paths.ct_files),
        result_files=result_files,
        result_series=result_series,
        series_descriptions=descriptions,
        organs=[ReportedOrgan(o.label_name, o.organ.property_type.meaning, o.volume_ml, o.mean_hu) for o in organs],
        questions=[a.question for a in answers],
        answers=[a.answer for a in answers],
        extra={"nodule_slice": nodule_slice, "effusion_slice": effusion_slice},
    )


def _slice_of_finding(study, finding_type: str) -> int:
    """Index (in ascending-z order, as SourceSeries sorts) of the slice with most voxels of the finding."""
    import numpy as np

    index = next(i for i, f in enumerate(study.findings, start=1) if f.type == finding_type)
    per_slice = (study.finding_mask == index).sum(axis=(1, 2))
    return int(np.argmax(per_slice))


def upload(orthanc: OrthancServer, content: ViewerContent) -> None:
    """POST every file to Orthanc's REST API (which stores any SOP class, SR and SEG included)."""
    for path in content.all_files():
        answer = orthanc.upload(path)
        if answer.get("Status") not in ("Success", "AlreadyStored"):
            raise RuntimeError(f"Orthanc refused {path.name}: {answer}")
