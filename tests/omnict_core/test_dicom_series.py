"""Series selection and volume building on phantom, hand-built and real (JPEG 2000) DICOM."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from omnict_core.io import (InconsistentGeometryError, MixedSeriesError, NoImageError, dicom_files, group_by_series,
                            load_series_from_folder, load_volume, select_ct_series)
from omnict_core.phantom import PhantomSpec, generate_study, write_dicom_study
from tests.realdata import totalseg_example_dicom_dir

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    study = generate_study(PhantomSpec(seed=11, slices=24, size=64, findings=["lung_nodule:size_mm=15"]))
    out = tmp_path_factory.mktemp("phantom")
    paths = write_dicom_study(study, out)
    return study, paths


def _copy_ct(paths, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(p, dest / p.name)) for p in paths.ct_files]


def test_phantom_series_selected_and_loaded_exactly(phantom):
    study, paths = phantom
    choice = select_ct_series(dicom_files(paths.out_dir))
    assert choice.ok and choice.series_uid == study.uids["ct_series"]
    assert choice.slices == 24 and "most slices" in choice.reason
    [loc] = choice.rejected
    assert loc.series_uid == study.uids["localizer_series"] and "LOCALIZER" in loc.reason and loc.instances == 2

    vol = load_volume(choice.paths)
    assert vol.hu.shape == study.hu.shape and vol.hu.dtype == np.float32
    # stored as rounded int16 with intercept -1024: within half a HU of the generated volume
    assert np.max(np.abs(vol.hu - study.hu)) <= 0.5 + 1e-3
    np.testing.assert_allclose(vol.spacing, study.spacing, rtol=1e-5)
    np.testing.assert_allclose(vol.affine, study.affine, atol=1e-3)
    assert vol.series_uid == study.uids["ct_series"] and vol.study_uid == study.uids["study"]
    assert vol.report.problems == [] and not vol.report.resampled
    assert len(vol.sop_instance_uids) == 24


def test_shuffled_files_give_the_same_volume(phantom, tmp_path):
    study, paths = phantom
    files = list(paths.ct_files)
    random.Random(3).shuffle(files)
    # also write a wrong InstanceNumber order: sorting must use ImagePositionPatient
    for n, f in enumerate(files[:5]):
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = 1000 - n
        ds.save_as(tmp_path / f.name)
    files = [tmp_path / f.name for f in files[:5]] + files[5:]
    vol = load_volume(files)
    assert np.max(np.abs(vol.hu - study.hu)) <= 0.5 + 1e-3
    np.testing.assert_allclose(vol.affine, study.affine, atol=1e-3)


def test_duplicate_position_kept_once_and_reported(phantom, tmp_path):
    study, paths = phantom
    files = _copy_ct(paths, tmp_path)
    ds = pydicom.dcmread(files[7])
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    dup = tmp_path / "duplicate.dcm"
    ds.save_as(dup)
    vol = load_volume(files + [dup])
    assert vol.hu.shape == study.hu.shape
    assert vol.report.kinds() == ["duplicate_position"] and len(vol.report.dropped) == 1
    assert np.max(np.abs(vol.hu - study.hu)) <= 0.5 + 1e-3


def test_gap_reported_and_resampled(phantom):
    study, paths = phantom
    # InstanceNumber 1 is the top slice: drop array slices k = 10, 11 (instances 14, 13)
    nz = study.hu.shape[0]
    drop = {nz - 10, nz - 11}
    files = [p for n, p in enumerate(paths.ct_files, start=1) if n not in drop]
    vol = load_volume(files)
    assert set(vol.report.kinds()) == {"gap", "instance_number_gap"}
    gaps = [p for p in vol.report.problems if p.kind == "gap"]
    assert len(gaps) == 1 and gaps[0].count == 2 and "2 slice(s) missing" in gaps[0].detail
    assert vol.report.resampled and vol.hu.shape == study.hu.shape
    np.testing.assert_allclose(vol.affine, study.affine, atol=1e-3)
    # untouched slices exact, filled ones linear between the neighbours
    assert np.max(np.abs(vol.hu[9] - study.hu[9])) <= 0.51
    expected = study.hu[9] + (study.hu[12] - study.hu[9]) / 3
    assert np.max(np.abs(vol.hu[10] - expected)) <= 1.0

    raw = load_volume(files, resample_gaps=False)
    assert raw.hu.shape[0] == nz - 2 and not raw.report.resampled and raw.report.has("gap")
    assert raw.report.slice_positions_mm[10] - raw.report.slice_positions_mm[9] == pytest.approx(3 * study.spacing[0])


def test_localizer_filed_inside_the_axial_series_is_ignored(phantom, tmp_path):
    study, paths = phantom
    scout = pydicom.dcmread(paths.localizer_files[0], stop_before_pixels=True)
    scout.SeriesInstanceUID = study.uids["ct_series"]
    ct = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths.ct_files]
    choice = select_ct_series({study.uids["ct_series"]: ct + [scout]})
    assert choice.ok and len(choice.instances) == 24 and "1 LOCALIZER instance(s) in the series ignored" in choice.reason


def test_mixed_series_and_mixed_sizes_are_fatal(phantom, tmp_path):
    study, paths = phantom
    with pytest.raises(MixedSeriesError, match="2 series"):
        load_volume(list(paths.ct_files) + list(paths.localizer_files))
    ds = pydicom.dcmread(paths.ct_files[3])
    ds.Rows, ds.Columns = 32, 32
    ds.PixelData = np.zeros((32, 32), "<i2").tobytes()
    ds.save_as(tmp_path / "small.dcm")
    files = [p for n, p in enumerate(paths.ct_files) if n != 3] + [tmp_path / "small.dcm"]
    with pytest.raises(InconsistentGeometryError, match="different sizes"):
        load_volume(files)
    with pytest.raises(NoImageError):
        load_volume([])


def test_selector_rejects_non_axial_non_ct_and_unreadable(phantom, tmp_path):
    study, paths = phantom
    series: dict[str, list] = {"ct": [pydicom.dcmread(p, stop_before_pixels=True) for p in paths.ct_files]}
    sag = []
    for p in paths.ct_files[:10]:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        ds.SeriesInstanceUID = "1.2.3.44"
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        sag.append(ds)
    series["sag"] = sag
    mr = []
    for p in paths.ct_files[:30]:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        ds.SeriesInstanceUID, ds.Modality = "1.2.3.55", "MR"
        mr.append(ds)
    series["mr"] = mr
    bad = tmp_path / "garbage.dcm"
    bad.write_bytes(b"not dicom at all")
    series["bad"] = [bad]
    choice = select_ct_series(series)
    assert choice.series_uid == "ct" and len(choice.instances) == 24
    reasons = {r.series_uid: r.reason for r in choice.rejected}
    assert "sagittal" in reasons["sag"]
    assert "not CT" in reasons["mr"]
    assert "not a readable DICOM file" in reasons["bad"]


def _enhanced_ct(n_frames: int, size: int, positions_z: list[float], series_uid: str) -> Dataset:
    """A small Enhanced CT multi-frame image with per-frame positions and shared orientation/spacing/rescale."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENHANCED_CT
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = ENHANCED_CT, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), series_uid, generate_uid()
    ds.Modality, ds.ImageType = "CT", ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.SeriesNumber, ds.InstanceNumber = 5, 1
    ds.Rows = ds.Columns = size
    ds.NumberOfFrames = n_frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = Sequence([orient])
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.8, 0.7], 1.5
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for f, z in enumerate(positions_z):
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [-10.0, -20.0, z]
        item.PlanePositionSequence = Sequence([pos])
        pvt = Dataset()  # per-frame rescale: frame f has slope 1 and intercept -1000 - f
        pvt.RescaleIntercept, pvt.RescaleSlope, pvt.RescaleType = -1000 - f, 1, "HU"
        item.PixelValueTransformationSequence = Sequence([pvt])
        ftype = Dataset()
        ftype.FrameType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
        item.CTImageFrameTypeSequence = Sequence([ftype])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    pixels = np.stack([np.full((size, size), 1000 + 10 * f, np.uint16) for f in range(n_frames)])
    ds.PixelData = pixels.tobytes()
    return ds


