"""Organ segmentation: the classical backend on real CT (against TotalSegmentator's own reference output shipped
in its sdist), on the phantom, orientation handling, measurements, bad input, the CLI, and the TotalSegmentator
backend's real nnU-Net code path with a tiny checkpoint this test builds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from omnict_core.segmentation import SegmentationError, make_segmenter, measure_organs
from omnict_core.segmentation.base import reorient
from omnict_core.segmentation.classical import ClassicalSegmenter

LUNG_LEFT = ["lung_upper_lobe_left", "lung_lower_lobe_left"]
LUNG_RIGHT = ["lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"]


def _reference_files() -> Path:
    """Real CT from the TotalSegmentator sdist (Apache-2.0), fetched once into .cache/ by the shared helper."""
    from tests.realdata import totalseg_sdist_dir

    return totalseg_sdist_dir() / "tests" / "reference_files"


@pytest.fixture(scope="module")
def reference_files() -> Path:
    return _reference_files()


def _load_nifti(path: Path) -> tuple[np.ndarray, tuple[float, float, float], tuple[str, str, str]]:
    from omnict_core.segmentation.cli import load_input

    hu, spacing, codes, _ = load_input(path)
    return hu, spacing, codes


def _total_names() -> dict[str, int]:
    from omnict_core.segmentation.base import TOTAL_LABELS

    return {name: value for value, name in TOTAL_LABELS.items()}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))


def _lps_centroid(mask: np.ndarray, codes: tuple[str, ...]) -> np.ndarray:
    """Centroid in a canonical (S, P, L) index frame, so '+x' means the patient's left whatever the input."""
    canonical = reorient(mask, codes, ("S", "P", "L"))
    return np.array([c.mean() for c in np.nonzero(canonical)])


# ----------------------------------------------------------------------------------------------------------------
# Classical backend on real CT


def test_classical_matches_totalsegmentator_reference_on_real_abdominal_ct(reference_files: Path) -> None:
    """example_ct.nii.gz (3 mm, abdomen/pelvis with the lung bases) against TotalSegmentator's own fast output."""
    hu, spacing, codes = _load_nifti(reference_files / "example_ct.nii.gz")
    reference, _, ref_codes = _load_nifti(reference_files / "example_seg_fast_force_split.nii.gz")
    assert ref_codes == codes and reference.shape == hu.shape
    result = ClassicalSegmenter().segment(hu, spacing, codes)
    assert result.label_map.shape == hu.shape and result.label_map.dtype == np.uint8
    total = _total_names()

    def ref(names: list[str]) -> np.ndarray:
        return np.isin(reference, [total[n] for n in names])

    vertebrae = [n for n in total if n.startswith("vertebrae_")] + ["sacrum"]
    # Measured (see the final report): lungs 0.953/0.958, liver 0.871, spleen 0.919, kidneys 0.889 (left) and
    # 0.712 (right), vertebrae 0.718. The thresholds leave a small margin below those.
    expected = {"lung_left": (LUNG_LEFT, 0.90), "lung_right": (LUNG_RIGHT, 0.90), "liver": (["liver"], 0.82),
                "spleen": (["spleen"], 0.85), "kidney_left": (["kidney_left"], 0.80),
                "kidney_right": (["kidney_right"], 0.62), "vertebrae": (vertebrae, 0.65)}
    scores = {name: _dice(result.mask(name), ref(parts)) for name, (parts, _) in expected.items()}
    assert all(scores[name] >= floor for name, (_, floor) in expected.items()), scores
    # Bowel gas (colon, 1.6 L of bowel here) is not taken for lung, and no trachea is invented below the chest.
    assert "trachea" not in result.names
    colon_air = ref(["colon"]) & (hu < -400)
    assert not (result.mask("lung_left") | result.mask("lung_right"))[colon_air].any()


def test_classical_liver_on_real_dicom_series(reference_files: Path) -> None:
    """The 20-slice 512x512 DICOM series (JPEG 2000) through the CLI's DICOM reader; liver against the reference."""
    from omnict_core.segmentation.cli import load_input

    hu, spacing, codes, _ = load_input(reference_files / "example_ct_dicom")
    assert hu.shape == (20, 512, 512) and codes == ("S", "P", "L")
    reference, _, ref_codes = _load_nifti(reference_files / "example_seg_dicom.nii.gz")
    reference = reorient(reference, ref_codes, codes)
    result = ClassicalSegmenter().segment(hu, spacing, codes)
    total = _total_names()
    assert _dice(result.mask("liver"), reference == total["liver"]) >= 0.87  # measured 0.924
    assert _dice(result.mask("spleen"), reference == total["spleen"]) >= 0.85  # measured 0.902
    assert not {"kidney_left", "kidney_right", "lung_left", "lung_right"} & set(result.names)  # none in this slab


