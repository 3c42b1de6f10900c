"""Narrative report: Findings / Impression text from a Jinja2 template, encoded as an Enhanced SR (TID 2000)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import jinja2
from highdicom.sr import (
    CodeContentItem,
    ContainerContentItem,
    EnhancedSR,
    LanguageOfContentItemAndDescendants,
    RelationshipTypeValues,
    TextContentItem,
)
from highdicom.sr.templates import DEFAULT_LANGUAGE  # en-US (RFC5646), what MeasurementReport uses too
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from reports import coding
from reports.algorithm import algorithm_identification_items, observation_context
from reports.encoded import declare_explicit_little_endian
from reports.inputs import AlgorithmInfo, OrganMeasurement, ReportInputError, RunIdentity, SourceSeries, VqaAnswer
from reports.series import new_series_arguments, stamp_node_identity
from reports.uids import ObjectKind

NARRATIVE_KIND = ObjectKind.NARRATIVE_REPORT
TEMPLATE_NAME = "narrative.txt.j2"
FINDINGS_HEADING = "FINDINGS"
IMPRESSION_HEADING = "IMPRESSION"
# Answers whose coded value says "nothing there" never reach the impression.
_NEGATIVE_ANSWERS = {coding.ABSENT.value, "17621005"}  # Absent, Normal (SCT)


@dataclass(frozen=True)
class NarrativeSections:
    """The statements of each section, one per TEXT content item."""

    findings: tuple[str, ...]
    impressions: tuple[str, ...]


@cache
def _environment() -> jinja2.Environment:
    # Plain text, so no HTML escaping; StrictUndefined turns a template typo into an error instead of a blank.
    return jinja2.Environment(
        loader=jinja2.PackageLoader("reports", "templates"),
        autoescape=False,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def load_template(template_name: str = TEMPLATE_NAME) -> jinja2.Template:
    """The compiled template (compiled on first use, then cached by the environment; a worker compiles it when it
    starts, see workers.tasks)."""
    return _environment().get_template(template_name)


def is_flagged(answer: VqaAnswer) -> bool:
    """An answer goes to the impression when it is not routine or its coded value is a positive finding."""
    if answer.urgency_level is not coding.Urgency.ROUTINE:
        return True
    return answer.coded_answer is not None and answer.coded_answer.value not in _NEGATIVE_ANSWERS


def render_narrative(
    organs: Sequence[OrganMeasurement],
    answers: Sequence[VqaAnswer],
    algorithm: AlgorithmInfo,
    template_name: str = TEMPLATE_NAME,
) -> str:
    """The narrative as plain text: a FINDINGS and an IMPRESSION section of "- " statements."""
    template = load_template(template_name)
    flagged = [a for a in answers if is_flagged(a)]
    return template.render(organs=list(organs), answers=list(answers), flagged=flagged, algorithm=algorithm)


def split_sections(text: str) -> NarrativeSections:
    """Parse rendered text back into sections: heading lines switch the section, "- " lines are statements."""
    sections: dict[str, list[str]] = {FINDINGS_HEADING: [], IMPRESSION_HEADING: []}
    current: list[str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if line in sections:
            current = sections[line]
        elif line:
            if current is None:
                raise ReportInputError(f"narrative text before the first heading: {line[:40]!r}")
            current.append(line.removeprefix("- ").strip())
    if not sections[FINDINGS_HEADING] or not sections[IMPRESSION_HEADING]:
        raise ReportInputError("narrative needs at least one FINDINGS and one IMPRESSION statement")
    return NarrativeSections(tuple(sections[FINDINGS_HEADING]), tuple(sections[IMPRESSION_HEADING]))


def _section(heading, entry_concept, statements: Sequence[str]) -> ContainerContentItem:
    container = ContainerContentItem(heading, relationship_type=RelationshipTypeValues.CONTAINS)
    container.ContentSequence = DicomSequence(
        [TextContentItem(entry_concept, text, relationship_type=RelationshipTypeValues.CONTAINS) for text in statements]
    )
    return container


def narrative_content(sections: NarrativeSections, algorithm: AlgorithmInfo) -> Dataset:
    """TID 2000 content tree: CONTAINER Diagnostic Imaging Report (18748-4, LN) with Language (121049, DCM), the
    algorithm as device observer (TID 1002/1004), Procedure Reported (121058, DCM) = (25045-6, LN), Algorithm
    Identification (TID 4019, HAS CONCEPT MOD), CONTAINER Findings (59776-5, LN) of TEXT Finding (121071, DCM)
    and CONTAINER Impressions (19005-8, LN) of TEXT Impression (121073, DCM)."""
    root = ContainerContentItem(coding.DIAGNOSTIC_IMAGING_REPORT, template_id="2000")
    root.ContentSequence = DicomSequence(
        [
            *LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE),
            *observation_context(algorithm),
            CodeContentItem(
                coding.codes.DCM.ProcedureReported,
                coding.PROCEDURE_CT,
                relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD,
            ),
            *algorithm_identification_items(algorithm),
            _section(coding.FINDINGS_SECTION, coding.FINDING, sections.findings),
            _section(coding.IMPRESSIONS_SECTION, coding.IMPRESSION, sections.impressions),
        ]
    )
    return root


def build_narrative_report(
    source: SourceSeries,
    text: str,
    algorithm: AlgorithmInfo,
    run: RunIdentity,
) -> EnhancedSR:
    """Enhanced SR (1.2.840.10008.5.1.4.1.1.88.22) of a rendered narrative (see :func:`render_narrative`), one TEXT
    item per statement (see :func:`narrative_content`). Evidence: the source series. Completion PARTIAL,
    verification UNVERIFIED, preliminary."""
    run.check_source(source)
    sr = EnhancedSR(
        evidence=list(source.datasets),
        content=narrative_content(split_sections(text), algorithm),
        is_complete=False,
        is_final=False,
        is_verified=False,
        series_description=NARRATIVE_KIND.series_description,
        **new_series_arguments(NARRATIVE_KIND, run),
    )
    stamp_node_identity(sr, source, NARRATIVE_KIND, run, algorithm)
    declare_explicit_little_endian(sr)
    return sr
