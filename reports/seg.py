"""DICOM Segmentation (SEG) of the organ masks: BINARY, one segment per organ, in the source study."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np

from reports.algorithm import NODE_MANUFACTURER, algorithm_identification_sequence
from reports.encoded import declare_explicit_little_endian
from reports.inputs import AlgorithmInfo, OrganMeasurement, ReportInputError, RunIdentity, SourceSeries
from reports.series import new_series_arguments, node_software_versions, stamp_node_identity
from reports.uids import ObjectKind, derive_uid, tracking_uid

SEGMENTATION_KIND = ObjectKind.SEGMENTATION


@dataclass(frozen=True)
class SegmentationResult:
    """The SEG dataset, which Segment Number (0062,0004) each organ label name received, and the label map's
    per-slice label counts (:func:`slice_areas`, reused by the measurement report)."""

    dataset: hd.seg.Segmentation
    segment_numbers: Mapping[str, int]
    areas: np.ndarray


def segment_description(
    segment_number: int, organ: OrganMeasurement, algorithm: AlgorithmInfo, run: RunIdentity
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


def _segment_map(label_map: np.ndarray, organs: Sequence[OrganMeasurement], highest_label: int) -> np.ndarray:
    """Label values of the segmentation → Segment Numbers 1..N in the order of ``organs``; other labels → 0.
    One byte per voxel when N < 256 (a third of the time of a 16-bit map on a 300-slice study)."""
    dtype = np.uint8 if len(organs) < 256 else np.uint16
    lookup = np.zeros(max(highest_label, max(o.label_value for o in organs)) + 1, dtype=dtype)
    for number, organ in enumerate(organs, start=1):
        lookup[organ.label_value] = number
    return lookup[label_map]


def _check_inputs(source: SourceSeries, label_map: np.ndarray, organs: Sequence[OrganMeasurement]) -> None:
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


def _check_not_empty(organs: Sequence[OrganMeasurement], areas: np.ndarray) -> None:
    voxels = areas.sum(axis=0)
    empty = [o.label_name for o in organs if o.label_value <= 0 or o.label_value >= voxels.size
             or voxels[o.label_value] == 0]
    if empty:
        raise ReportInputError(f"organs without voxels in the label map (leave them out): {empty}")


def _pin_dimension_organization_uid(seg: hd.seg.Segmentation, run: RunIdentity) -> None:
    """highdicom draws a random Dimension Organization UID (0020,9164); derive it from the run instead, so that
    encoding the same run twice gives the same dataset."""
    uid = derive_uid(run, SEGMENTATION_KIND.value.slug, "dimension-organization")
    for item in (*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence):
        item.DimensionOrganizationUID = uid


def build_segmentation(
    source: SourceSeries,
    label_map: np.ndarray,
    organs: Sequence[OrganMeasurement],
    algorithm: AlgorithmInfo,
    run: RunIdentity,
) -> SegmentationResult:
    """Build the SEG: Segmentation Type (0062,0001) BINARY over the source images (Referenced Series / Derivation
    Image / Source Image Sequences point at them), one segment per organ in ``organs`` order, empty frames
    omitted, patient and study copied from the source, a new series of its own (series number 7001).

    ``label_map``: integer array ``(n_slices, Rows, Columns)`` in ``source`` order (see SourceSeries).
    """
    run.check_source(source)
    _check_inputs(source, label_map, organs)
    areas = slice_areas(label_map)  # after the input checks: a bad label map gets its ReportInputError
    _check_not_empty(organs, areas)
    descriptions = [segment_description(n, organ, algorithm, run) for n, organ in enumerate(organs, start=1)]
    seg = hd.seg.Segmentation(
        source_images=list(source.datasets),
        pixel_array=_segment_map(label_map, organs, areas.shape[1] - 1),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        manufacturer_model_name=algorithm.name[:64],
        software_versions=node_software_versions(algorithm)[0],  # full list set by stamp_node_identity
        device_serial_number=NODE_MANUFACTURER,
        content_description="Organ segmentation"[:64],
        content_label="ORGANS",
        content_creator_name="OmniCT^Node",
        omit_empty_frames=True,
        **new_series_arguments(SEGMENTATION_KIND, run),
    )
    stamp_node_identity(seg, source, SEGMENTATION_KIND, run, algorithm)
    _pin_dimension_organization_uid(seg, run)
    declare_explicit_little_endian(seg)  # 832 per-frame items on a 300-slice study: skip pydicom's VR correction walk
    return SegmentationResult(seg, {o.label_name: n for n, o in enumerate(organs, start=1)}, areas)