def test_classical_chest_ct_is_anatomically_plausible(reference_files: Path) -> None:
    """1.5 mm chest/abdomen CTA (LPS NIfTI): no lung reference ships, so check anatomy instead."""
    hu, spacing, codes = _load_nifti(reference_files / "aorta_report" / "example_ct.nii.gz")
    result = ClassicalSegmenter().segment(hu, spacing, codes)
    organs = measure_organs(result.label_map, hu, spacing, result.labels)
    for side in ("lung_left", "lung_right"):
        assert 1000.0 <= organs[side].volume_ml <= 4000.0, organs[side]
        assert -900.0 <= organs[side].hu_mean <= -600.0
    left, right = _lps_centroid(result.mask("lung_left"), codes), _lps_centroid(result.mask("lung_right"), codes)
    assert left[2] > right[2] + 30  # the left lung lies on the patient's left
    trachea = _lps_centroid(result.mask("trachea"), codes)
    assert right[2] < trachea[2] < left[2]  # midline, between the lungs
    assert trachea[0] > max(left[0], right[0])  # above the lungs' centre, i.e. ends above the carina region
    assert 10.0 <= organs["trachea"].volume_ml <= 80.0
    assert organs["trachea"].hu_mean < -700.0
    assert organs["vertebrae"].hu_mean > 150.0
    # TotalSegmentator's heart for this CT ships in its pulmonary_report reference: measured Dice 0.758.
    heart, _, heart_codes = _load_nifti(reference_files / "pulmonary_report" / "models" / "heart.nii.gz")
    assert heart_codes == codes and heart.shape == hu.shape
    assert _dice(result.mask("heart"), heart > 0) >= 0.70
    assert 200.0 <= organs["heart"].volume_ml <= 1200.0


def test_classical_follows_the_input_orientation(reference_files: Path) -> None:
    """The same CT given with axes flipped and permuted yields the same labels, flipped and permuted alike."""
    hu, spacing, codes = _load_nifti(reference_files / "example_ct.nii.gz")
    base = ClassicalSegmenter().segment(hu, spacing, codes)
    flipped_codes = ("I", codes[2], {"A": "P", "P": "A"}[codes[1]])
    flipped = reorient(hu, codes, flipped_codes)
    spacing_flipped = (spacing[0], spacing[2], spacing[1])
    other = ClassicalSegmenter().segment(np.ascontiguousarray(flipped), spacing_flipped, flipped_codes)
    assert set(other.names) == set(base.names)
    back = reorient(other.label_map, flipped_codes, codes)
    assert _dice(back == base.value_of("lung_left"), base.mask("lung_left")) > 0.98


def test_classical_on_phantom_matches_ground_truth() -> None:
    from omnict_core.phantom import LABELS, PhantomSpec, generate_study

    study = generate_study(PhantomSpec(seed=3, slices=48, size=128))
    result = ClassicalSegmenter().segment(study.hu, study.spacing, ("S", "P", "L"))
    ids = {name: value for value, name in LABELS.items()}
    # Measured on this phantom: lungs 0.96/0.97, liver 0.88, heart 0.87.
    expected = {"lung_left": (LUNG_LEFT, 0.9), "lung_right": (LUNG_RIGHT, 0.9), "liver": (["liver"], 0.8),
                "heart": (["heart"], 0.75)}
    scores = {name: _dice(result.mask(name), np.isin(study.labels, [ids[n] for n in parts]))
              for name, (parts, _) in expected.items()}
    assert all(scores[name] >= floor for name, (_, floor) in expected.items()), scores


def test_classical_returns_only_what_it_finds() -> None:
    """A water cylinder in air: a body, and no lungs, trachea or liver made up."""
    z, y, x = np.mgrid[0:40, 0:96, 0:96]
    hu = np.where((y - 48) ** 2 + (x - 48) ** 2 < 35 ** 2, 0.0, -1000.0).astype(np.float32)
    result = ClassicalSegmenter().segment(hu, (3.0, 3.0, 3.0), ("S", "P", "L"))
    assert result.names == ["body"]
    assert result.mask("body").sum() == int(((y - 48) ** 2 + (x - 48) ** 2 < 35 ** 2).sum())


# ----------------------------------------------------------------------------------------------------------------
# Measurements and bad input


