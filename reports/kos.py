"""Key Object Selection document flagging the images the model's answers drew on."""

from __future__ import annotations

from collections.abc import Sequence

from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from pydicom.dataset import Dataset

from reports import coding
from reports.algorithm import device_observer_context
from reports.inputs import AlgorithmInfo, ReportInputError, RunIdentity, SourceSeries, VqaAnswer, resolve_key_images
from reports.series import new_series_arguments, stamp_node_identity
from reports.uids import ObjectKind

KEY_OBJECTS_KIND = ObjectKind.KEY_OBJECTS
_MAX_DESCRIPTION = 1024  # TEXT has no hard limit, but a KOS description is read in a viewer's side panel


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
    content = KeyObjectSelection(
        document_title=coding.OF_INTEREST,
        referenced_objects=[*images, *extra_objects],
        observer_device_context=device_observer_context(algorithm),
        description=description or key_object_description(algorithm),
    )
    kos = KeyObjectSelectionDocument(
        evidence=[*images, *extra_objects],
        content=content,
        series_description=KEY_OBJECTS_KIND.series_description,
        **new_series_arguments(KEY_OBJECTS_KIND, run),
    )
    stamp_node_identity(kos, source, KEY_OBJECTS_KIND, run, algorithm)
    return kos
