"""The result objects for a real CT: TotalSegmentator's 20-slice example series (512×512, JPEG 2000) and the
organ segmentation TotalSegmentator itself produced for it (``example_seg_dicom.nii.gz`` in the same sdist)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from reports import AlgorithmInfo, OrganMeasurement, RunIdentity, SourceSeries, VqaAnswer, build_result_objects
from reports.coding import FINDINGS, PRESENT
from tests.reports import dicom_tools

# TotalSegmentator "total" task label values present in the example's segmentation (map_to_binary.class_map)
ORGAN_LABELS = {1: "spleen", 5: "liver", 6: "stomach", 8: "adrenal_gland_right", 52: "aorta"}
SOURCE_LOCAL_SCHEME = re.compile(r"Unrecognized defined term <SECTRA> for value 1 of attribute <Coding Scheme")
_CACHED_SDIST = Path(__file__).resolve().parents[2] / ".cache/totalseg/totalsegmentator-2.18.0"


def example_dicom_dir() -> Path:
    try:
        from tests.realdata import totalseg_example_dicom_dir
    except ImportError:  # the shared helper is not there yet: use the sdist if this checkout has it unpacked
        candidate = _CACHED_SDIST / "tests/reference_files/example_ct_dicom"
        if not candidate.is_dir():
            pytest.skip("no real CT: tests/realdata.py missing and the TotalSegmentator sdist is not unpacked")
        return candidate
    return Path(totalseg_example_dicom_dir())


def load_deidentified_series(directory: Path) -> list[pydicom.Dataset]:
    """The example's de-identification blanked the SOP Instance, Study and Series UIDs (and the SOP Class UID,
    which SourceSeries fills for CT): restore them the way a sender would have to before storing it."""
    datasets = [pydicom.dcmread(p) for p in sorted(directory.iterdir()) if p.is_file()]
    frame = str(datasets[0].FrameOfReferenceUID)
    study = generate_uid(entropy_srcs=["study", frame])
    series = generate_uid(entropy_srcs=["series", frame])
    for ds in datasets:
        if not ds.get("SOPInstanceUID"):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = ds.get("StudyInstanceUID") or study
        ds.SeriesInstanceUID = ds.get("SeriesInstanceUID") or series
        ds.SeriesNumber = ds.get("SeriesNumber") or 1
    return datasets


def label_map_on_dicom_grid(nifti: Path, source: SourceSeries) -> np.ndarray:
    """Nearest-neighbour sample of a NIfTI label volume (RAS) at every DICOM pixel centre (LPS)."""
    image = nib.load(str(nifti))
    labels = np.asarray(image.dataobj)
    world_to_voxel = np.linalg.inv(image.affine)
    out = np.zeros(source.shape, dtype=np.uint8)
    _, rows, columns = source.shape
    r, c = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    for index, ds in enumerate(source.datasets):
        orientation = np.asarray(ds.ImageOrientationPatient, float)
        row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
        lps = (
            np.asarray(ds.ImagePositionPatient, float)
            + c.reshape(-1, 1) * column_spacing * orientation[:3]
            + r.reshape(-1, 1) * row_spacing * orientation[3:]
        )
        ras = lps * np.array([-1.0, -1.0, 1.0])
        ijk = np.rint((world_to_voxel @ np.c_[ras, np.ones(len(ras))].T)[:3].T).astype(int)
        inside = np.all((ijk >= 0) & (ijk < labels.shape), axis=1)
        assert inside.all(), "segmentation does not cover the DICOM grid: wrong geometry"
        out[index] = labels[ijk[:, 0], ijk[:, 1], ijk[:, 2]].reshape(rows, columns)
    return out


def test_real_ct_results_validate(tmp_path: Path) -> None:
    dicom_dir = example_dicom_dir()
    nifti = dicom_dir.parent / "example_seg_dicom.nii.gz"
    if not nifti.is_file():
        pytest.skip(f"{nifti} missing")
    datasets = load_deidentified_series(dicom_dir)
    source = SourceSeries.from_datasets(datasets)
    assert source.shape == (20, 512, 512) and source.sop_class_uid == pydicom.uid.CTImageStorage
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in source.datasets])
    label_map = label_map_on_dicom_grid(nifti, source)
    slice_spacing = abs(float(source.datasets[1].ImagePositionPatient[2]) - float(source.first.ImagePositionPatient[2]))
    voxel_ml = float(np.prod([float(v) for v in source.first.PixelSpacing])) * slice_spacing / 1000.0
    organs = [
        OrganMeasurement(
            label_name=name,
            label_value=value,
            volume_ml=float((label_map == value).sum() * voxel_ml),
            mean_hu=float(hu[label_map == value].mean()),
            std_hu=float(hu[label_map == value].std()),
        )
        for value, name in ORGAN_LABELS.items()
    ]
    liver = next(o for o in organs if o.label_name == "liver")
    assert 0 < liver.mean_hu < 200, "liver attenuation off: the label map is misaligned with the CT"
    run = RunIdentity(source.study_instance_uid, "realdata-1", datetime(2026, 11, 22, tzinfo=UTC))
    # the answers are made up (no model here); what is real is the CT, its segmentation and the measurements
    answers = [
        VqaAnswer(
            "Is there splenomegaly?",
            "No, the spleen is of normal size.",
            finding=FINDINGS["splenomegaly"],
            finding_site="spleen",
            key_images=(10,),
        ),
        VqaAnswer(
            "Is there a liver lesion?",
            "A small hypodense liver lesion.",
            coded_answer=PRESENT,
            finding=FINDINGS["liver_lesion"],
            finding_site="liver",
            key_images=(8, 9),
            urgency="urgent",
        ),
    ]
    objects = build_result_objects(
        source,
        label_map,
        organs,
        answers,
        AlgorithmInfo("OmniCT-7B", "0.3.1"),
        run,
        segmentation_algorithm=AlgorithmInfo("TotalSegmentator", "2.18.0", {"task": "total", "fast": "true"}),
    )
    for path in objects.write(tmp_path):
        verdict = dicom_tools.dciodvfy(path)
        assert verdict.errors == [], verdict.output
        # the source's Procedure Code Sequence (copied into the SEG by highdicom) uses the hospital's local scheme
        assert verdict.warnings_except(SOURCE_LOCAL_SCHEME) == [], verdict.output
        if path.name.startswith(("SR_", "KO_")):
            dump = dicom_tools.dsrdump(path)
            assert dump.returncode == 0, dump.stderr
    seg = hd.seg.segread(next(tmp_path.glob("SEG_*.dcm")))
    liver_number = objects.measured.segmentation.segment_numbers["liver"]
    mask = seg.get_pixels_by_source_instance(list(source.sop_instance_uids), segment_numbers=[liver_number])[..., 0]
    np.testing.assert_array_equal(mask.astype(bool), label_map == 5)
    sr = pydicom.dcmread(objects.write(tmp_path / "again")[1])  # datasets(): SEG, then the measurement SR
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    volumes = [
        float(item.MeasuredValueSequence[0].NumericValue)
        for item in dicom_tools.content_items(sr)
        if dicom_tools.concept(item) == ("118565006", "SCT")
    ]
    assert volumes == pytest.approx([o.volume_ml for o in organs], rel=1e-9)