def test_measurements_volume_and_hu_statistics() -> None:
    label_map = np.zeros((4, 10, 10), np.uint8)
    hu = np.zeros((4, 10, 10), np.float32)
    label_map[:, :5, :] = 10  # lung_upper_lobe_left: 200 voxels
    hu[:, :5, :] = np.where(np.arange(10) % 2 == 0, -900.0, -700.0)[None, None, :]
    label_map[:, 5:, :2] = 11  # lung_lower_lobe_left: 40 voxels
    hu[:, 5:, :2] = -800.0
    organs = measure_organs(label_map, hu, (2.0, 1.0, 1.0),
                            {10: "lung_upper_lobe_left", 11: "lung_lower_lobe_left"})
    upper = organs["lung_upper_lobe_left"]
    assert upper.voxels == 200 and upper.volume_ml == pytest.approx(0.4)
    assert upper.hu_mean == pytest.approx(-800.0) and upper.hu_std == pytest.approx(100.0)
    combined = organs["lung_left"]
    assert combined.combined and combined.voxels == 240 and combined.volume_ml == pytest.approx(0.48)
    assert combined.hu_mean == pytest.approx(-800.0)
    with pytest.raises(ValueError, match="not aligned"):
        measure_organs(label_map, hu[:2], (1, 1, 1), {10: "x"})