def test_enhanced_multiframe_loaded_sorted_by_position(tmp_path):
    zs = [12.0, 0.0, 6.0, 3.0, 9.0, 15.0]  # frames stored out of order
    ds = _enhanced_ct(6, 16, zs, "1.2.3.66")
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path, enforce_file_format=True)
    choice = select_ct_series([path])
    assert choice.ok and choice.slices == 6
    vol = load_volume(choice.instances)
    assert vol.hu.shape == (6, 16, 16)
    assert vol.spacing == pytest.approx((3.0, 0.8, 0.7))
    order = np.argsort(zs)  # frame f holds stored 1000+10f, HU = stored - 1000 - f = 9f
    np.testing.assert_allclose(vol.hu[:, 0, 0], [9.0 * f for f in order])
    np.testing.assert_allclose(vol.origin, [-10.0, -20.0, 0.0])
    assert vol.affine[2, 2] == pytest.approx(3.0) and vol.affine[0, 0] == pytest.approx(0.7)


def test_real_jpeg2000_series_with_blank_uids():
    folder = totalseg_example_dicom_dir()
    files = dicom_files(folder)
    assert len(files) == 20
    groups = group_by_series(files)
    assert len(groups) == 1  # blank SeriesInstanceUID grouped by a stand-in key
    choice, vol = load_series_from_folder(folder)
    assert choice.slices == 20
    assert vol.hu.shape == (20, 512, 512)
    # 2 mm apart from the positions although SliceThickness says 3 mm
    assert vol.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
    assert {"missing_sop_class", "missing_uid"} <= set(vol.report.kinds())
    assert vol.hu.min() >= -1024 and vol.hu.max() > 800  # bone present
    body = vol.hu[10][200:300, 200:300]
    assert -200 < float(np.median(body)) < 200  # soft tissue in the middle of the body
