"""Findings SR of the model's answers: a TID 2000 Basic Diagnostic Imaging Report (Comprehensive SR).

Why TID 2000 and not TID 1500: a VQA answer has no spatial coordinates, and OHIF 3 (3.13) sends every TID 1500
document (root 126000) to its measurement viewport, which fails on groups without a SCOORD; any other root is shown
as a text tree. TID 2000 is also what the content is: report narrative (TID 2002) inferred from images (TID 2001).

Content tree (TID row order; "Order: Significant" at the root)::

    CONTAINER (18748-4, LN, "Diagnostic Imaging Report")                          TID 2000 row 1, SEPARATE
     > HAS CONCEPT MOD  CODE (121058, DCM, "Procedure reported") = (25045-6, LN)   row 2
     > HAS CONCEPT MOD  CODE (121049, DCM, "Language of Content Item...")          row 5, TID 1204
     > HAS OBS CONTEXT  Observer Type = Device + TID 1004 (the algorithm)          row 7, TID 1001/1002/1004
     > HAS CONCEPT MOD  TID 4019 Algorithm Identification (name, version, parameters, family, manufacturer)
     > CONTAINS CONTAINER (59776-5, LN, "Findings")                               row 8, SEPARATE
        per answer, in question order (TID 2002):
        >> CONTAINS TEXT (VQA-QUESTION, 99OMNICT, "Question") = the question
        >> CONTAINS TEXT (121071, DCM, "Finding") = the model's answer, verbatim
           >>> HAS CONCEPT MOD CODE (260870009, SCT, "Priority") = Routine / Urgent / Emergency
           >>> HAS CONCEPT MOD CODE (121052, DCM, "Presence of property")   a bare Present/Absent without a finding
           >>> HAS CONCEPT MOD CODE (363698007, SCT, "Finding Site")        only without a coded finding
           >>> INFERRED FROM IMAGE (121080, DCM, "Best illustration of finding"), one per key image (TID 2001)
        >> CONTAINS CODE <the finding asked about, SNOMED CT> = Present / Absent / Undetermined (CID 240)
           (or CODE (121071, DCM, "Finding") = <finding> when the coded answer is itself the finding)
           >>> HAS CONCEPT MOD CODE (363698007, SCT, "Finding Site") = organ (>>>> Laterality)
           >>> INFERRED FROM IMAGE (121080, DCM, "Best illustration of finding"), one per key image

Standard notes. TID 2002's concept names are Baseline (BCID 7002), so the private Question concept and a finding
code as the concept name of the coded answer are allowed; HAS CONCEPT MOD children may post-coordinate any content
item (PS3.16 6.2.4), which carries site and priority. The coded finding names the finding and states its presence in
one item ("Ascites = Absent", Undetermined when the answer was not coded) rather than "Finding = Ascites" with a
Presence of property modifier, because OHIF shows only a content item's own value, never its children: a modifier
saying Absent would be invisible there and the line would read as the finding being present.
Findings heading: (59776-5, LN), the CID 7001 code (the older (121070, DCM) is no longer in any context group), as
in the narrative report. The TID 4019 items have no row in TID 2000 (Non-Extensible); they sit where the narrative
report puts them, as concept modifiers of the root.
OHIF renders the direct children of containers as "Concept: value" lines (SEPARATE continuity), so question, answer
and coded finding are readable there; the IMAGE items, one level down, are not drawn as "[IMAGE is not supported]".
"""

from __future__ import annotations

from collections.abc import Sequence

from highdicom.sr import (
    CodeContentItem,
    ComprehensiveSR,
    ContainerContentItem,
    FindingSite,
    ImageContentItem,
    LanguageOfContentItemAndDescendants,
    RelationshipTypeValues,
    TextContentItem,
)
from highdicom.sr.templates import DEFAULT_LANGUAGE  # en-US (RFC5646), as the narrative and measurement SRs
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from reports import coding
from reports.algorithm import algorithm_identification_items, observation_context
from reports.encoded import (CONTENT_SEQUENCE, EncodedItems, declare_explicit_little_endian, encode_item,
                             raw_sequence)
