"""Findings SR of the model's answers: TID 1500 with one TID 1501 group per question.

TID 1501's qualitative evaluations are "coded questions with coded or text answers" (PS3.16 TID 1501 rows 11-12),
which is what a VQA answer is. highdicom's QualitativeEvaluation takes codes only (highdicom #124), so the text
rows are added as TEXT content items by hand.
"""

from __future__ import annotations

from collections.abc import Sequence

from highdicom.sr import (
    ComprehensiveSR,
    FindingSite,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)

from reports import coding
from reports.algorithm import algorithm_identification_items, observation_context
from reports.inputs import AlgorithmInfo, ReportInputError, RunIdentity, SourceSeries, VqaAnswer, resolve_key_images
from reports.series import new_series_arguments, stamp_node_identity
from reports.uids import ObjectKind, tracking_uid

FINDINGS_KIND = ObjectKind.FINDINGS_REPORT


def question_identifier(index: int) -> str:
    """Tracking Identifier of the ``index``-th question (0-based): "Q1", "Q2", ..."""
    return f"Q{index + 1}"


def answer_text_items(answer: VqaAnswer) -> list[TextContentItem]:
    """CONTAINS TEXT (VQA-QUESTION, 99OMNICT, "Question") = the question and CONTAINS TEXT Finding (121071, DCM) =
    the model's answer text, verbatim (the standard concept for a free-text finding, as in TID 2002)."""
    return [
        TextContentItem(coding.QUESTION, answer.question, relationship_type=RelationshipTypeValues.CONTAINS),
        TextContentItem(coding.FINDING, answer.answer, relationship_type=RelationshipTypeValues.CONTAINS),
    ]


def answer_evaluations(answer: VqaAnswer) -> list[QualitativeEvaluation]:
    """Coded rows: CODE <finding asked about, or Finding (121071, DCM)> = coded answer (when one is given), and
    CODE Priority (260870009, SCT) = Routine / Urgent / Emergency."""
    evaluations = []
    if answer.coded_answer is not None:
        evaluations.append(QualitativeEvaluation(name=answer.finding or coding.FINDING, value=answer.coded_answer))
    evaluations.append(QualitativeEvaluation(name=coding.PRIORITY, value=answer.urgency_level.value))
    return evaluations


def answer_group(
    index: int, answer: VqaAnswer, source: SourceSeries, algorithm: AlgorithmInfo, run: RunIdentity
) -> MeasurementsAndQualitativeEvaluations:
    """One TID 1501 Measurement Group (125007, DCM) per answer: Tracking Identifier (112039) "Q<n>" and Tracking
    Unique Identifier (112040), Finding (121071) = the finding asked about, Finding Site (363698007) = the organ,
    Algorithm Identification (TID 4019), one IMAGE Source of Measurement (121112, DCM) per key image the answer
    drew on, the coded evaluations of :func:`answer_evaluations` and the TEXT items of :func:`answer_text_items`."""
    identifier = question_identifier(index)
    site = answer.site
    source_images = [
        SourceImageForMeasurementGroup(str(ds.SOPClassUID), str(ds.SOPInstanceUID))
        for ds in resolve_key_images(source, answer.key_images)
    ]
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=tracking_uid(run, FINDINGS_KIND, identifier), identifier=identifier),
        finding_type=answer.finding,
        finding_sites=[FindingSite(site.property_type, laterality=site.laterality)] if site else None,
        algorithm_id=algorithm_identification_items(algorithm),
        qualitative_evaluations=answer_evaluations(answer),
        source_images=source_images or None,
    )
    group[0].ContentSequence.extend(answer_text_items(answer))
    return group


def build_findings_report(
    source: SourceSeries,
    answers: Sequence[VqaAnswer],
    algorithm: AlgorithmInfo,
    run: RunIdentity,
) -> ComprehensiveSR:
    """Comprehensive SR (1.2.840.10008.5.1.4.1.1.88.33), TID 1500 root Imaging Measurement Report (126000, DCM)
    with the algorithm as device observer and one group per answer (see :func:`answer_group`). Evidence: the
    source series. Declares the private scheme 99OMNICT in the Coding Scheme Identification Sequence (0008,0110).
    Completion PARTIAL, verification UNVERIFIED, preliminary."""
    run.check_source(source)
    if not answers:
        raise ReportInputError("no answers to report")
    report = MeasurementReport(
        observation_context=observation_context(algorithm),
        procedure_reported=coding.PROCEDURE_CT,
        imaging_measurements=[answer_group(i, a, source, algorithm, run) for i, a in enumerate(answers)],
        title=coding.IMAGING_MEASUREMENT_REPORT,
    )
    sr = ComprehensiveSR(
        evidence=list(source.datasets),
        content=report,
        is_complete=False,
        is_final=False,
        is_verified=False,
        coding_schemes=coding.private_coding_schemes(),
        series_description=FINDINGS_KIND.series_description,
        **new_series_arguments(FINDINGS_KIND, run),
    )
    stamp_node_identity(sr, source, FINDINGS_KIND, run, algorithm)
    return sr
