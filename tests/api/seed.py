"""Build "a processed phantom study" the way the pipeline leaves it: CT instances stored and registered, a run in
DELIVERED with stage records, Finding / OrganMeasurement rows, and real DICOM result objects (Comprehensive 3D SR
and Key Object Selection, written with highdicom) under the data folder as ``ResultObject`` rows."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy.orm import Session

from api.settings import WorklistRules
from api.worklist import refresh_worklist_item
from db.ingest import InstanceRecord, register_instances
from db.models import Finding, OrganMeasurement, PipelineRun, ResultObject, RunState, StageRecord, Study, utcnow
from omnict_node.config import Settings


@dataclass
class FindingSpec:
    question_id: str
    question: str
    answer: str
    positive: bool | None
    code: tuple[str, str, str] | None = None  # (value, scheme, meaning)
    organ: str | None = None
    critical: bool = False
    urgency_weight: float = 0.0
    key_slices: list[int] = field(default_factory=list)


PNEUMOTHORAX = FindingSpec("pneumothorax", "Is there a pneumothorax?", "Yes, a right-sided pneumothorax.", True,
                           ("36118008", "SCT", "Pneumothorax"), "lung_right", critical=True, urgency_weight=50.0,
                           key_slices=[2, 1])
NODULE = FindingSpec("lung_nodule", "Is there a lung nodule?", "Yes, a small nodule in the left upper lobe.", True,
                     ("786838002", "SCT", "Nodule of lung"), "lung_left", urgency_weight=5.0, key_slices=[1])
NO_EFFUSION = FindingSpec("pleural_effusion", "Is there a pleural effusion?", "No pleural effusion.", False,
                          ("60046008", "SCT", "Pleural effusion"), "pleura", urgency_weight=8.0)
LIVER_SIZE = FindingSpec("liver_size", "What is the size of the liver?", "The liver measures about 1500 ml.", None,
                         None, "liver")


@dataclass
class SeededStudy:
    study_uid: str
    run_id: int
    ct_sop_uids: list[str]
    ct_series_uid: str
    result_sop_uids: dict[str, str]  # kind -> SOP Instance UID
    result_series_uids: dict[str, str]


def write_ct_series(storage_root: Path, study_uid: str, slices: int = 3, size: int = 64,
                    requested_priority: str | None = None) -> list[tuple[Path, pydicom.Dataset]]:
    """A tiny CT phantom series (an air-surrounded body disc with a low-density 'lung' region), one file a slice."""
    series_uid = generate_uid()
    folder = storage_root / study_uid / series_uid
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    body = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.42 * size) ** 2
    lung = (yy - size / 2) ** 2 + (xx - size / 3) ** 2 < (0.15 * size) ** 2
    out = []
    for index in range(slices):
        hu = np.full((size, size), -1000, dtype=np.int16)
        hu[body] = 40
        hu[lung] = -800
        hu[size // 2 - 3:size // 2 + 3, size // 2 + 5:size // 2 + 5 + index + 2] = 700  # "bone", differs per slice
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = study_uid + ".1" if len(study_uid) < 60 else generate_uid()
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, index + 1
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Test", "PHANTOM1", "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = \
            "20261122", "101500", "ACC1", "", "1"
        ds.Manufacturer = "OmniCT phantom"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [0.0, 0.0, float(index) * 5.0]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 5.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        if requested_priority:
            ds.RequestedProcedurePriority = requested_priority
        ds.PixelData = (hu.astype(np.int32) + 1024).astype(np.uint16).tobytes()
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append((path, ds))
    return out


def _stage_rows(run_id: int, start: dt.datetime, durations: dict[str, float]) -> list[StageRecord]:
    rows, at = [], start
    for stage, seconds in durations.items():
        rows.append(StageRecord(run_id=run_id, stage=stage, attempt=1, started_at=at,
                                finished_at=at + dt.timedelta(seconds=seconds), duration_s=seconds, outcome="ok",
                                worker="test@localhost"))
        at += dt.timedelta(seconds=seconds)
    return rows


def _write_results(settings: Settings, run: PipelineRun, study_uid: str, ct: list[pydicom.Dataset],
                   findings: list[FindingSpec], key_datasets: list[pydicom.Dataset]) -> list[ResultObject]:
    """A TID 1500 Comprehensive 3D SR with one qualitative evaluation per coded finding, and a KOS of key images."""
    out_dir = settings.data_dir / "results" / study_uid / f"run{run.run_number}"
    out_dir.mkdir(parents=True, exist_ok=True)
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(uid=generate_uid(),
                                                                                       name="OmniCT node")))
    groups = [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=spec.question_id),
            # The finding's code as the concept name, Present/Absent as the value (as reports/coding.py does).
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                hd.sr.CodedConcept(spec.code[0], spec.code[1], spec.code[2]),
                codes.SCT.Present if spec.positive else codes.SCT.Absent)],
        )
        for spec in findings if spec.code is not None and spec.positive is not None
    ]
    report = hd.sr.MeasurementReport(observation_context=observation_context,
                                     procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
                                     imaging_measurements=groups or None)
    sr = hd.sr.Comprehensive3DSR(evidence=ct, content=report, series_instance_uid=generate_uid(), series_number=900,
                                 sop_instance_uid=generate_uid(), instance_number=1, manufacturer="OmniCT node")
    objects = [("findings_sr", sr)]
    if key_datasets:
        kos = hd.ko.KeyObjectSelectionDocument(
            evidence=ct, content=hd.ko.KeyObjectSelection(document_title=codes.DCM.OfInterest,
                                                           referenced_objects=key_datasets),
            series_instance_uid=generate_uid(), series_number=901, sop_instance_uid=generate_uid(), instance_number=1,
            manufacturer="OmniCT node")
        objects.append(("kos", kos))
    rows = []
    for kind, dataset in objects:
        path = out_dir / f"{kind}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        rows.append(ResultObject(run_id=run.id, kind=kind, sop_class_uid=dataset.SOPClassUID,
                                 sop_instance_uid=dataset.SOPInstanceUID, series_instance_uid=dataset.SeriesInstanceUID,
                                 study_instance_uid=study_uid, path=str(path.relative_to(settings.data_dir)),
                                 size_bytes=path.stat().st_size))
    return rows


def seed_processed_study(session: Session, settings: Settings, findings: list[FindingSpec], *,
                         requested_priority: str | None = None, ready_at: dt.datetime | None = None,
                         rules: WorklistRules | None = None, write_objects: bool = True,
                         slices: int = 3) -> SeededStudy:
    """Everything the pipeline leaves behind for one study, then ``refresh_worklist_item`` (as the pipeline calls it).
    The caller commits."""
    study_uid = generate_uid()
    storage_root = Path(settings.storage.root)
    files = write_ct_series(storage_root, study_uid, slices=slices, requested_priority=requested_priority)
    register_instances(session, [
        InstanceRecord(study_instance_uid=study_uid, series_instance_uid=ds.SeriesInstanceUID,
                       sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                       transfer_syntax_uid=ExplicitVRLittleEndian, path=str(path.relative_to(storage_root)),
                       size_bytes=path.stat().st_size, modality="CT", series_number=1,
                       instance_number=ds.InstanceNumber, study_date=ds.StudyDate,
                       requested_priority=requested_priority)
        for path, ds in files
    ])
    session.flush()
    study = session.query(Study).filter_by(study_instance_uid=study_uid).one()
    study.requested_priority = requested_priority  # whether or not ingest copies it, the order's priority is known
    run = session.query(PipelineRun).filter_by(study_id=study.id).one()
    start = utcnow() - dt.timedelta(minutes=5)
    run.state, run.completed_at, run.dispatched_at, run.finished_at = RunState.DELIVERED, start, start, utcnow()
    run.completion_reason = "quiet"
    session.add_all(_stage_rows(run.id, start, {"assemble": 0.8, "segment": 12.0, "infer": 40.0, "report": 1.5,
                                                "deliver": 0.4}))
    datasets = [ds for _, ds in files]
    key_datasets: list[pydicom.Dataset] = []
    for spec in findings:
        key_uids = [datasets[i].SOPInstanceUID for i in spec.key_slices if i < len(datasets)]
        key_datasets += [datasets[i] for i in spec.key_slices if i < len(datasets) and datasets[i] not in key_datasets]
        session.add(Finding(run_id=run.id, question_id=spec.question_id, question=spec.question, answer=spec.answer,
                            organ=spec.organ, code_value=spec.code[0] if spec.code else None,
                            code_scheme=spec.code[1] if spec.code else None,
                            code_meaning=spec.code[2] if spec.code else None, positive=spec.positive,
                            critical=spec.critical, urgency_weight=spec.urgency_weight, key_slices=spec.key_slices,
                            key_sop_instance_uids=key_uids))
    session.add_all([OrganMeasurement(run_id=run.id, organ="liver", volume_ml=1503.2, mean_hu=58.1, std_hu=11.9),
                     OrganMeasurement(run_id=run.id, organ="lung_left", volume_ml=2410.0, mean_hu=-812.5, std_hu=60.2)])
    results = _write_results(settings, run, study_uid, datasets, findings, key_datasets) if write_objects else []
    session.add_all(results)
    session.flush()
    refresh_worklist_item(session, run.id, rules, now=ready_at)
    return SeededStudy(study_uid, run.id, [ds.SOPInstanceUID for ds in datasets], datasets[0].SeriesInstanceUID,
                       {r.kind: r.sop_instance_uid for r in results}, {r.kind: r.series_instance_uid for r in results})
