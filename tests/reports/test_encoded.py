"""The fast encoding paths of the result objects write exactly what highdicom and pydicom would have written.

Key image items (findings SR, KOS) are encoded once per image and copied as raw elements, attached after highdicom's
constructor; the trees are declared Explicit VR Little Endian so pydicom writes raw items as they are. These tests
build the same content the slow way (highdicom items, pydicom's full re-encoding) and compare bytes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from highdicom.ko import KeyObjectSelection
from highdicom.sr import ImageContentItem, RelationshipTypeValues
from pydicom.dataset import Dataset

from reports import AlgorithmInfo, RunIdentity, VqaAnswer, build_result_objects, coding
from reports.algorithm import device_observer_context
from reports.encoded import EncodedItems, declare_explicit_little_endian, encode_explicit_le
from reports.kos import key_images_of_answers, key_object_description
from reports.inputs import resolve_key_images
from reports.vqa_sr import BEST_ILLUSTRATION_OF_FINDING, coded_finding_of
from tests.reports import dicom_tools
from tests.reports.synthetic_ct import SLICES, SyntheticCt, build_synthetic_ct

ALGORITHM = AlgorithmInfo("OmniCT", "1.0", {"checkpoint": "tiny"})
CREATED = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> SyntheticCt:
    return build_synthetic_ct(tmp_path_factory.mktemp("encoded") / "ct")


def many_key_image_answers(ct: SyntheticCt) -> list[VqaAnswer]:
    """Answers naming many key images, by index and by UID, overlapping, as the model's answers do."""
    uids = ct.source.sop_instance_uids
    return [
        VqaAnswer("Is there a pleural effusion?", "Yes, small, right.", coded_answer=coding.PRESENT,
                  finding=coding.FINDINGS["pleural_effusion"], finding_site="lung_right",
                  key_images=tuple(range(SLICES)), urgency="urgent"),
        VqaAnswer("Describe the liver.", "Homogeneous – no lesion ≥ 5 mm.", finding_site="liver",
                  key_images=tuple(uids[1:6])),
        VqaAnswer("Is there ascites?", "No ascites.", coded_answer=coding.ABSENT, finding=coding.FINDINGS["ascites"],
                  key_images=(7, 0, 3, uids[3])),
    ]


