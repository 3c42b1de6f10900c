"""DICOM Segmentation (SEG) of the organ masks: BINARY, one segment per organ, in the source study."""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from reports.algorithm import NODE_MANUFACTURER, algorithm_identification_sequence
from reports.encoded import SharedLeafEncoder, declare_explicit_little_endian, raw_sequence
from reports.inputs import AlgorithmInfo, ReportInputError, RunIdentity, SegmentedOrgan, SourceSeries
from reports.series import new_series_arguments, node_software_versions, stamp_node_identity
from reports.uids import ObjectKind, derive_uid, tracking_uid

SEGMENTATION_KIND = ObjectKind.SEGMENTATION


@dataclass(frozen=True)
class SegmentationResult:
    """The SEG dataset, which Segment Number (0062,0004) each organ label name received, and the label map's
    per-slice label counts (:func:`slice_areas`, reused by the measurement report)."""

    dataset: Dataset  # the SEG as built (see build_segmentation), or its file's header read back
    segment_numbers: Mapping[str, int]
    areas: np.ndarray


def segment_description(
    segment_number: int, organ: SegmentedOrgan, algorithm: AlgorithmInfo, run: RunIdentity
) -> hd.seg.SegmentDescription:
    """One Segment Sequence (0062,0002) item: Segment Number, Segment Label (0062,0005) = label name, Segmented
    Property Category/Type Code Sequences (0062,0003)/(0062,000F) (+ Type Modifier (0062,0011) for laterality),
    Segment Algorithm Type (0062,0008) = AUTOMATIC with its Algorithm Identification, Tracking ID/UID
    (0062,0020)/(0062,0021) shared with the measurement report group of the same organ."""
    coding = organ.organ
    description = hd.seg.SegmentDescription(
        segment_number=segment_number,
        segment_label=organ.label_name[:64],
        segmented_property_category=coding.category,
        segmented_property_type=coding.property_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification_sequence(algorithm),
        tracking_uid=tracking_uid(run, ObjectKind.MEASUREMENT_REPORT, organ.label_name),
        tracking_id=organ.label_name[:64],
        display_color=hd.color.CIELabColor.from_rgb(*coding.display_rgb) if coding.display_rgb else None,
    )
    if coding.laterality is not None:
        # highdicom has no argument for it; the attribute lives inside the Segmented Property Type item (PS3.3 C.8.20.2)
        modifier = hd.sr.CodedConcept.from_code(coding.laterality)
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
    return description


def slice_areas(label_map: np.ndarray) -> np.ndarray:
    """Pixel count of every label value on every slice: ``(n_slices, max label + 1)``, one pass over the volume
    (shared by the SEG's input checks and the measurement report's cross-sections)."""
    bins = int(label_map.max()) + 1
    return np.stack([np.bincount(plane.ravel(), minlength=bins) for plane in label_map])


def _check_inputs(source: SourceSeries, label_map: np.ndarray, organs: Sequence[SegmentedOrgan]) -> None:
    if label_map.shape != source.shape:
        raise ReportInputError(f"label map shape {label_map.shape} != source series shape {source.shape}")
    if not np.issubdtype(label_map.dtype, np.integer) or (
            np.issubdtype(label_map.dtype, np.signedinteger) and label_map.min() < 0):
        raise ReportInputError("label map must hold non-negative integer label values")
    if not organs:
        raise ReportInputError("no organs to encode")
    for field in ("label_name", "label_value"):
        values = [getattr(o, field) for o in organs]
        if len(set(values)) != len(values):
            raise ReportInputError(f"organs repeat a {field}: {values}")


def _check_not_empty(organs: Sequence[SegmentedOrgan], areas: np.ndarray) -> None:
    voxels = areas.sum(axis=0)
    empty = [o.label_name for o in organs if o.label_value <= 0 or o.label_value >= voxels.size
             or voxels[o.label_value] == 0]
    if empty:
        raise ReportInputError(f"organs without voxels in the label map (leave them out): {empty}")


