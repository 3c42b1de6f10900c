"""Synthetic CT phantom: anatomy, findings, determinism, DICOM output, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner

from omnict_core.phantom import (FINDING_TYPES, LABEL_IDS, LUNG_LOBES, FindingSpec, PhantomSpec, generate_study,
                                 parse_finding, random_spec, write_dicom_study)
from omnict_node.cli import main as node_cli

SMALL = dict(slices=24, size=96)


@pytest.fixture(scope="module")
def plain():
    return generate_study(PhantomSpec(seed=5, noise_hu=0, **SMALL))


def _median_hu(study, name):
    return float(np.median(study.hu[study.labels == LABEL_IDS[name]]))


def test_anatomy_labels_and_hu(plain):
    s = plain
    assert s.hu.shape == (24, 96, 96) and s.hu.dtype == np.float32 and s.labels.dtype == np.uint8
    present = s.labels_present()
    required = list(LUNG_LOBES) + ["trachea", "heart", "aorta", "liver", "spleen", "kidney_left", "kidney_right",
                                   "pancreas", "stomach", "esophagus", "gallbladder", "rib_left_5", "rib_right_5",
                                   "vertebrae_T8", "vertebrae_L1", "sternum", "spinal_cord"]
    assert not [n for n in required if n not in present], present
    assert _median_hu(s, "lung_upper_lobe_left") < -750
    assert 45 < _median_hu(s, "liver") < 75
    assert 30 < _median_hu(s, "spleen") < 65
    assert -130 < _median_hu(s, "subcutaneous_fat") < -70
    assert _median_hu(s, "vertebrae_T8") > 150
    assert s.hu[:, 0, 0].max() < -900  # air in the corner
    # anatomical sanity: the liver is on the patient's right (-x), the spleen on the left, lungs above the kidneys
    com = {n: s.voxel_to_patient(np.argwhere(s.labels == LABEL_IDS[n]).mean(0)) for n in ("liver", "spleen", "kidney_left", "heart")}
    assert com["liver"][0] < 0 < com["spleen"][0]
    assert com["heart"][2] > com["kidney_left"][2] + 80


def test_same_spec_same_pixels_and_uids_and_anatomy_independent_of_findings(plain):
    again = generate_study(PhantomSpec(seed=5, noise_hu=0, **SMALL))
    assert np.array_equal(again.hu, plain.hu) and again.uids == plain.uids
    other = generate_study(PhantomSpec(seed=6, noise_hu=0, **SMALL))
    assert other.uids["study"] != plain.uids["study"] and not np.array_equal(other.labels, plain.labels)
    with_nodule = generate_study(PhantomSpec(seed=5, noise_hu=0, findings=["lung_nodule:size_mm=10"], **SMALL))
    assert np.array_equal(with_nodule.labels, plain.labels)  # a nodule changes HU, not the organs
    assert with_nodule.uids["study"] != plain.uids["study"]


def test_same_patient_at_a_different_sampling():
    coarse = generate_study(PhantomSpec(seed=9, slices=16, size=64, noise_hu=0))
    fine = generate_study(PhantomSpec(seed=9, slices=48, size=160, noise_hu=0))
    for name in ("liver", "heart", "kidney_right", "aorta"):
        c = [s.voxel_to_patient(np.argwhere(s.labels == LABEL_IDS[name]).mean(0)) for s in (coarse, fine)]
        assert np.linalg.norm(c[0] - c[1]) < 6.0, name
        vols = [np.count_nonzero(s.labels == LABEL_IDS[name]) * np.prod(s.spacing) for s in (coarse, fine)]
        assert abs(vols[0] - vols[1]) / vols[1] < 0.2, name


def test_noise_level_matches_request():
    s = generate_study(PhantomSpec(seed=2, noise_hu=15, texture=False, **SMALL))
    ref = generate_study(PhantomSpec(seed=2, noise_hu=0, texture=False, **SMALL))
    sd = float(np.std(s.hu - ref.hu))
    assert 13.0 < sd < 17.0


CHECKS = {
    "lung_nodule": ("lung_nodule:size_mm=14,kind=solid", lambda hu: np.median(hu) > -300),
    "pleural_effusion": ("pleural_effusion:side=right,amount=moderate", lambda hu: -30 < np.median(hu) < 50),
    "pneumothorax": ("pneumothorax:side=left,amount=large", lambda hu: np.median(hu) < -950),
    "emphysema": ("emphysema:severity=severe", lambda hu: np.median(hu) < -930),
    "consolidation": ("consolidation:extent=lobar,lobe=lung_lower_lobe_right", lambda hu: np.median(hu) > -200),
    "liver_lesion": ("liver_lesion:size_mm=30,kind=cyst", lambda hu: np.median(hu) < 30),
    "kidney_stone": ("kidney_stone:size_mm=10,side=left", lambda hu: np.max(hu) > 400),
    "splenomegaly": ("splenomegaly:scale=1.7", lambda hu: 30 < np.median(hu) < 65),
    "ascites": ("ascites:amount=large", lambda hu: -30 < np.median(hu) < 50),
    "pericardial_effusion": ("pericardial_effusion:amount=large", lambda hu: -30 < np.median(hu) < 50),
    "lymph_node": ("lymph_node:station=retroperitoneal,size_mm=25", lambda hu: 0 < np.median(hu) < 80),
}


def test_every_finding_type_is_checked():
    assert set(CHECKS) == set(FINDING_TYPES)


@pytest.mark.parametrize("kind", sorted(CHECKS))
def test_finding_is_rendered_where_reported(kind):
    text, hu_ok = CHECKS[kind]
    s = generate_study(PhantomSpec(seed=21, slices=32, size=96, noise_hu=0, findings=[text]))
    [f] = s.findings
    assert f.type == kind and f.visible and f.voxels > 0
    mask = s.finding_mask == f.index
    assert mask.sum() == f.voxels
    assert hu_ok(s.hu[mask]), (kind, float(np.median(s.hu[mask])))
    # the reported centre is in patient coordinates consistent with its voxel coordinates
    np.testing.assert_allclose(s.voxel_to_patient(f.center_voxel), f.center_patient, atol=1e-6)
    if kind in ("lung_nodule", "liver_lesion", "kidney_stone", "lymph_node"):
        centroid = s.voxel_to_patient(np.argwhere(mask).mean(0))
        assert np.linalg.norm(centroid - np.array(f.center_patient)) < max(f.size_mm, max(s.spacing)), kind
    if kind == "lung_nodule":
        assert f.location in LUNG_LOBES
        labels_there = s.labels[mask]
        assert np.all(labels_there == LABEL_IDS[f.location])
    if kind == "splenomegaly":
        plain = generate_study(PhantomSpec(seed=21, slices=32, size=96, noise_hu=0))
        grown = np.count_nonzero(s.labels == LABEL_IDS["spleen"]) / np.count_nonzero(plain.labels == LABEL_IDS["spleen"])
        assert grown > 1.8 and f.size_mm > 130


def test_small_stone_at_thick_slices_is_documented():
    s = generate_study(PhantomSpec(seed=3, slices=32, size=96, noise_hu=0, findings=["kidney_stone:size_mm=2,hu=1000"]))
    [f] = s.findings
    assert s.spacing[0] == 10.0 and "partial-volume" in f.note
    assert f.params["expected_peak_hu"] < 300
    if f.voxels:  # whatever survived is far below the true stone density
        assert s.hu[s.finding_mask == f.index].max() < 700


def test_parse_finding_and_errors():
    fs = parse_finding("lung_nodule:lobe=lung_upper_lobe_right,size_mm=8")
    assert fs.type == "lung_nodule" and fs.params == {"lobe": "lung_upper_lobe_right", "size_mm": 8.0}
    for bad, msg in [("tumour", "unknown finding type"), ("lung_nodule:colour=red", "unknown parameter"),
                     ("lung_nodule:lobe=lung_left", "not one of"), ("kidney_stone:size_mm=big", "not a number"),
                     ("kidney_stone:size_mm=90", "outside the supported range")]:
        with pytest.raises(ValueError, match=msg):
            parse_finding(bad)
    with pytest.raises(ValueError, match="unknown parameter"):
        PhantomSpec(findings=[FindingSpec("lung_nodule", {"size": 8})])


def test_random_spec_is_seeded_and_valid():
    a = random_spec(np.random.default_rng(4), slices=16, size=64)
    b = random_spec(np.random.default_rng(4), slices=16, size=64)
    assert a == b and 0 <= len(a.findings) <= 3
    counts = [len(random_spec(np.random.default_rng(i)).findings) for i in range(40)]
    assert min(counts) == 0 and max(counts) == 3
    study = generate_study(a)
    assert len(study.findings) == len(a.findings)


def test_dicom_files_and_ground_truth(tmp_path):
    s = generate_study(PhantomSpec(seed=8, slices=12, size=64, findings=["liver_lesion:size_mm=20"]))
    paths = write_dicom_study(s, tmp_path / "a")
    assert len(paths.ct_files) == 12 and len(paths.localizer_files) == 2
    first = pydicom.dcmread(paths.ct_files[0])
    last = pydicom.dcmread(paths.ct_files[-1])
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first.SOPClassUID == pydicom.uid.CTImageStorage and list(first.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert first.InstanceNumber == 1 and float(first.ImagePositionPatient[2]) > float(last.ImagePositionPatient[2])
    assert first.pixel_array.dtype == np.int16 and float(first.RescaleIntercept) == -1024
    np.testing.assert_allclose(first.pixel_array * float(first.RescaleSlope) + float(first.RescaleIntercept),
                               np.round(s.hu[-1]), atol=0.5)
    loc = pydicom.dcmread(paths.localizer_files[0])
    assert "LOCALIZER" in loc.ImageType and loc.SeriesInstanceUID == s.uids["localizer_series"]
    gt = json.loads(paths.ground_truth.read_text())
    assert gt["study_instance_uid"] == s.uids["study"] == first.StudyInstanceUID
    assert gt["series"]["ct"]["series_instance_uid"] == first.SeriesInstanceUID
    assert np.array_equal(np.load(tmp_path / "a" / gt["labels"]["path"]), s.labels)
    assert gt["labels"]["names"][str(LABEL_IDS["liver"])] == "liver"
    [f] = gt["findings"]
    assert f["type"] == "liver_lesion" and f["location"] == "liver" and len(f["center_patient_mm"]) == 3
    # same spec -> same UIDs in a second write
    again = write_dicom_study(generate_study(PhantomSpec(seed=8, slices=12, size=64, findings=["liver_lesion:size_mm=20"])),
                              tmp_path / "b")
    assert pydicom.dcmread(again.ct_files[5]).SOPInstanceUID == pydicom.dcmread(paths.ct_files[5]).SOPInstanceUID
    if shutil.which("dciodvfy"):
        for p in (paths.ct_files[0], paths.localizer_files[0]):
            out = subprocess.run(["dciodvfy", str(p)], capture_output=True, text=True)
            errors = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]
            assert errors == [], errors


def test_cli_phantom(tmp_path):
    runner = CliRunner()
    res = runner.invoke(node_cli, ["phantom", "--out", str(tmp_path / "s"), "--slices", "8", "--size", "48", "--seed",
                                   "3", "--finding", "lung_nodule:lobe=lung_upper_lobe_right,size_mm=12",
                                   "--finding", "kidney_stone:side=left", "--nifti"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["ct_files"] == 8 and summary["localizer_files"] == 2
    assert [f["type"] for f in summary["findings"]] == ["lung_nodule", "kidney_stone"]
    assert len(list((tmp_path / "s" / "CT").glob("*.dcm"))) == 8
    import nibabel as nib

    nii = nib.load(tmp_path / "s" / "labels.nii.gz")
    labels = np.load(tmp_path / "s" / "labels.npy")
    assert nii.shape == labels.shape[::-1]  # NIfTI (x, y, z)
    assert np.array_equal(np.asarray(nii.dataobj).transpose(2, 1, 0), labels)
    assert nii.affine[0, 0] < 0 and nii.affine[2, 2] > 0  # RAS: x flipped from LPS
    bad = runner.invoke(node_cli, ["phantom", "--out", str(tmp_path / "x"), "--finding", "lung_nodule:lobe=nowhere"])
    assert bad.exit_code == 2 and "not one of" in bad.output
    listing = runner.invoke(node_cli, ["phantom", "--out", str(tmp_path / "y"), "--list-findings"])
    assert listing.exit_code == 0 and "kidney_stone" in listing.output