@pytest.fixture(scope="module")
def written(ct: SyntheticCt, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    objects = build_result_objects(ct.source, ct.label_map, ct.organs, many_key_image_answers(ct), ALGORITHM,
                                   RunIdentity(ct.source.study_instance_uid, "run-encoded", CREATED))
    paths = objects.write(tmp_path_factory.mktemp("encoded-out"))
    return {ds.SOPClassUID.name: path for ds, path in zip(objects.datasets(), paths, strict=True)}


def _reencoded_fully(path: Path) -> bytes:
    """The file read back, every element decoded, and written again through pydicom's ordinary path."""
    dataset = pydicom.dcmread(path)
    stack = [dataset]
    while stack:
        current = stack.pop()
        current.set_original_encoding(None, None, "")
        for element in list(current):  # decodes raw elements
            if element.VR == "SQ":
                stack.extend(element.value)
    out = BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize("sop_class", ["Segmentation Storage", "Comprehensive 3D SR Storage", "Comprehensive SR Storage",
                                       "Enhanced SR Storage", "Key Object Selection Document Storage"])
def test_files_are_what_pydicom_writes_for_their_decoded_content(written: dict[str, Path], sop_class: str) -> None:
    path = written[sop_class]
    assert path.read_bytes() == _reencoded_fully(path)
    assert dicom_tools.dciodvfy(path).errors == []


@pytest.mark.parametrize("sop_class", ["Comprehensive SR Storage", "Key Object Selection Document Storage"])
def test_documents_with_many_key_images_pass_dsrdump(written: dict[str, Path], sop_class: str) -> None:
    done = dicom_tools.dsrdump(written[sop_class])
    assert done.returncode == 0, done.stderr
    assert "E:" not in done.stderr and "F:" not in done.stderr, done.stderr


def test_key_image_items_are_highdicoms_items(ct: SyntheticCt, written: dict[str, Path]) -> None:
    findings = pydicom.dcmread(written["Comprehensive SR Storage"])
    images = [item for item in dicom_tools.content_items(findings) if item.ValueType == "IMAGE"]
    # first answer: every slice, twice (answer text and coded finding); second: 5, once (no coded finding);
    # third: 3 distinct slices, twice
    assert len(images) == 2 * SLICES + 5 + 2 * 3
    expected_uids = []  # per answer, in document order: below the answer text, then below the coded finding
    for answer in many_key_image_answers(ct):
        uids = [str(ds.SOPInstanceUID) for ds in resolve_key_images(ct.source, answer.key_images)]
        expected_uids += uids * (2 if coded_finding_of(answer) is not None else 1)
    assert [str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for item in images] == expected_uids
    for item in images:
        reference = item.ReferencedSOPSequence[0]
        expected = ImageContentItem(BEST_ILLUSTRATION_OF_FINDING, reference.ReferencedSOPClassUID,
                                    reference.ReferencedSOPInstanceUID,
                                    relationship_type=RelationshipTypeValues.INFERRED_FROM)
        assert encode_explicit_le(item) == encode_explicit_le(expected)


def test_kos_content_is_what_highdicom_builds_with_every_image(ct: SyntheticCt, written: dict[str, Path]) -> None:
    answers = many_key_image_answers(ct)
    kos = pydicom.dcmread(written["Key Object Selection Document Storage"])
    findings = pydicom.dcmread(written["Comprehensive SR Storage"])
    images = [ct.source.dataset_for(ref) for ref in key_images_of_answers(answers)]
    images = [ds for ds in ct.source.datasets if ds in images]  # series order
    reference = KeyObjectSelection(document_title=coding.OF_INTEREST, referenced_objects=[*images, findings],
                                   observer_device_context=device_observer_context(ALGORITHM),
                                   description=key_object_description(ALGORITHM, answers))[0]
    content = Dataset()
    for tag in reference.keys():
        content[tag] = kos[tag]
    assert encode_explicit_le(content) == encode_explicit_le(reference)
    listed = {ref.ReferencedSOPInstanceUID for study in kos.CurrentRequestedProcedureEvidenceSequence
              for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert listed == {ds.SOPInstanceUID for ds in images} | {findings.SOPInstanceUID}


def test_encoded_items_are_independent_datasets() -> None:
    items = EncodedItems(lambda key: ImageContentItem(BEST_ILLUSTRATION_OF_FINDING, key[0], key[1],
                                                      relationship_type=RelationshipTypeValues.INFERRED_FROM))
    first, second = items.item(("1.2.840.10008.5.1.4.1.1.2", "1.2.3")), items.item(("1.2.840.10008.5.1.4.1.1.2", "1.2.3"))
    first.RelationshipType = "CONTAINS"
    assert second.RelationshipType == "INFERRED FROM"
    assert second.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == "1.2.3"


def test_declaring_a_dataset_resolves_ambiguous_vrs_as_pydicom_would(ct: SyntheticCt) -> None:
    """Pixel Data of a 1-bit SEG is "OB or OW" until written: declaring resolves it to OB, as pydicom's writer."""
    from reports.seg import build_segmentation

    run = RunIdentity(ct.source.study_instance_uid, "run-vr", CREATED)
    declared = build_segmentation(ct.source, ct.label_map, ct.organs, ALGORITHM, run).dataset
    assert declared["PixelData"].VR == "OB"
    plain = build_segmentation(ct.source, ct.label_map, ct.organs, ALGORITHM, run).dataset
    plain["PixelData"].VR = "OB or OW"
    stack = [plain]
    while stack:  # undo the declaration everywhere: pydicom's ordinary path
        current = stack.pop()
        current.set_original_encoding(None, None, "")
        stack.extend(item for element in current if element.VR == "SQ" for item in element.value)
    out_declared, out_plain = BytesIO(), BytesIO()
    declared.save_as(out_declared, enforce_file_format=True)
    plain.save_as(out_plain, enforce_file_format=True)
    assert out_declared.getvalue() == out_plain.getvalue()


def test_encoded_items_refuse_other_transfer_syntaxes() -> None:
    dataset = Dataset()
    dataset.file_meta = pydicom.dataset.FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    with pytest.raises(ValueError, match="Explicit VR Little Endian"):
        declare_explicit_little_endian(dataset)