def test_measurements_in_slabs_equal_whole_volume_sums(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sums over slabs of planes (a last partial slab, labels absent from a slab, a label not asked for, a label
    value above the largest asked) give each organ's count, mean and std of the whole volume."""
    from omnict_core.segmentation import measurements

    rng = np.random.default_rng(0)
    label_map = rng.choice(np.array([0, 3, 7, 200], np.uint8), size=(7, 6, 5), p=[0.4, 0.3, 0.2, 0.1])
    label_map[:3][label_map[:3] == 7] = 0  # label 7 only in later slabs
    hu = rng.normal(0.0, 300.0, size=label_map.shape).astype(np.float32)
    monkeypatch.setattr(measurements, "SLAB_VOXELS", 2 * 6 * 5)  # 2 planes a slab: 4 slabs, the last of 1 plane
    organs = measure_organs(label_map, hu, (1.0, 1.0, 1.0), {3: "liver", 7: "spleen"}, add_combined=False)
    for value, name in ((3, "liver"), (7, "spleen")):
        inside = hu[label_map == value].astype(np.float64)
        assert organs[name].voxels == inside.size
        assert organs[name].hu_mean == pytest.approx(round(inside.mean(), 2), abs=0.011)
        assert organs[name].hu_std == pytest.approx(round(inside.std(), 2), abs=0.011)


@pytest.mark.parametrize("hu, spacing, codes, message", [
    (np.zeros((10, 10)), (1, 1, 1), ("S", "P", "L"), "3-D"),
    (np.zeros((4, 10, 10)), (0, 1, 1), ("S", "P", "L"), "spacing"),
    (np.zeros((4, 10, 10)), (1, 1, 1), ("S", "S", "L"), "axis_codes"),
])
def test_bad_input_is_refused_clearly(hu, spacing, codes, message) -> None:
    with pytest.raises(SegmentationError, match=message):
        ClassicalSegmenter().segment(hu, spacing, codes)


def test_unknown_backend_and_missing_weights_name_the_problem(tmp_path: Path) -> None:
    from omnict_core.segmentation.totalseg import MissingWeightsError

    with pytest.raises(SegmentationError, match="unknown segmentation backend"):
        make_segmenter("magic")
    expected = (tmp_path / "Dataset297_TotalSegmentator_total_3mm_1559subj"
                / "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres" / "dataset.json")
    with pytest.raises(MissingWeightsError, match=str(expected).replace(".", r"\.")):
        make_segmenter("totalsegmentator", weights_dir=tmp_path)
    with pytest.raises(MissingWeightsError, match="never downloaded"):
        make_segmenter("totalsegmentator", weights_dir=None)
    assert not any(tmp_path.iterdir())  # nothing created, nothing fetched


# ----------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_segment_writes_label_map_and_measurements(reference_files: Path, tmp_path: Path) -> None:
    import nibabel as nib
    from click.testing import CliRunner

    from omnict_node.cli import main

    source = reference_files / "example_ct.nii.gz"
    output = tmp_path / "seg" / "example.nii.gz"
    run = CliRunner().invoke(main, ["segment", str(source), "-o", str(output), "--backend", "classical"])
    assert run.exit_code == 0, run.output
    image, label_image = nib.load(str(source)), nib.load(str(output))
    assert label_image.shape == image.shape and np.allclose(label_image.affine, image.affine)
    report = json.loads((tmp_path / "seg" / "example.json").read_text())
    assert report["backend"] == "classical"
    labels = np.asanyarray(label_image.dataobj)
    liver_value = int({n: v for v, n in report["labels"].items()}["liver"])
    voxel_ml = float(np.prod(image.header.get_zooms()[:3])) / 1000.0
    assert report["organs"]["liver"]["volume_ml"] == pytest.approx((labels == liver_value).sum() * voxel_ml, rel=1e-6)
    assert 20.0 <= report["organs"]["liver"]["hu_mean"] <= 80.0

    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    bad = CliRunner().invoke(main, ["segment", str(notes), "-o", str(tmp_path / "y.nii.gz")])
    assert bad.exit_code != 0 and "not a NIfTI file" in bad.output
    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    bad = CliRunner().invoke(main, ["segment", str(empty_folder), "-o", str(tmp_path / "z.nii.gz")])
    assert bad.exit_code != 0 and str(empty_folder) in bad.output
    assert not (tmp_path / "y.nii.gz").exists() and not (tmp_path / "z.nii.gz").exists()

    missing = CliRunner().invoke(main, ["segment", str(source), "-o", str(tmp_path / "x.nii.gz"),
                                        "--backend", "totalsegmentator", "--weights-dir", str(tmp_path / "none")])
    assert missing.exit_code != 0 and "Dataset297_TotalSegmentator_total_3mm_1559subj" in missing.output


# ----------------------------------------------------------------------------------------------------------------
# TotalSegmentator backend: the real nnU-Net code path with a tiny checkpoint built here


def build_tiny_totalseg_checkpoint(weights_dir: Path) -> Path:
    """A 2-stage PlainConvUNet with random weights in TotalSegmentator's exact folder layout for `total --fast`
    (task 297, trainer nnUNetTrainer_4000epochs_NoMirroring, plans nnUNetPlans, 3d_fullres, fold 0)."""
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from totalsegmentator.map_to_binary import class_map
    from totalsegmentator.map_tasks_config import TASK_CONFIGS, TASK_ID_WEIGHTS_CONFIGS

    fast = TASK_CONFIGS["total"]["sub_modes"]["fast"]  # verify the layout against the installed package
    dataset = TASK_ID_WEIGHTS_CONFIGS[fast["task_id"]]["foldername"]
    model_dir = weights_dir / dataset / f"{fast['trainer']}__nnUNetPlans__3d_fullres"
    (model_dir / "fold_0").mkdir(parents=True, exist_ok=True)
    labels = {"background": 0, **{name: value for value, name in sorted(class_map["total"].items())}}
    (model_dir / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz", "name": dataset}))
    arch_kwargs = {"n_stages": 2, "features_per_stage": [4, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
                   "kernel_sizes": [[3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [2, 2, 2]],
                   "n_conv_per_stage": [1, 1], "n_conv_per_stage_decoder": [1], "conv_bias": True,
                   "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                   "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                   "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    resampling = "resample_data_or_seg_to_shape"
    plans = {
        "dataset_name": dataset, "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [3.0, 3.0, 3.0], "original_median_shape_after_transp": [112, 101, 122],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 3000.0, "mean": 100.0, "median": 80.0, "min": -1024.0, "percentile_00_5": -1000.0,
            "percentile_99_5": 1500.0, "std": 300.0}},
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": [64, 64, 64], "median_image_size_in_voxels": [112, 101, 122], "spacing": [3.0, 3.0, 3.0],
            "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": resampling, "resampling_fn_seg": resampling,
            "resampling_fn_probabilities": resampling,
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
            "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                             "arch_kwargs": arch_kwargs,
                             "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
            "batch_dice": False}},
    }
    (model_dir / "plans.json").write_text(json.dumps(plans, indent=1))
    torch.manual_seed(0)
    network = PlainConvUNet(
        input_channels=1, n_stages=2, features_per_stage=[4, 8], conv_op=torch.nn.Conv3d,
        kernel_sizes=arch_kwargs["kernel_sizes"], strides=arch_kwargs["strides"], n_conv_per_stage=[1, 1],
        num_classes=len(labels), n_conv_per_stage_decoder=[1], conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
        norm_op_kwargs=arch_kwargs["norm_op_kwargs"], nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True},
        deep_supervision=False)
    torch.save({"network_weights": network.state_dict(), "trainer_name": fast["trainer"],
                "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": None},
               model_dir / "fold_0" / "checkpoint_final.pth")
    return weights_dir


