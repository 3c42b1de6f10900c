"""OmniCT input layer: windowing, resampling, VSC units and their source slices, label maps, file formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnict_core.configuration_omnict import omnict_preset
from omnict_core.preprocessing import (
    batch_units, compose_units, load_nifti, prepare_input, prepare_slice, prepare_volume, resample_labels,
    resample_volume, unit_source_slices, window_hu,
)




@pytest.fixture(scope="module")
def tiny_config():
    return omnict_preset("tiny")  # 12 slices x 96 x 96 -> 4 units


def test_window_maps_minus1000_1000_to_unit_range():
    out = window_hu(np.array([-3000.0, -1000.0, 0.0, 1000.0, 3071.0]))
    assert out.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_vsc_32_slices_make_11_units_with_edge_replication():
    slices = torch.arange(32.0)[:, None, None].expand(32, 2, 2)
    units = compose_units(slices)
    assert units.shape == (11, 3, 2, 2)
    assert units[0, :, 0, 0].tolist() == [0, 1, 2]
    assert units[10, :, 0, 0].tolist() == [30, 31, 31]  # last unit completed with the last slice
    assert compose_units(slices[:30]).shape[0] == 10


def test_unit_source_slices_cover_every_source_slice_once_in_order():
    mapping = unit_source_slices(source_depth=300, depth=32)
    assert len(mapping) == 11
    flat = [s for unit in mapping for s in unit]
    assert sorted(set(flat)) == list(range(300))
    assert mapping[0][0] == 0 and mapping[-1][-1] == 299
    assert unit_source_slices(source_depth=6, depth=12)[0] == [0, 1]  # upsampling: 2 resampled slices per source


def test_resampling_shapes_antialiasing_and_nearest_labels():
    z = np.repeat(np.arange(60, dtype=np.float32)[:, None, None], 8, axis=1).repeat(8, axis=2)
    out = resample_volume(torch.from_numpy(z), (6, 4, 4))
    assert out.shape == (6, 4, 4)
    assert out[0, 0, 0].item() == pytest.approx(4.5)  # area average of source slices 0..9
    labels = np.zeros((20, 30, 30), np.int32)
    labels[5:15, 10:20, 10:20] = 7
    labels[0:2, 0:3, 0:3] = 3
    small = resample_labels(labels, (10, 15, 15))
    assert set(torch.unique(small).tolist()) <= {0, 3, 7}  # nearest neighbour: no blended label values
    assert (small == 7).sum() == 5 * 5 * 5


def test_prepare_volume_units_range_and_organ_mask(tiny_config):
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 1000, (25, 50, 70)).astype(np.float32)
    labels = np.zeros(hu.shape, np.int32)
    labels[20:25, 10:30, 10:40] = 5  # only in the last source slices
    labels[0:4, 0:10, 0:10] = 6
    study = prepare_volume(hu, tiny_config, labels=labels, spacing=(2.5, 0.8, 0.8),
                           label_names={5: "kidney_left", 6: "kidney_right", 7: "liver"})
    assert study.kind == "3d" and study.pixel_units.shape == (4, 3, 96, 96)
    assert -1.0 <= study.pixel_units.min() and study.pixel_units.max() <= 1.0
    assert study.label_units.shape == (4, 3, 96, 96)
    left = study.organ_mask(study.organ_label_ids("kidney_left"))
    assert left.shape == (4, 96, 96) and left[3].any() and not left[:3].any()
    assert study.organ_label_ids("kidneys") == [5, 6]  # plural -> both sides
    assert study.organ_label_ids("spleen") == []
    assert study.organ_mask(None) is None
    assert study.source_slices([3]) == list(range(18, 25))
    first_middle = study.unit_source_slices[0][len(study.unit_source_slices[0]) // 2]
    assert study.key_slices([3]) == [21] and study.key_slices([3, 0]) == [first_middle, 21]  # one image per unit
    with pytest.raises(ValueError, match="label map shape"):
        prepare_volume(hu, tiny_config, labels=labels[:3])


def test_slice_inputs_become_one_replicated_unit(tiny_config, tmp_path):
    from PIL import Image

    ct = prepare_slice(np.full((40, 40), 0.0, np.float32), tiny_config)
    assert ct.kind == "2d" and ct.pixel_units.shape == (1, 3, 96, 96)
    assert torch.allclose(ct.pixel_units, torch.zeros(1))  # 0 HU -> 0.5 -> normalised 0
    png = tmp_path / "slice.png"
    Image.fromarray(np.full((30, 20), 255, np.uint8)).save(png)
    picture = prepare_input(png, tiny_config)
    assert picture.kind == "2d" and torch.allclose(picture.pixel_units, torch.ones(1))
    assert torch.equal(picture.pixel_units[0, 0], picture.pixel_units[0, 2])


def test_single_dicom_slice_reads_hu(tiny_config):
    from pydicom.data import get_testdata_file

    study = prepare_input(get_testdata_file("CT_small.dcm"), tiny_config)
    assert study.kind == "2d" and study.pixel_units.shape == (1, 3, 96, 96)
    assert float(study.pixel_units.std()) > 0.05


def test_nifti_is_reoriented_to_display_order(tiny_config, tmp_path):
    import nibabel as nib

    data = np.zeros((6, 5, 4), np.float32)  # (i, j, k) in RAS+
    data[5, 0, 3] = 1000.0  # i max (patient right?), j min (posterior), k max (superior)
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([0.7, 0.8, 3.0, 1.0])), path)
    loaded = load_nifti(path)
    assert loaded.array.shape == (4, 5, 6) and loaded.spacing == pytest.approx((3.0, 0.8, 0.7))
    # slices inferior->superior, rows anterior->posterior, columns patient right->left (RAS i reversed)
    assert loaded.array[3, 4, 0] == 1000.0
    label_path = tmp_path / "labels.nii.gz"
    nib.save(nib.Nifti1Image((data > 0).astype(np.int16), np.diag([0.7, 0.8, 3.0, 1.0])), label_path)
    study = prepare_input(path, tiny_config, labels=label_path, label_names={1: "liver"})
    assert study.kind == "3d" and study.num_units == 4
    assert study.organ_mask([1])[3].any() and not study.organ_mask([1])[:3].any()  # label followed the reorientation


def test_nrrd_and_numpy_sources(tiny_config, tmp_path):
    import nrrd

    volume = np.zeros((10, 12, 14), np.float32)  # x, y, z in NRRD (Fortran) order
    path = tmp_path / "ct.nrrd"
    header = {"space directions": np.diag([0.5, 0.6, 2.0]).tolist(), "space": "left-posterior-superior"}
    nrrd.write(str(path), volume, header)
    study = prepare_input(path, tiny_config)
    assert study.source_shape == (14, 12, 10) and study.spacing == pytest.approx((2.0, 0.6, 0.5))
    from_array = prepare_input(np.zeros((7, 20, 20), np.float32), tiny_config)
    assert from_array.num_units == 4 and from_array.unit_source_slices[-1][-1] == 6
    with pytest.raises(FileNotFoundError):
        prepare_input(tmp_path / "missing.nii.gz", tiny_config)


def test_batch_units_stacks_same_shape_studies(tiny_config):
    a = prepare_input(np.zeros((12, 20, 20), np.float32), tiny_config)
    b = prepare_input(np.zeros((30, 20, 20), np.float32), tiny_config)
    batch = batch_units([a, b], [None, torch.ones(4, 96, 96, dtype=torch.bool)])
    assert batch["pixel_units"].shape == (2, 4, 3, 96, 96)
    assert batch["organ_masks"].shape == (2, 4, 96, 96) and not batch["organ_masks"][0].any()
    assert batch["unit_kind"] == ["3d", "3d"]


def test_dicom_series_folder_from_phantom(tiny_config, tmp_path):
    from omnict_core.phantom import LABELS, PhantomSpec, generate_study, write_dicom_study

    phantom = generate_study(PhantomSpec(seed=1, slices=12, size=64))
    paths = write_dicom_study(phantom, tmp_path)  # CT/ + LOCALIZER/: the series selection must skip the localizer
    study = prepare_input(tmp_path, tiny_config, labels=phantom.labels.astype(np.int32), label_names=LABELS)
    reference = prepare_volume(phantom.hu, tiny_config)
    assert study.kind == "3d" and study.num_units == 4
    assert float((study.pixel_units - reference.pixel_units).abs().max()) < 2e-3  # DICOM stores rounded HU
    assert len(study.slice_uids) == 12 and len(set(study.slice_uids)) == 12
    files = prepare_input([str(p) for p in paths.ct_files], tiny_config)
    assert torch.equal(files.pixel_units, study.pixel_units)
    assert study.organ_mask(study.organ_label_ids("liver")).any()


def test_bad_arrays_are_refused(tiny_config):
    with pytest.raises(ValueError, match="a volume must be"):
        prepare_volume(np.zeros((4, 4)), tiny_config)
    with pytest.raises(ValueError, match="a slice must be"):
        prepare_slice(np.zeros((2, 3, 4, 5)), tiny_config)