from reports.inputs import AlgorithmInfo, ReportInputError, RunIdentity, SourceSeries, VqaAnswer, resolve_key_images
from reports.series import new_series_arguments, stamp_node_identity
from reports.uids import ObjectKind

FINDINGS_KIND = ObjectKind.FINDINGS_REPORT
TEMPLATE_ID = "2000"
PRESENCE_OF_PROPERTY = codes.DCM.PresenceOfProperty  # (121052, DCM) concept modifier: present or absent
UNDETERMINED = codes.cid240.Undetermined  # (373068000, SCT): presence when the answer was not coded
BEST_ILLUSTRATION_OF_FINDING = codes.DCM.BestIllustrationOfFinding  # (121080, DCM), CID 7003 purpose of reference
_PRESENCE_VALUES = {code.value for code in codes.cid240.concepts.values()}  # Present, Absent, Undetermined (SCT)

_CONTAINS = RelationshipTypeValues.CONTAINS
_CONCEPT_MOD = RelationshipTypeValues.HAS_CONCEPT_MOD
_INFERRED_FROM = RelationshipTypeValues.INFERRED_FROM


def is_presence(code: Code | None) -> bool:
    """Whether ``code`` is a CID 240 presence value (Present, Absent, Undetermined) rather than a finding."""
    return code is not None and code.scheme_designator == "SCT" and code.value in _PRESENCE_VALUES


def coded_finding_of(answer: VqaAnswer) -> tuple[Code, Code] | None:
    """(concept name, value) of the answer's coded finding: (the finding asked about, its presence) with presence
    Undetermined when the answer was not coded; (Finding (121071, DCM), the coded answer) when the coded answer is
    itself a finding; None when nothing is coded or the coded answer is a bare presence without a finding."""
    if answer.finding is not None:
        presence = answer.coded_answer if answer.coded_answer is not None else UNDETERMINED
        if not is_presence(presence):
            raise ReportInputError(
                f"coded answer {answer.coded_answer} to a question about {answer.finding.meaning!r} is not "
                "Present/Absent/Undetermined (CID 240)"
            )
        return answer.finding, presence
    if answer.coded_answer is not None and not is_presence(answer.coded_answer):
        return coding.FINDING, answer.coded_answer
    return None


def _key_image_builder(key: tuple[str, str]) -> ImageContentItem:
    sop_class_uid, sop_instance_uid = key
    return ImageContentItem(BEST_ILLUSTRATION_OF_FINDING, sop_class_uid, sop_instance_uid,
                            relationship_type=_INFERRED_FROM)


class KeyImageItems:
    """The IMAGE items of one document (see :mod:`reports.encoded`): each distinct key image is built by highdicom
    once, then copied as encoded elements for every answer that names it. A findings SR of a 300-slice study holds
    thousands of them; building, deep-copying and writing each through highdicom/pydicom took seconds."""

    def __init__(self) -> None:
        self._items = EncodedItems(_key_image_builder)

    @staticmethod
    def _keys(source: SourceSeries, answer: VqaAnswer) -> list[tuple[str, str]]:
        return [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in resolve_key_images(source, answer.key_images)]

    def encoded(self, source: SourceSeries, answer: VqaAnswer) -> list[bytes]:
        """INFERRED FROM IMAGE (121080, DCM, "Best illustration of finding") per key image of the answer (TID 2001
        row 1): Referenced SOP Sequence (0008,1199) = the source slice's SOP Class / Instance UID, in series
        order; each the encoded item highdicom's ImageContentItem writes."""
        return [self._items.encoded(key) for key in self._keys(source, answer)]


