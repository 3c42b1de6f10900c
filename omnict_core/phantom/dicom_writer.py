"""Write a PhantomStudy as DICOM: axial CT series (CT Image Storage, one file per slice), 1-2 localizers, and the
ground truth (JSON + .npy label map + .npy finding mask).

Attributes filled (per CT slice): SOP Common (SOPClassUID = CT Image Storage, SOPInstanceUID, SpecificCharacterSet),
Patient (PatientName/ID/BirthDate/Sex/Age -- synthetic), General Study (StudyInstanceUID, StudyDate/Time, StudyID,
AccessionNumber, ReferringPhysicianName, StudyDescription), General Series (Modality CT, SeriesInstanceUID,
SeriesNumber, SeriesDescription, BodyPartExamined, PatientPosition HFS), Frame of Reference (FrameOfReferenceUID,
PositionReferenceIndicator), General Equipment (Manufacturer, model, software), General/CT Image (ImageType
ORIGINAL\\PRIMARY\\AXIAL, InstanceNumber -- 1 = most superior slice as scanners number head-first acquisitions --,
AcquisitionNumber, KVP, XRayTubeCurrent, ConvolutionKernel, ReconstructionDiameter, GantryDetectorTilt),
Image Plane (ImagePositionPatient, ImageOrientationPatient 1\\0\\0\\0\\1\\0, PixelSpacing, SliceThickness,
SliceLocation), Image Pixel (int16 signed, MONOCHROME2), RescaleIntercept -1024 / RescaleSlope 1 / RescaleType HU,
VOI LUT (WindowCenter/Width soft tissue + lung).  Transfer syntax: Explicit VR Little Endian.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

from . import PhantomStudy, derived_uid
from .anatomy import LABELS

RESCALE_INTERCEPT = -1024.0


@dataclass
class StudyPaths:
    out_dir: Path
    ct_files: list[Path] = field(default_factory=list)  # in InstanceNumber order (superior first)
    localizer_files: list[Path] = field(default_factory=list)
    ground_truth: Path | None = None
    labels: Path | None = None
    finding_mask: Path | None = None


def _ds_value(v: float) -> str:
    """DS values: at most 16 characters."""
    s = f"{v:.6f}".rstrip("0").rstrip(".")
    return s if len(s) <= 16 else f"{v:.6g}"


def _base_dataset(study: PhantomStudy, series_uid: str, series_number: int, description: str) -> Dataset:
    p = study.patient
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = p.study_date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = p.study_time
    ds.AccessionNumber = p.accession
    ds.Modality = "CT"
    ds.Manufacturer = "OmniCT"
    ds.InstitutionName = "OmniCT Phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT CHEST ABDOMEN (SYNTHETIC PHANTOM)"
    ds.SeriesDescription = description
    ds.ManufacturerModelName = "omnict_core.phantom"
    ds.SoftwareVersions = "1"
    ds.PatientName = p.name
    ds.PatientID = p.patient_id
    ds.PatientBirthDate = p.birth_date
    ds.PatientSex = p.sex
    ds.PatientAge = f"{p.age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study.uids["study"]
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = study.uids["frame_of_reference"]
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    return ds


def _file_meta(sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _save(ds: Dataset, path: Path) -> None:
    ds.file_meta = _file_meta(ds.SOPInstanceUID)
    ds.save_as(path, enforce_file_format=True)


def instance_uid(study: PhantomStudy, role: str, index: int) -> str:
    return derived_uid(study.spec.fingerprint(), role, str(index))


def write_ct_series(study: PhantomStudy, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    nz, ny, nx = study.hu.shape
    dz, dy, dx = study.spacing
    base = _base_dataset(study, study.uids["ct_series"], 2, f"AXIAL {dz:.2f}mm PHANTOM")
    base.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    base.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    base.PixelSpacing = [_ds_value(dy), _ds_value(dx)]
    base.SliceThickness = _ds_value(dz)
    base.SpacingBetweenSlices = _ds_value(dz)
    base.Rows, base.Columns = ny, nx
    base.PixelRepresentation = 1
    base.RescaleIntercept = _ds_value(RESCALE_INTERCEPT)
    base.RescaleSlope = "1"
    base.RescaleType = "HU"
    base.WindowCenter = ["40", "-600"]
    base.WindowWidth = ["400", "1500"]
    base.WindowCenterWidthExplanation = ["SOFT TISSUE", "LUNG"]
    base.ConvolutionKernel = "STANDARD"
    base.ReconstructionDiameter = _ds_value(nx * dx)
    base.DataCollectionDiameter = "500"
    base.GantryDetectorTilt = "0"
    base.TableHeight = _ds_value(150.0)
    base.RotationDirection = "CW"
    base.XRayTubeCurrent = 200
    base.ExposureTime = 500
    paths = []
    for n in range(1, nz + 1):
        k = nz - n  # InstanceNumber 1 = the most superior slice
        ds = base.copy()
        ds.SOPInstanceUID = instance_uid(study, "ct", n)
        ds.InstanceNumber = n
        x0, y0, z0 = study.origin
        z = z0 + k * dz
        ds.ImagePositionPatient = [_ds_value(x0), _ds_value(y0), _ds_value(z)]
        ds.SliceLocation = _ds_value(z)
        ds.PixelData = np.round(study.hu[k] - RESCALE_INTERCEPT).astype("<i2").tobytes()  # per slice: no volume copy
        path = out_dir / f"CT{n:06d}.dcm"
        _save(ds, path)
        paths.append(path)
    return paths


def write_localizers(study: PhantomStudy, out_dir: Path) -> list[Path]:
    """AP and lateral scout projections (CT Image Storage, ImageType ORIGINAL\\PRIMARY\\LOCALIZER)."""
    from scipy.ndimage import zoom

    out_dir.mkdir(parents=True, exist_ok=True)
    nz, ny, nx = study.hu.shape
    dz, dy, dx = study.spacing
    x0, y0, z0 = study.origin
    z_top = z0 + (nz - 1) * dz
    paths = []
    # (name, projection axis, in-plane spacing, row direction, start position)
    views = [("AP", 1, dx, [1, 0, 0, 0, 0, -1], [x0, 0.0, z_top]),
             ("LAT", 2, dy, [0, 1, 0, 0, 0, -1], [0.0, y0, z_top])]
    for number, (name, axis, col_spacing, orient, pos) in enumerate(views, start=1):
        # line integrals of mu (1/mm, water ~0.02 at ~70 keV), slice by slice (no volume-sized temporaries)
        step = dy if axis == 1 else dx
        proj = np.stack([np.clip(study.hu[k] + 1000.0, 0, None).sum(axis=axis - 1) for k in range(nz)])
        proj *= 0.02 / 1000.0 * step  # (nz, n)
        proj = proj[::-1]  # rows from head to feet
        proj = zoom(proj, (dz / col_spacing, 1.0), order=1) if nz > 1 else proj
        img = np.clip(proj * 400.0, 0, 4095).astype("<u2")
        ds = _base_dataset(study, study.uids["localizer_series"], 1, "TOPOGRAM")
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.SOPInstanceUID = instance_uid(study, "localizer", number)
        ds.InstanceNumber = number
        ds.ImageOrientationPatient = orient
        ds.ImagePositionPatient = [_ds_value(v) for v in pos]
        row_spacing = (nz * dz) / img.shape[0]
        ds.PixelSpacing = [_ds_value(row_spacing), _ds_value(col_spacing)]
        ds.Rows, ds.Columns = img.shape
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.WindowCenter = "1200"
        ds.WindowWidth = "2400"
        ds.SliceThickness = ""
        ds.ImageComments = f"{name} scout projection"
        ds.PixelData = img.tobytes()
        path = out_dir / f"LOC{number:03d}.dcm"
        _save(ds, path)
        paths.append(path)
    return paths


def ground_truth_dict(study: PhantomStudy, paths: StudyPaths) -> dict:
    rel = lambda p: str(Path(p).relative_to(paths.out_dir))  # noqa: E731
    return {
        "generator": "omnict_core.phantom", "format_version": 1,
        "spec": {"seed": study.spec.seed, "slices": study.spec.slices, "size": study.spec.size,
                 "findings": [f.to_text() for f in study.spec.findings], "noise_hu": study.spec.noise_hu,
                 "texture": study.spec.texture, "fingerprint": study.spec.fingerprint()},
        "patient": {"sex": study.patient.sex, "age": study.patient.age},
        "study_instance_uid": study.uids["study"], "frame_of_reference_uid": study.uids["frame_of_reference"],
        "series": {
            "ct": {"series_instance_uid": study.uids["ct_series"], "files": [rel(p) for p in paths.ct_files]},
            "localizer": {"series_instance_uid": study.uids["localizer_series"],
                          "files": [rel(p) for p in paths.localizer_files]},
        },
        "volume": {
            "shape_zyx": list(study.hu.shape), "spacing_zyx_mm": list(study.spacing),
            "origin_lps_mm": list(study.origin), "affine_ijk_to_lps": study.affine.tolist(),
            "axis_order": "array (z, y, x); z ascending = inferior to superior; InstanceNumber 1 = highest z",
            "noise_hu": round(float(study.noise_hu), 2), "rescale_intercept": RESCALE_INTERCEPT,
        },
        "labels": {"path": rel(paths.labels) if paths.labels else None, "dtype": "uint8",
                   "names": {str(k): v for k, v in LABELS.items()}, "present_voxels": study.labels_present()},
        "finding_mask": {"path": rel(paths.finding_mask) if paths.finding_mask else None,
                         "meaning": "value i = findings[i-1] (1-based index)"},
        "findings": [f.to_json() for f in study.findings],
    }


def write_dicom_study(study: PhantomStudy, out_dir, *, localizer: bool = True, ground_truth: bool = True,
                      nifti: bool = False) -> StudyPaths:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = StudyPaths(out_dir=out)
    paths.ct_files = write_ct_series(study, out / "CT")
    if localizer:
        paths.localizer_files = write_localizers(study, out / "LOCALIZER")
    if ground_truth:
        paths.labels = out / "labels.npy"
        np.save(paths.labels, study.labels)
        paths.finding_mask = out / "finding_mask.npy"
        np.save(paths.finding_mask, study.finding_mask)
        if nifti:
            import nibabel as nib

            # NIfTI is RAS: flip x and y of the LPS affine; data (x, y, z) order
            lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
            img = nib.Nifti1Image(np.ascontiguousarray(study.labels.transpose(2, 1, 0)), lps_to_ras @ study.affine)
            nib.save(img, out / "labels.nii.gz")
        paths.ground_truth = out / "ground_truth.json"
        gt = ground_truth_dict(study, paths)
        if nifti:
            gt["labels"]["nifti_path"] = "labels.nii.gz"
        paths.ground_truth.write_text(json.dumps(gt, indent=1))
    return paths
