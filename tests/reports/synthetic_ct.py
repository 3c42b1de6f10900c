"""A small but realistic CT series built with pydicom, plus an organ label map and measurements computed from it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from reports.inputs import OrganMeasurement, SourceSeries

SLICES, ROWS, COLUMNS = 8, 64, 64
PIXEL_SPACING_MM = 0.8
SLICE_THICKNESS_MM = 2.5
RESCALE_INTERCEPT = -1024.0

# label value -> (name, HU inside, box z0:z1, y0:y1, x0:x1)
ORGANS = {
    5: ("liver", 60, (1, 7, 10, 40, 8, 36)),
    2: ("kidney_left", 30, (2, 6, 36, 52, 40, 52)),
    1: ("spleen", 45, (3, 5, 12, 24, 42, 56)),
}


@dataclass
class SyntheticCt:
    source: SourceSeries
    label_map: np.ndarray  # (SLICES, ROWS, COLUMNS), order of source.datasets
    hu: np.ndarray
    organs: list[OrganMeasurement]
    files: list[Path]


def _ct_slice(index: int, hu: np.ndarray, study_uid: str, series_uid: str, frame_uid: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SOPClassUID = CTImageStorage
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientName = "Müller^Jörg"  # Latin-1 in the source, UTF-8 in the results
    ds.PatientID = "SYN-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.PatientAge = "056Y"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate, ds.StudyTime = "20260101", "101500"
    ds.StudyID = "42"
    ds.AccessionNumber = "ACC42"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT abdomen"
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 3
    ds.SeriesDescription = "Abdomen 2.5mm"
    ds.Manufacturer = "Synthetic"
    ds.BodyPartExamined = "ABDOMEN"
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = index + 1
    ds.AcquisitionNumber = 1
    ds.ContentDate, ds.ContentTime = "20260101", "101600"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-25.6, -25.6, -100.0 + index * SLICE_THICKNESS_MM]
    ds.SliceLocation = ds.ImagePositionPatient[2]
    ds.SliceThickness = SLICE_THICKNESS_MM
    ds.PixelSpacing = [PIXEL_SPACING_MM, PIXEL_SPACING_MM]
    ds.KVP = 120
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = RESCALE_INTERCEPT, 1.0, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelData = (hu - RESCALE_INTERCEPT).astype(np.uint16).tobytes()
    return ds


def build_synthetic_ct(directory: Path, *, seed: int = 0) -> SyntheticCt:
    """Write 8 slices 64×64 to ``directory`` and return the series, a label map with 3 organs and their stats."""
    rng = np.random.default_rng(seed)
    label_map = np.zeros((SLICES, ROWS, COLUMNS), dtype=np.uint8)
    hu = rng.normal(-80, 10, size=label_map.shape)  # fat-like background
    for value, (_name, organ_hu, (z0, z1, y0, y1, x0, x1)) in ORGANS.items():
        label_map[z0:z1, y0:y1, x0:x1] = value
        hu[z0:z1, y0:y1, x0:x1] = rng.normal(organ_hu, 8, size=(z1 - z0, y1 - y0, x1 - x0))
    hu = np.round(hu)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    directory.mkdir(parents=True, exist_ok=True)
    files, datasets = [], []
    # written in reverse order so that the package's sorting is exercised
    for index in reversed(range(SLICES)):
        ds = _ct_slice(index, hu[index], study, series, frame)
        path = directory / f"ct_{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        datasets.append(ds)
    voxel_ml = PIXEL_SPACING_MM * PIXEL_SPACING_MM * SLICE_THICKNESS_MM / 1000.0
    organs = [
        OrganMeasurement(
            label_name=name,
            label_value=value,
            volume_ml=float((label_map == value).sum() * voxel_ml),
            mean_hu=float(hu[label_map == value].mean()),
            std_hu=float(hu[label_map == value].std()),
        )
        for value, (name, _hu, _box) in ORGANS.items()
    ]
    return SyntheticCt(SourceSeries.from_datasets(datasets), label_map, hu, organs, files)