class _DeferredChildren:
    """Key image children attached to content items after the SR constructor ran.

    highdicom's SR constructor deep-copies and re-parses the whole content tree and walks it for references; with
    thousands of IMAGE items that took seconds. The tree is therefore handed to it without the key image items; they
    are attached afterwards to the very item datasets the document holds (the constructor copies the root's elements
    by reference), each item's Content Sequence then written as one encoded sequence (the other children encoded by
    pydicom in the document's character set, the images from their encoded copies): the bytes pydicom would write.
    Reading the item decodes it as any sequence read from a file. The evidence is unchanged: every key image is a
    source image (``resolve_key_images`` refuses any other), and all source images are the document's evidence."""

    def __init__(self) -> None:
        self.pending: list[tuple[Dataset, list[bytes]]] = []

    def add(self, item: Dataset, images: list[bytes]) -> None:
        if images:
            self.pending.append((item, images))

    def attach(self, character_set: str | list[str]) -> None:
        for item, images in self.pending:
            children = list(item.ContentSequence) if "ContentSequence" in item else []
            item[CONTENT_SEQUENCE] = raw_sequence(
                CONTENT_SEQUENCE, [*(encode_item(child, character_set) for child in children), *images])
        self.pending = []


def finding_site_item(answer: VqaAnswer) -> FindingSite | None:
    """HAS CONCEPT MOD CODE Finding Site (363698007, SCT) = the organ's SNOMED CT code, with HAS CONCEPT MOD
    Laterality (272741003, SCT) below it for paired organs; None when the answer names no site."""
    site = answer.site
    return None if site is None else FindingSite(site.property_type, laterality=site.laterality)


def presence_item(presence: Code) -> CodeContentItem:
    """HAS CONCEPT MOD CODE Presence of property (121052, DCM) = Present / Absent / Undetermined (SCT, CID 240)."""
    return CodeContentItem(PRESENCE_OF_PROPERTY, presence, relationship_type=_CONCEPT_MOD)


def question_item(answer: VqaAnswer) -> TextContentItem:
    """CONTAINS TEXT (VQA-QUESTION, 99OMNICT, "Question") = the question put to the model, verbatim."""
    return TextContentItem(coding.QUESTION, answer.question, relationship_type=_CONTAINS)


def answer_text_item(answer: VqaAnswer, key_images: list[bytes], deferred: _DeferredChildren) -> TextContentItem:
    """CONTAINS TEXT Finding (121071, DCM) = the model's answer, verbatim (TID 2002 row 3), with HAS CONCEPT MOD
    Priority (260870009, SCT) = the urgency, and INFERRED FROM the key images (TID 2002 row 4). Without a coded
    finding, the presence (a bare Present/Absent coded answer) and the finding site modify this item instead."""
    item = TextContentItem(coding.FINDING, answer.answer, relationship_type=_CONTAINS)
    children: list[Dataset] = [
        CodeContentItem(coding.PRIORITY, answer.urgency_level.value, relationship_type=_CONCEPT_MOD)
    ]
    if coded_finding_of(answer) is None:
        if answer.coded_answer is not None:
            children.append(presence_item(answer.coded_answer))
        site = finding_site_item(answer)
        if site is not None:
            children.append(site)
    item.ContentSequence = DicomSequence(children)
    deferred.add(item, key_images)
    return item


def coded_finding_item(answer: VqaAnswer, key_images: list[bytes],
                       deferred: _DeferredChildren) -> CodeContentItem | None:
    """CONTAINS CODE (TID 2002 row 1) of :func:`coded_finding_of`, e.g. Pleural effusion (60046008, SCT) = Present
    (52101004, SCT), with HAS CONCEPT MOD Finding Site (363698007, SCT) and INFERRED FROM the key images (TID 2002
    row 2); None when nothing is coded."""
    coded = coded_finding_of(answer)
    if coded is None:
        return None
    name, value = coded
    item = CodeContentItem(name, value, relationship_type=_CONTAINS)
    children: list[Dataset] = []
    site = finding_site_item(answer)
    if site is not None:
        children.append(site)
    if children:
        item.ContentSequence = DicomSequence(children)
    deferred.add(item, key_images)
    return item