def _pin_dimension_organization_uid(seg: Dataset, run: RunIdentity) -> None:
    """highdicom draws a random Dimension Organization UID (0020,9164); derive it from the run instead, so that
    encoding the same run twice gives the same dataset."""
    uid = derive_uid(run, SEGMENTATION_KIND.value.slug, "dimension-organization")
    for item in (*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence):
        item.DimensionOrganizationUID = uid


def segmentation_arguments(
    source: SourceSeries, organs: Sequence[SegmentedOrgan], algorithm: AlgorithmInfo, run: RunIdentity
) -> dict[str, Any]:
    """Arguments of ``hd.seg.Segmentation`` other than ``pixel_array`` for the run's SEG: Source Images, Segment
    Sequence, Manufacturer's Model Name, Software Versions, Device Serial Number, Content Description/Label/Creator,
    series and instance identity (see :func:`new_series_arguments`); empty frames omitted."""
    return dict(
        source_images=list(source.datasets),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment_description(n, organ, algorithm, run) for n, organ in enumerate(organs, 1)],
        manufacturer_model_name=algorithm.name[:64],
        software_versions=node_software_versions(algorithm)[0],  # full list set by stamp_node_identity
        device_serial_number=NODE_MANUFACTURER,
        content_description="Organ segmentation"[:64],
        content_label="ORGANS",
        content_creator_name="OmniCT^Node",
        omit_empty_frames=True,
        **new_series_arguments(SEGMENTATION_KIND, run),
    )


def finish_segmentation(seg: Dataset, source: SourceSeries, algorithm: AlgorithmInfo, run: RunIdentity) -> None:
    """What follows highdicom's constructor: the node's identity and dates (:func:`stamp_node_identity`) and a
    Dimension Organization UID (0020,9164) derived from the run."""
    stamp_node_identity(seg, source, SEGMENTATION_KIND, run, algorithm)
    _pin_dimension_organization_uid(seg, run)


def build_segmentation(
    source: SourceSeries,
    label_map: np.ndarray,
    organs: Sequence[SegmentedOrgan],
    algorithm: AlgorithmInfo,
    run: RunIdentity,
) -> SegmentationResult:
    """Build the SEG: Segmentation Type (0062,0001) BINARY over the source images (Referenced Series / Derivation
    Image / Source Image Sequences point at them), one segment per organ in ``organs`` order, empty frames
    omitted, patient and study copied from the source, a new series of its own (series number 7001).

    ``label_map``: integer array ``(n_slices, Rows, Columns)`` in ``source`` order (see SourceSeries).

    highdicom builds everything but the frames, from a map with one frame per plane (:func:`_one_frame_per_plane`);
    :func:`_expand_frames` then writes every frame — byte for byte what highdicom builds from the whole map
    (tests/reports/test_seg_frames.py), in a fraction of the time: a 300-slice study has some 800 frames, and
    building and writing their per-frame items one by one took most of the SEG's second and a half.
    """
    run.check_source(source)
    _check_inputs(source, label_map, organs)
    areas = slice_areas(label_map)  # after the input checks: a bad label map gets its ReportInputError
    _check_not_empty(organs, areas)
    present = areas[:, [o.label_value for o in organs]] > 0  # (plane, segment number - 1)
    seg = hd.seg.Segmentation(pixel_array=_one_frame_per_plane(present, label_map.shape),
                              **segmentation_arguments(source, organs, algorithm, run))
    dataset = _expand_frames(seg, source, label_map, organs, present)
    finish_segmentation(dataset, source, algorithm, run)
    declare_explicit_little_endian(dataset)  # skip pydicom's VR correction walk
    return SegmentationResult(dataset, {o.label_name: n for n, o in enumerate(organs, start=1)}, areas)


