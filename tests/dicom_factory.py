"""Small, valid CT DICOM files for tests that need real files but not anatomy (the phantom generator makes anatomy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

TEST_PATIENT_NAME = "Testpatient^Secret"
TEST_PATIENT_ID = "PID-4711-SECRET"


def ct_instance(study_uid: str, series_uid: str, sop_uid: str | None = None) -> Dataset:
    """An empty CT Image Storage instance (explicit VR little endian file meta, SOP and study / series UIDs)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    return ds


def ct_slice(study_uid: str, series_uid: str, index: int, size: int = 32, spacing_z: float = 2.5,
             image_type: str = "ORIGINAL\\PRIMARY\\AXIAL", series_number: int = 2, z0: float = -100.0,
             sop_uid: str | None = None) -> Dataset:
    """One axial CT slice at z = z0 + index * spacing_z with a recognisable pixel pattern (value = index)."""
    ds = ct_instance(study_uid, series_uid, sop_uid)
    ds.FrameOfReferenceUID = generate_uid(prefix=None, entropy_srcs=[study_uid, "frame-of-reference"])
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = TEST_PATIENT_NAME, TEST_PATIENT_ID, "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "120000", "ACC1", "1"
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", series_number, index + 1
    ds.ImageType = image_type
    ds.ImagePositionPatient = [-80.0, -80.0, z0 + index * spacing_z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [5.0, 5.0], spacing_z
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.KVP = 120
    pixels = np.full((size, size), 1024 + index, dtype=np.int16)
    ds.PixelData = pixels.tobytes()
    return ds


def write_ct_series(folder: Path, n_slices: int = 8, size: int = 32, study_uid: str | None = None,
                    series_uid: str | None = None, **kwargs) -> list[Path]:
    """Write an axial CT series as Part 10 files; returns the paths in slice order."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    paths = []
    for i in range(n_slices):
        ds = ct_slice(study_uid, series_uid, i, size=size, **kwargs)
        path = folder / f"{series_uid}_{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