def answer_items(source: SourceSeries, answer: VqaAnswer, images: KeyImageItems,
                 deferred: _DeferredChildren) -> list[Dataset]:
    """The TID 2002 items of one answer, in reading order: question, answer text, coded finding (if any); the key
    images of the answer below the answer text and the coded finding (attached by ``deferred``)."""
    key_images = images.encoded(source, answer)
    items: list[Dataset] = [question_item(answer), answer_text_item(answer, key_images, deferred)]
    coded = coded_finding_item(answer, key_images, deferred)
    if coded is not None:
        items.append(coded)
    return items


def findings_section(source: SourceSeries, answers: Sequence[VqaAnswer],
                     deferred: _DeferredChildren) -> ContainerContentItem:
    """CONTAINS CONTAINER Findings (59776-5, LN) (TID 2000 row 8, CID 7001), continuity SEPARATE, holding the items
    of :func:`answer_items` for every answer."""
    section = ContainerContentItem(coding.FINDINGS_SECTION, is_content_continuous=False, relationship_type=_CONTAINS)
    images = KeyImageItems()
    section.ContentSequence = DicomSequence(
        [item for answer in answers for item in answer_items(source, answer, images, deferred)])
    return section


def findings_content(source: SourceSeries, answers: Sequence[VqaAnswer], algorithm: AlgorithmInfo,
                     deferred: _DeferredChildren) -> Dataset:
    """The TID 2000 root: CONTAINER Diagnostic Imaging Report (18748-4, LN), continuity SEPARATE, Content Template
    Sequence (0040,A504) = DCMR 2000, with Procedure Reported (121058, DCM) = CT unspecified body region (25045-6,
    LN), Language (TID 1204), the algorithm as device observer (TID 1001/1002/1004), Algorithm Identification
    (TID 4019) and the Findings section (:func:`findings_section`)."""
    root = ContainerContentItem(coding.DIAGNOSTIC_IMAGING_REPORT, is_content_continuous=False, template_id=TEMPLATE_ID)
    root.ContentSequence = DicomSequence(
        [
            CodeContentItem(codes.DCM.ProcedureReported, coding.PROCEDURE_CT, relationship_type=_CONCEPT_MOD),
            *LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE),
            *observation_context(algorithm),
            *algorithm_identification_items(algorithm),
            findings_section(source, answers, deferred),
        ]
    )
    return root


def build_findings_report(
    source: SourceSeries,
    answers: Sequence[VqaAnswer],
    algorithm: AlgorithmInfo,
    run: RunIdentity,
) -> ComprehensiveSR:
    """Comprehensive SR (1.2.840.10008.5.1.4.1.1.88.33) holding a TID 2000 Basic Diagnostic Imaging Report of the
    answers (see :func:`findings_content` and the module note). Evidence (Current Requested Procedure Evidence
    Sequence): the source series. Declares the private scheme 99OMNICT in the Coding Scheme Identification Sequence
    (0008,0110). Completion PARTIAL, verification UNVERIFIED, preliminary. UIDs from ``run`` (same run, same UIDs)."""
    run.check_source(source)
    if not answers:
        raise ReportInputError("no answers to report")
    deferred = _DeferredChildren()
    sr = ComprehensiveSR(
        evidence=list(source.datasets),
        content=findings_content(source, answers, algorithm, deferred),
        is_complete=False,
        is_final=False,
        is_verified=False,
        coding_schemes=coding.private_coding_schemes(),
        series_description=FINDINGS_KIND.series_description,
        **new_series_arguments(FINDINGS_KIND, run),
    )
    stamp_node_identity(sr, source, FINDINGS_KIND, run, algorithm)
    deferred.attach(sr.SpecificCharacterSet)  # after the character set is final: the children are encoded in it
    declare_explicit_little_endian(sr)
    return sr
