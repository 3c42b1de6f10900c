"""TID 1500 Measurement Report (Comprehensive 3D SR): organ volume and attenuation, one group per SEG segment."""

from __future__ import annotations

from collections.abc import Sequence

from highdicom.sr import (
    Comprehensive3DSR,
    FindingSite,
    Measurement,
    MeasurementReport,
    ReferencedSegment,
    TrackingIdentifier,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)

from reports import coding
from reports.algorithm import algorithm_identification_items, observation_context
from reports.inputs import AlgorithmInfo, OrganMeasurement, ReportInputError, RunIdentity, SourceSeries
from reports.seg import SegmentationResult
from reports.series import new_series_arguments, stamp_node_identity
from reports.uids import ObjectKind, tracking_uid

MEASUREMENT_KIND = ObjectKind.MEASUREMENT_REPORT
REPORT_TITLE = coding.IMAGING_MEASUREMENT_REPORT


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


def organ_measurement_group(
    organ: OrganMeasurement,
    segmentation: SegmentationResult,
    algorithm: AlgorithmInfo,
    run: RunIdentity,
) -> VolumetricROIMeasurementsAndQualitativeEvaluations:
    """One TID 1411 Measurement Group (125007, DCM) for an organ: Tracking Identifier (112039, DCM) = label name and
    Tracking Unique Identifier (112040, DCM) (both always, OHIF needs both; the same UID as the SEG segment's
    Tracking UID), Finding Category/Finding (121071, DCM) = segmented property category/type, Finding Site
    (363698007, SCT) with laterality, Referenced Segment (121191, DCM) = the SEG segment with its Source Images
    for Segmentation (the source CT images), Algorithm Identification (TID 4019) and the three measurements."""
    try:
        segment_number = segmentation.segment_numbers[organ.label_name]
    except KeyError:
        raise ReportInputError(f"organ {organ.label_name!r} has no segment in the segmentation") from None
    coded = organ.organ
    return VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=tracking_uid(run, MEASUREMENT_KIND, organ.label_name),
            identifier=organ.label_name,
        ),
        referenced_segment=ReferencedSegment.from_segmentation(segmentation.dataset, segment_number),
        finding_category=coded.category,
        finding_type=coded.property_type,
        finding_sites=[FindingSite(anatomic_location=coded.property_type, laterality=coded.laterality)],
        algorithm_id=algorithm_identification_items(algorithm),
        measurements=organ_measurements(organ),
    )


def build_measurement_report(
    source: SourceSeries,
    segmentation: SegmentationResult,
    organs: Sequence[OrganMeasurement],
    algorithm: AlgorithmInfo,
    run: RunIdentity,
) -> Comprehensive3DSR:
    """Comprehensive 3D SR (1.2.840.10008.5.1.4.1.1.88.34) holding TID 1500 with root Imaging Measurement Report
    (126000, DCM): Language, Observation Context (the algorithm as device observer), Procedure Reported (25045-6,
    LN) and one measurement group per organ. Evidence: the source images and the SEG (Current Requested Procedure
    Evidence Sequence); completion PARTIAL, verification UNVERIFIED (an algorithm's output, not a signed report)."""
    run.check_source(source)
    if not organs:
        raise ReportInputError("no organ measurements to report")
    report = MeasurementReport(
        observation_context=observation_context(algorithm),
        procedure_reported=coding.PROCEDURE_CT,
        imaging_measurements=[organ_measurement_group(o, segmentation, algorithm, run) for o in organs],
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
    return sr
