"""TID 1500 Measurement Report (Comprehensive 3D SR): organ volume and attenuation, one group per SEG segment.

With the label map, every organ also gets a planar group (TID 1410) under the same Tracking Unique Identifier: the
organ's outline on its largest cross-section (Image Region, a closed POLYLINE SCOORD on that source slice) and the
area inside it. Why: viewers place measurements by their spatial coordinates, and OHIF 3 (3.13) reads a TID 1500
group only when a SCOORD is in it (or under each NUM, which highdicom and TID 1419 do not allow in ROI groups); on a
document of SCOORD-less groups its SR viewport fails. OHIF merges groups that share a Tracking Unique Identifier,
so the volume/attenuation values are shown at that outline. A closed POLYLINE rather than POLYGON: OHIF draws
POINT, MULTIPOINT, POLYLINE, CIRCLE and ELLIPSE only. The volumetric group still references the SEG segment.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from highdicom.sr import (
    Comprehensive3DSR,
    FindingSite,
    GraphicTypeValues,
    ImageRegion,
    Measurement,
    MeasurementReport,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    ReferencedSegment,
    SourceSeriesForSegmentation,
    SourceImageForRegion,
    TrackingIdentifier,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from scipy import ndimage

from reports import coding
from reports.algorithm import algorithm_identification_items, observation_context
from reports.encoded import declare_explicit_little_endian
from reports.inputs import AlgorithmInfo, OrganMeasurement, ReportInputError, RunIdentity, SourceSeries
from reports.seg import SegmentationResult, slice_areas
from reports.series import new_series_arguments, stamp_node_identity
from reports.uids import ObjectKind, tracking_uid

MEASUREMENT_KIND = ObjectKind.MEASUREMENT_REPORT
REPORT_TITLE = coding.IMAGING_MEASUREMENT_REPORT
AREA = codes.SCT.Area  # (42798000, SCT)
SQUARE_CENTIMETER = Code("cm2", "UCUM", "square centimeter")  # pydicom names it "Centimeter**2"


def outer_boundary(mask: np.ndarray) -> np.ndarray:
    """Closed outline of a 2-D boolean ``mask`` (rows, columns) along the pixel edges of its largest 4-connected
    component (holes filled): ``(K, 2)`` (column, row) vertices in SCOORD image coordinates, where the top-left
    corner of the top-left pixel is (0, 0); the first vertex is repeated last; only corners are kept."""
    components, count = ndimage.label(mask)
    if count == 0:
        raise ReportInputError("cannot outline an empty mask")
    sizes = np.bincount(components.ravel())[1:]
    region = ndimage.binary_fill_holes(components == int(np.argmax(sizes)) + 1)
    padded = np.pad(region, 1)
    inside = padded[1:-1, 1:-1]
    # Directed pixel edges with the region on the right (clockwise on screen, rows growing downwards); a vertex
    # (x, y) is the top-left corner of pixel (row y, column x).
    rows, cols = np.nonzero(inside & ~padded[:-2, 1:-1])  # top edges: (x, y) -> (x + 1, y)
    edges = [((c, r), (c + 1, r)) for r, c in zip(rows.tolist(), cols.tolist())]
    rows, cols = np.nonzero(inside & ~padded[1:-1, 2:])  # right edges: (x + 1, y) -> (x + 1, y + 1)
    edges += [((c + 1, r), (c + 1, r + 1)) for r, c in zip(rows.tolist(), cols.tolist())]
    rows, cols = np.nonzero(inside & ~padded[2:, 1:-1])  # bottom edges: (x + 1, y + 1) -> (x, y + 1)
    edges += [((c + 1, r + 1), (c, r + 1)) for r, c in zip(rows.tolist(), cols.tolist())]
    rows, cols = np.nonzero(inside & ~padded[1:-1, :-2])  # left edges: (x, y + 1) -> (x, y)
    edges += [((c, r + 1), (c, r)) for r, c in zip(rows.tolist(), cols.tolist())]
    successors: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for start, end in edges:
        successors.setdefault(start, []).append(end)
    first = min(successors)  # top-left-most vertex: on the outer boundary (holes are filled)
    loop, vertex = [first], successors[first].pop()
    while vertex != first:
        loop.append(vertex)
        vertex = successors[vertex].pop()
    loop.append(first)
    points = np.asarray(loop, dtype=np.float64)
    turns = np.any(points[1:-1] - points[:-2] != points[2:] - points[1:-1], axis=1)
    return np.vstack([points[:1], points[1:-1][turns], points[-1:]])


def polygon_area(vertices: np.ndarray) -> float:
    """Area enclosed by a closed (first = last) outline, in pixel units (shoelace formula)."""
    x, y = vertices[:, 0], vertices[:, 1]
    return abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))) / 2.0


def organ_measurements(organ: OrganMeasurement) -> list[Measurement]:
    """The three NUM items of an organ (TID 1419 rows via TID 300):
    Volume (118565006, SCT) in cm3 (= ml);
    Attenuation Coefficient (112031, DCM) in [hnsf'U] with Derivation (121401, DCM) = Mean (373098007, SCT);
    Attenuation Coefficient (112031, DCM) in [hnsf'U] with Derivation = Standard Deviation (386136009, SCT)."""
    return [
        Measurement(name=coding.VOLUME, value=organ.volume_ml, unit=coding.CUBIC_CENTIMETER),
        Measurement(
            name=coding.ATTENUATION_COEFFICIENT,
            value=organ.mean_hu,
            unit=coding.HOUNSFIELD_UNIT,
            derivation=coding.MEAN,
        ),
        Measurement(
            name=coding.ATTENUATION_COEFFICIENT,
            value=organ.std_hu,
            unit=coding.HOUNSFIELD_UNIT,
            derivation=coding.STANDARD_DEVIATION,
        ),
    ]


def organ_cross_section_group(
    source: SourceSeries,
    label_map: np.ndarray,
    organ: OrganMeasurement,
    algorithm: AlgorithmInfo,
    run: RunIdentity,
    areas: np.ndarray | None = None,
) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    """One TID 1410 Measurement Group (125007, DCM) for an organ's largest cross-section: the same Tracking
    Identifier (112039, DCM) and Tracking Unique Identifier (112040, DCM) as its volumetric group, Finding
    Category/Finding/Finding Site as there, Image Region (111030, DCM) = SCOORD POLYLINE, first vertex = last
    (:func:`outer_boundary`), on the source slice where the organ covers most pixels (child IMAGE SELECTED FROM
    that slice), Algorithm Identification, and Area (42798000, SCT) in cm2 of that region (from Pixel Spacing).
    ``areas``: :func:`slice_areas` of ``label_map`` when already computed."""
    if label_map.shape != source.shape:
        raise ReportInputError(f"label map shape {label_map.shape} != source series shape {source.shape}")
    areas = slice_areas(label_map) if areas is None else areas
    if organ.label_value >= areas.shape[1] or not areas[:, organ.label_value].any():
        raise ReportInputError(f"organ {organ.label_name!r} has no voxels in the label map")
    index = int(np.argmax(areas[:, organ.label_value]))
    image = source.dataset_for(index)
    outline = outer_boundary(label_map[index] == organ.label_value)
    row_mm, column_mm = (float(v) for v in image.PixelSpacing)
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        **_organ_group_items(organ, algorithm, run),
        referenced_region=ImageRegion(
            graphic_type=GraphicTypeValues.POLYLINE,
            graphic_data=outline,
            source_image=SourceImageForRegion(str(image.SOPClassUID), str(image.SOPInstanceUID)),
        ),
        measurements=[
            Measurement(name=AREA, value=round(polygon_area(outline) * row_mm * column_mm / 100.0, 3),
                        unit=SQUARE_CENTIMETER)
        ],
    )


def _organ_group_items(organ: OrganMeasurement, algorithm: AlgorithmInfo, run: RunIdentity) -> dict:
    """What both measurement groups of an organ carry: Tracking Identifier (112039, DCM) = label name, Tracking
    Unique Identifier (112040, DCM) (derived from the run, so OHIF pairs the groups with the SEG segment), Finding
    Category/Finding (121071, DCM), Finding Site (363698007, SCT) with laterality, Algorithm Identification."""
    coded = organ.organ
    return {
        "tracking_identifier": TrackingIdentifier(uid=tracking_uid(run, MEASUREMENT_KIND, organ.label_name),
                                                  identifier=organ.label_name),
        "finding_category": coded.category,
        "finding_type": coded.property_type,
        "finding_sites": [FindingSite(anatomic_location=coded.property_type, laterality=coded.laterality)],
        "algorithm_id": algorithm_identification_items(algorithm),
    }


def organ_measurement_group(
    organ: OrganMeasurement,
    segmentation: SegmentationResult,
    algorithm: AlgorithmInfo,
    run: RunIdentity,
) -> VolumetricROIMeasurementsAndQualitativeEvaluations:
    """One TID 1411 Measurement Group (125007, DCM) for an organ: Tracking Identifier (112039, DCM) = label name and
    Tracking Unique Identifier (112040, DCM) (both always, OHIF needs both; the same UID as the SEG segment's
    Tracking UID), Finding Category/Finding (121071, DCM) = segmented property category/type, Finding Site
    (363698007, SCT) with laterality, Referenced Segment (121191, DCM) = the SEG segment with its Source Series
    for Segmentation (121232, DCM), Algorithm Identification (TID 4019) and the three measurements."""
    try:
        segment_number = segmentation.segment_numbers[organ.label_name]
    except KeyError:
        raise ReportInputError(f"organ {organ.label_name!r} has no segment in the segmentation") from None
    return VolumetricROIMeasurementsAndQualitativeEvaluations(
        **_organ_group_items(organ, algorithm, run),
        # The source SERIES, not every source image: on a 300-slice CT, one IMAGE item per slice per organ made the
        # SR thousands of items long (seconds to encode and send); the SEG itself references every source image.
        referenced_segment=ReferencedSegment(
            sop_class_uid=segmentation.dataset.SOPClassUID,
            sop_instance_uid=segmentation.dataset.SOPInstanceUID,
            segment_number=segment_number,
            source_series=SourceSeriesForSegmentation(segmentation.dataset.ReferencedSeriesSequence[0].SeriesInstanceUID),
        ),
        measurements=organ_measurements(organ),
    )


def build_measurement_report(
    source: SourceSeries,
    segmentation: SegmentationResult,
    organs: Sequence[OrganMeasurement],
    algorithm: AlgorithmInfo,
    run: RunIdentity,
    label_map: np.ndarray | None = None,
) -> Comprehensive3DSR:
    """Comprehensive 3D SR (1.2.840.10008.5.1.4.1.1.88.34) holding TID 1500 with root Imaging Measurement Report
    (126000, DCM): Language, Observation Context (the algorithm as device observer), Procedure Reported (25045-6,
    LN) and one measurement group per organ. Evidence: the source images and the SEG (Current Requested Procedure
    Evidence Sequence); completion PARTIAL, verification UNVERIFIED (an algorithm's output, not a signed report).
    ``label_map`` (``(n_slices, Rows, Columns)`` in source order, as for the SEG): when given, each organ's
    volumetric group is followed by its cross-section group (:func:`organ_cross_section_group`, see module note),
    measured on the SEG's per-slice areas of the same label map."""
    run.check_source(source)
    if not organs:
        raise ReportInputError("no organ measurements to report")
    groups: list[VolumetricROIMeasurementsAndQualitativeEvaluations | PlanarROIMeasurementsAndQualitativeEvaluations]
    groups = []
    for organ in organs:
        groups.append(organ_measurement_group(organ, segmentation, algorithm, run))
        if label_map is not None:
            groups.append(organ_cross_section_group(source, label_map, organ, algorithm, run, segmentation.areas))
    report = MeasurementReport(
        observation_context=observation_context(algorithm),
        procedure_reported=coding.PROCEDURE_CT,
        imaging_measurements=groups,
        title=REPORT_TITLE,
    )
    sr = Comprehensive3DSR(
        evidence=[*source.datasets, segmentation.dataset],
        content=report,
        is_complete=False,
        is_final=False,
        is_verified=False,
        series_description=MEASUREMENT_KIND.series_description,
        **new_series_arguments(MEASUREMENT_KIND, run),
    )
    stamp_node_identity(sr, source, MEASUREMENT_KIND, run, algorithm)
    declare_explicit_little_endian(sr)
    return sr
