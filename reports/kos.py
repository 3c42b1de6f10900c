"""Key Object Selection document flagging the images the model's answers drew on."""

from __future__ import annotations

from collections.abc import Sequence

from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from highdicom.sr import CodedConcept, ImageContentItem, RelationshipTypeValues
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from reports import coding
from reports.algorithm import device_observer_context
from reports.encoded import CONTENT_SEQUENCE, EncodedItems, declare_explicit_little_endian
from reports.inputs import AlgorithmInfo, ReportInputError, RunIdentity, SourceSeries, VqaAnswer, resolve_key_images
from reports.series import new_series_arguments, stamp_node_identity
from reports.uids import ObjectKind

KEY_OBJECTS_KIND = ObjectKind.KEY_OBJECTS
_MAX_DESCRIPTION = 1024  # TEXT has no hard limit, but a KOS description is read in a viewer's side panel


def _image_reference(key: tuple[str, str]) -> ImageContentItem:
    """The item highdicom's KeyObjectSelection makes for an image: CONTAINS IMAGE (260753009, SCT, "Source")."""
    sop_class_uid, sop_instance_uid = key
    return ImageContentItem(name=_SOURCE, referenced_sop_class_uid=sop_class_uid,
                            referenced_sop_instance_uid=sop_instance_uid,
                            relationship_type=RelationshipTypeValues.CONTAINS)


_SOURCE = CodedConcept(value="260753009", scheme_designator="SCT", meaning="Source")


def _insert_after_first_image(kos: KeyObjectSelectionDocument, items: list[Dataset]) -> None:
    children = list(kos.ContentSequence)
    position = next(i for i, child in enumerate(children) if child.ValueType == "IMAGE") + 1
    # plain pydicom Sequence: highdicom's ContentSequence accepts its own item classes only
    kos[CONTENT_SEQUENCE] = DataElement(CONTENT_SEQUENCE, "SQ",
                                         DicomSequence([*children[:position], *items, *children[position:]]))


def key_images_of_answers(answers: Sequence[VqaAnswer]) -> list[int | str]:
    """All key image references of the answers, first occurrence order, without repeats."""
    seen: dict[int | str, None] = {}
    for answer in answers:
        for reference in answer.key_images:
            seen.setdefault(reference, None)
    return list(seen)


def key_object_description(algorithm: AlgorithmInfo, answers: Sequence[VqaAnswer] = ()) -> str:
    """Text of Key Object Description (113012, DCM): which algorithm selected the images and for which questions."""
    text = f"Images selected by {algorithm.name} {algorithm.version} (automated, not reviewed)."
    questions = [a.question.strip() for a in answers if a.key_images]
    if questions:
        text += " Questions: " + " | ".join(questions)
    return text[:_MAX_DESCRIPTION]


def build_key_object_selection(
    source: SourceSeries,
    key_images: Sequence[int | str],
    algorithm: AlgorithmInfo,
    run: RunIdentity,
    *,
    description: str | None = None,
    extra_objects: Sequence[Dataset] = (),
) -> KeyObjectSelectionDocument:
    """Key Object Selection Document (1.2.840.10008.5.1.4.1.1.88.59), TID 2010: Document Title (113000, DCM)
    "Of Interest", the algorithm as device observer (TID 1002/1004), TEXT Key Object Description (113012, DCM),
    one IMAGE item per key image (slice index or SOP Instance UID of ``source``) and one COMPOSITE/IMAGE item per
    ``extra_objects`` (e.g. the SEG or the findings SR); Current Requested Procedure Evidence lists them all."""
    run.check_source(source)
    images = resolve_key_images(source, key_images)
    if not images:
        raise ReportInputError("no key images to select")
    # highdicom builds, deep-copies and re-parses every reference item (seconds for hundreds of key images); it gets
    # the first image only, the others are encoded items (reports.encoded, the same bytes as highdicom's) inserted
    # after it once the document exists. Evidence: all of them, as before.
    first, others = images[:1], images[1:]
    content = KeyObjectSelection(
        document_title=coding.OF_INTEREST,
        referenced_objects=[*first, *extra_objects],
        observer_device_context=device_observer_context(algorithm),
        description=description or key_object_description(algorithm),
    )
    kos = KeyObjectSelectionDocument(
        evidence=[*images, *extra_objects],
        content=content,
        series_description=KEY_OBJECTS_KIND.series_description,
        **new_series_arguments(KEY_OBJECTS_KIND, run),
    )
    if others:
        encoded = EncodedItems(_image_reference)
        _insert_after_first_image(kos, [encoded.item((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
                                        for ds in others])
    stamp_node_identity(kos, source, KEY_OBJECTS_KIND, run, algorithm)
    declare_explicit_little_endian(kos)
    return kos