def test_totalsegmentator_backend_runs_nnunet_on_local_tiny_checkpoint(reference_files: Path,
                                                                       tmp_path: Path) -> None:
    pytest.importorskip("totalsegmentator", reason="optional extra 'totalseg' not installed")
    from totalsegmentator.map_to_binary import class_map

    from omnict_core.segmentation.totalseg import TotalSegmentatorSegmenter

    from omnict_core.segmentation.base import TOTAL_LABELS

    from omnict_core.segmentation import totalseg

    assert TOTAL_LABELS == class_map["total"]  # our copy of the label names matches the installed package
    # The fallback folder layout (used to name missing paths without the extra installed) matches the package.
    assert totalseg._task_layout(True) == [totalseg.TASK_FOLDERS[True]]
    assert totalseg._task_layout(False) == [(name, totalseg.FULL_RESOLUTION_TRAINER)
                                           for name in totalseg.FULL_RESOLUTION_TASKS.values()]
    weights = build_tiny_totalseg_checkpoint(tmp_path / "weights")
    hu, spacing, codes = _load_nifti(reference_files / "example_ct.nii.gz")
    hu = np.ascontiguousarray(hu[40:90])  # 50 slices keep nnU-Net's CPU work small
    segmenter = make_segmenter("totalsegmentator", weights_dir=weights)
    assert isinstance(segmenter, TotalSegmentatorSegmenter)
    result = segmenter.segment(hu, spacing, codes)
    # Random weights: arbitrary labels. What matters is the structure, and that nnU-Net's predictor asked our
    # direct trainer lookup for the checkpoint's trainer (the real code path, in a spawn-safe subprocess).
    assert segmenter.last_run["trainers_resolved"] == ["nnUNetTrainer_4000epochs_NoMirroring"]
    assert result.label_map.shape == hu.shape and result.label_map.dtype == np.uint8
    assert result.labels and set(result.labels.items()) <= set(class_map["total"].items())
    assert set(np.unique(result.label_map)) - {0} == set(result.labels)
    assert result.backend == "totalsegmentator" and result.backend_version.startswith("totalsegmentator-2.18.0")
    config = json.loads((tmp_path / "totalseg_home" / "config.json").read_text())
    assert config["send_usage_stats"] is False
    # Nothing was downloaded next to the tiny model.
    assert sorted(p.name for p in weights.iterdir()) == ["Dataset297_TotalSegmentator_total_3mm_1559subj"]


def test_cli_dicom_label_map_is_in_the_right_place_in_world_coordinates(reference_files: Path,
                                                                         tmp_path: Path) -> None:
    """DICOM series in, NIfTI label map out: resampled through the two affines onto TotalSegmentator's own NIfTI
    of the same series, the liver still overlaps (a flipped or shifted affine would give Dice ~0)."""
    import nibabel as nib
    from click.testing import CliRunner
    from nibabel.processing import resample_from_to

    from omnict_node.cli import main

    output = tmp_path / "dicom.nii.gz"
    run = CliRunner().invoke(main, ["segment", str(reference_files / "example_ct_dicom"), "-o", str(output),
                                    "--backend", "classical"])
    assert run.exit_code == 0, run.output
    report = json.loads((tmp_path / "dicom.json").read_text())
    liver_value = int({n: v for v, n in report["labels"].items()}["liver"])
    ours = nib.load(str(output))
    reference = resample_from_to(nib.load(str(reference_files / "example_seg_dicom.nii.gz")), ours, order=0)
    liver = np.asanyarray(ours.dataobj) == liver_value
    assert _dice(liver, np.asanyarray(reference.dataobj) == _total_names()["liver"]) >= 0.87  # measured 0.924
    assert 500.0 <= report["organs"]["liver"]["volume_ml"] <= 900.0  # reference: 699 ml


def test_classical_keeps_emphysematous_lungs(reference_files: Path) -> None:
    """Lung parenchyma darkened by 150 HU (46 % of lung voxels below -950 HU, severe emphysema) is still lung,
    not bowel gas, and the trachea is still found."""
    hu, spacing, codes = _load_nifti(reference_files / "aorta_report" / "example_ct.nii.gz")
    normal = ClassicalSegmenter().segment(hu, spacing, codes)
    lungs = normal.mask("lung_left") | normal.mask("lung_right")
    darker = hu.astype(np.float32)
    darker[lungs & (darker < -500)] -= 150.0
    darker = np.maximum(darker, -1024.0)
    assert (darker[lungs] < -950).mean() > 0.4
    result = ClassicalSegmenter().segment(darker, spacing, codes)
    for side in ("lung_left", "lung_right"):
        assert _dice(result.mask(side), normal.mask(side)) >= 0.95, side
    assert "trachea" in result.names
