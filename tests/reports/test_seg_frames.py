"""The SEG's frames are expanded by our code from highdicom's one-frame-per-plane build (reports/seg.py): the file must
be byte for byte the one highdicom writes when it builds every frame itself from the whole segment map."""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path

import highdicom as hd
import numpy as np

from omnict_core.phantom import PhantomSpec, generate_study, write_dicom_study
from reports import AlgorithmInfo, RunIdentity, SourceSeries, write_objects
from reports.coding import has_organ_coding
from reports.encoded import declare_explicit_little_endian
from reports.inputs import OrganMeasurement
from reports.seg import build_segmentation, finish_segmentation, segmentation_arguments
from tests.reports.synthetic_ct import build_synthetic_ct

ALGORITHM = AlgorithmInfo("classical", "1.0")
CREATED = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)


def highdicom_segmentation(source: SourceSeries, label_map: np.ndarray, organs: list[OrganMeasurement],
                           run: RunIdentity):
    """The SEG as highdicom builds it from the whole segment map (every frame and per-frame item its own)."""
    lookup = np.zeros(int(label_map.max()) + 1, dtype=np.uint8)
    for number, organ in enumerate(organs, start=1):
        lookup[organ.label_value] = number
    seg = hd.seg.Segmentation(pixel_array=lookup[label_map], **segmentation_arguments(source, organs, ALGORITHM, run))
    finish_segmentation(seg, source, ALGORITHM, run)
    declare_explicit_little_endian(seg)
    return seg


def assert_same_file(source: SourceSeries, label_map: np.ndarray, organs: list[OrganMeasurement],
                     tmp_path: Path) -> None:
    run = RunIdentity(source.study_instance_uid, "run-0001", CREATED)
    ours = build_segmentation(source, label_map, organs, ALGORITHM, run).dataset
    reference = highdicom_segmentation(source, label_map, organs, run)
    [ours_path] = write_objects([ours], tmp_path / "ours")
    [reference_path] = write_objects([reference], tmp_path / "highdicom")
    frames = int(reference.NumberOfFrames)
    assert frames > len(organs)  # more than one frame per segment: the expansion did work
    assert int(ours.NumberOfFrames) == frames
    assert ours_path.read_bytes() == reference_path.read_bytes()
    # and highdicom reads our file back to the label map
    pixels = hd.seg.segread(ours_path).get_pixels_by_source_instance(
        list(source.sop_instance_uids), combine_segments=True, skip_overlap_checks=True)
    expected = np.zeros(label_map.shape, dtype=np.uint8)
    for number, organ in enumerate(organs, start=1):
        expected[label_map == organ.label_value] = number
    np.testing.assert_array_equal(pixels, expected)


def test_frames_match_highdicom_on_the_synthetic_series(tmp_path: Path) -> None:
    ct = build_synthetic_ct(tmp_path / "ct")  # 8 slices, 3 organs, empty first and last planes
    assert_same_file(SourceSeries.from_files(ct.files), ct.label_map, ct.organs, tmp_path)


def test_frames_match_highdicom_when_a_frame_does_not_fill_whole_bytes(tmp_path: Path) -> None:
    # 30 x 30 = 900 pixels per frame: highdicom packs the frames continuously, a frame starting mid-byte
    ct = build_synthetic_ct(tmp_path / "ct")
    datasets = []
    for ds in SourceSeries.from_files(ct.files).datasets:
        cropped = copy.deepcopy(ds)
        cropped.Rows = cropped.Columns = 30
        datasets.append(cropped)
    assert_same_file(SourceSeries.from_datasets(datasets), np.ascontiguousarray(ct.label_map[:, 10:40, 20:50]),
                     [o for o in ct.organs if o.label_name != "spleen"] + [ct.organs[2]], tmp_path)


def test_frames_match_highdicom_on_a_phantom_with_many_organs(tmp_path: Path) -> None:
    # dozens of segments (the phantom's TotalSegmentator labels that have a coding), in the phantom's slice order
    study = generate_study(PhantomSpec(seed=5, slices=24, size=48, findings=["lung_nodule:size_mm=12"]))
    paths = write_dicom_study(study, tmp_path / "study", localizer=False, ground_truth=False)
    source = SourceSeries.from_files(paths.ct_files)
    # the phantom's plane k is InstanceNumber nz - k (1 = the most superior); the source is sorted along the normal
    label_map = study.labels[[study.labels.shape[0] - int(ds.InstanceNumber) for ds in source.datasets]]
    organs = []
    for value, name in sorted(study.label_names.items()):
        if has_organ_coding(name) and (label_map == value).any():
            organs.append(OrganMeasurement(name, value, 1.0, 40.0, 5.0))
    assert len(organs) > 20
    assert_same_file(source, label_map, organs, tmp_path)


def test_segment_numbers_follow_the_organ_order(tmp_path: Path) -> None:
    ct = build_synthetic_ct(tmp_path / "ct")
    reordered = [ct.organs[2], ct.organs[0], ct.organs[1]]  # spleen first: its planes are the fewest
    assert_same_file(SourceSeries.from_files(ct.files), ct.label_map, reordered, tmp_path)