def _one_frame_per_plane(present: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A segment map whose every plane that holds any segment holds one pixel of its lowest segment number: the
    same planes as the whole map (what highdicom derives from them — Dimension Organization Type, each plane's
    position index — is the same), one frame each."""
    reduced = np.zeros(shape, dtype=np.uint8 if present.shape[1] < 256 else np.uint16)
    planes = np.flatnonzero(present.any(axis=1))
    reduced[planes, 0, 0] = present[planes].argmax(axis=1) + 1
    return reduced


# Explicit VR Little Endian element headers of the two per-frame values that name the segment: Dimension Index
# Values (0020,9157) UL, whose first value is the segment number (the first dimension of highdicom's index), and
# Referenced Segment Number (0062,000B) US.
_DIMENSION_INDEX_VALUES = b"\x20\x00\x57\x91UL"
_REFERENCED_SEGMENT_NUMBER = b"\x62\x00\x0b\x00US"


@dataclass(frozen=True)
class _PlaneItem:
    """A plane's encoded Per-Frame Functional Groups item and where its two segment numbers sit in it."""

    encoded: bytes
    dimension_offset: int
    segment_offset: int

    @classmethod
    def of(cls, item: Dataset, encoder: SharedLeafEncoder) -> _PlaneItem:
        encoded = encoder.item(item)
        offsets = [encoded.find(header) for header in (_DIMENSION_INDEX_VALUES, _REFERENCED_SEGMENT_NUMBER)]
        if -1 in offsets or any(encoded.count(header) != 1
                                for header in (_DIMENSION_INDEX_VALUES, _REFERENCED_SEGMENT_NUMBER)):
            raise ValueError("unexpected per-frame item layout from highdicom")
        return cls(encoded, offsets[0] + 8, offsets[1] + 8)  # 8: tag, VR and 2-byte length

    def for_segment(self, segment_number: int) -> bytes:
        item = bytearray(self.encoded)
        struct.pack_into("<I", item, self.dimension_offset, segment_number)
        struct.pack_into("<H", item, self.segment_offset, segment_number)
        return bytes(item)


def _expand_frames(seg: hd.seg.Segmentation, source: SourceSeries, label_map: np.ndarray,
                   organs: Sequence[SegmentedOrgan], present: np.ndarray) -> Dataset:
    """The SEG as a plain dataset with every frame: Per-Frame Functional Groups Sequence (5200,9230) as one encoded
    element (each plane's item from highdicom, its segment numbers set per frame), Number of Frames (0028,0008),
    Pixel Data (7FE0,0010) bit-packed as highdicom packs it. Frames go segment by segment, each segment's planes in
    highdicom's plane order (its position index), as highdicom orders them."""
    plane_items: dict[int, tuple[int, _PlaneItem]] = {}  # source plane -> (position index, its item)
    encoder = SharedLeafEncoder()
    for item in seg.PerFrameFunctionalGroupsSequence:
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        plane_items[source.index_of(str(uid))] = (int(item.FrameContentSequence[0].DimensionIndexValues[1]),
                                                  _PlaneItem.of(item, encoder))
    plane_order = sorted(plane_items, key=lambda plane: plane_items[plane][0])
    encoded_items: list[bytes] = []
    frames: list[np.ndarray] = []
    for number, organ in enumerate(organs, start=1):
        for plane in plane_order:
            if present[plane, number - 1]:
                encoded_items.append(plane_items[plane][1].for_segment(number))
                frames.append(label_map[plane] == organ.label_value)
    dataset = Dataset(dict(seg.items()))
    dataset.file_meta = seg.file_meta
    dataset[PER_FRAME_FUNCTIONAL_GROUPS] = raw_sequence(PER_FRAME_FUNCTIONAL_GROUPS, encoded_items)
    dataset.NumberOfFrames = len(frames)
    dataset.PixelData = _pack_frames(frames)
    return dataset


PER_FRAME_FUNCTIONAL_GROUPS = 0x52009230  # (5200,9230)


def _pack_frames(frames: list[np.ndarray]) -> bytes:
    """1-bit Pixel Data of the frames as highdicom writes it: bits packed least significant first, continuously
    across frames (a frame of Rows x Columns not a multiple of 8 starts mid-byte), the last byte zero-padded, then
    highdicom's pad byte ``b"0"`` to an even length."""
    if frames and frames[0].size % 8 == 0:  # each frame fills whole bytes: pack them one by one
        packed = b"".join(np.packbits(frame, bitorder="little").tobytes() for frame in frames)
    else:
        packed = np.packbits(np.concatenate([frame.ravel() for frame in frames]), bitorder="little").tobytes()
    return packed + b"0" if len(packed) % 2 else packed
