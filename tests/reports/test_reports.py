"""The result objects, checked by the real validators (dciodvfy, dsrdump, dsr2html) and by reading them back."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from reports import (
    AlgorithmInfo,
    ObjectKind,
    OrganMeasurement,
    ReportInputError,
    ResultObjects,
    RunIdentity,
    SourceSeries,
    VqaAnswer,
    build_key_object_selection,
    build_result_objects,
    build_segmentation,
    coding,
)
from reports.narrative import render_narrative, split_sections
from reports.uids import derive_uid
from tests.reports import dicom_tools
from tests.reports.synthetic_ct import SyntheticCt, build_synthetic_ct

ALGORITHM = AlgorithmInfo("OmniCT-7B", "0.3.1", {"slices": "8", "precision": "bf16"}, source="omnict.safetensors")
SEG_ALGORITHM = AlgorithmInfo("TotalSegmentator", "2.18.0", {"task": "total", "fast": "true"})
CREATED = datetime(2026, 11, 22, 10, 30, tzinfo=UTC)
UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def make_answers(source: SourceSeries) -> list[VqaAnswer]:
    return [
        VqaAnswer(
            question="Is there a pleural effusion?",
            answer="Yes, a small right-sided pleural effusion is present.",
            coded_answer=coding.PRESENT,
            finding=coding.FINDINGS["pleural_effusion"],
            finding_site="lung_right",
            key_images=(5, 6),
            urgency="urgent",
        ),
        VqaAnswer(
            question="Describe the liver.",
            answer="The liver has homogeneous attenuation – no focal lesion ≥ 5 mm.",  # non-Latin-1 on purpose
            finding_site="liver",
            key_images=(source.sop_instance_uids[3],),
        ),
        VqaAnswer(
            question="Is there ascites?",
            answer="No ascites.",
            coded_answer=coding.ABSENT,
            finding=coding.FINDINGS["ascites"],
        ),
    ]


@dataclass
class Built:
    ct: SyntheticCt
    run: RunIdentity
    answers: list[VqaAnswer]
    objects: ResultObjects
    files: dict[str, Path]  # key -> written file


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("reports")
    ct = build_synthetic_ct(root / "ct")
    source = SourceSeries.from_files(ct.files)  # headers only, as the pipeline would pass them
    run = RunIdentity(source.study_instance_uid, "run-0001", CREATED)
    answers = make_answers(source)
    objects = build_result_objects(
        source, ct.label_map, ct.organs, answers, ALGORITHM, run, segmentation_algorithm=SEG_ALGORITHM
    )
    named = {
        "seg": objects.measured.segmentation.dataset,
        "measurements": objects.measured.measurement_report,
        "findings": objects.reading.findings_report,
        "narrative": objects.reading.narrative_report,
        "kos": objects.reading.key_objects,
    }
    files = {}
    for name, dataset in named.items():
        files[name] = root / "out" / f"{name}.dcm"
        files[name].parent.mkdir(exist_ok=True)
        dataset.save_as(files[name], enforce_file_format=True)
    return Built(ct, run, answers, objects, files)


def read(built: Built, name: str) -> pydicom.Dataset:
    return pydicom.dcmread(built.files[name])


# --- Validators ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["seg", "measurements", "findings", "narrative", "kos"])
def test_dciodvfy_reports_no_errors(built: Built, name: str) -> None:
    verdict = dicom_tools.dciodvfy(built.files[name])
    assert verdict.errors == [], verdict.output
    assert verdict.unexpected_warnings == [], verdict.output


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "measurements",
            ['(112039,DCM,"Tracking Identifier")="liver"', '(118565006,SCT,"Volume")', "(cm3,UCUM", "Hounsfield unit"],
        ),
        (
            "findings",
            [
                '<CONTAINER:(18748-4,LN,"Diagnostic Imaging Report")=SEPARATE>',
                '<contains CONTAINER:(59776-5,LN,"Findings")=SEPARATE>',
                '<contains TEXT:(VQA-QUESTION,99OMNICT,"Question")="Is there a pleural effusion?">',
                '<contains TEXT:(121071,DCM,"Finding")="Yes, a small right-sided pleural effusion is present.">',
                '<has concept mod CODE:(260870009,SCT,"Priority")=(103391001,SCT,"Urgent")>',
                '<inferred from IMAGE:(121080,DCM,"Best illustration of finding")=(CT image,',
                '<contains CODE:(60046008,SCT,"Pleural effusion")=(52101004,SCT,"Present")>',
                '<has concept mod CODE:(363698007,SCT,"Finding Site")=(39607008,SCT,"Lung")>',
                '<has concept mod CODE:(272741003,SCT,"Laterality")=(24028007,SCT,"Right")>',
                '<contains CODE:(389026000,SCT,"Ascites")=(272519000,SCT,"Absent")>',
            ],
        ),
        ("narrative", ['(59776-5,LN,"Findings")', '(19005-8,LN,"Impressions")', "URGENT: Yes, a small right-sided"]),
        ("kos", ['(113000,DCM,"Of Interest")', "Images selected by OmniCT-7B 0.3.1"]),
    ],
)
def test_dsrdump_and_dsr2html_render_the_content(built: Built, name: str, expected: list[str], tmp_path: Path) -> None:
    dump = dicom_tools.dsrdump(built.files[name])
    assert dump.returncode == 0, dump.stderr
    for text in expected:
        assert text in dump.stdout, f"{text!r} missing from dsrdump output:\n{dump.stdout}"
    html = tmp_path / f"{name}.html"
    rendered = dicom_tools.dsr2html(built.files[name], html)
    assert rendered.returncode == 0, rendered.stderr
    page = html.read_text(errors="replace")
    assert "<html" in page.lower() and len(page) > 1000


# --- Structure -------------------------------------------------------------------------------------------------


def test_every_measurement_group_has_tracking_identifier_and_uid(built: Built) -> None:
    items = dicom_tools.content_items(read(built, "measurements"))
    groups = [i for i in items if dicom_tools.concept(i) == ("125007", "DCM")]
    assert groups
    for group in groups:
        identifiers = dicom_tools.children(group, "112039", "DCM")
        uids = dicom_tools.children(group, "112040", "DCM")
        assert len(identifiers) == 1 and identifiers[0].TextValue
        assert len(uids) == 1 and UID_PATTERN.match(uids[0].UID)


def test_measurements_round_trip_and_reference_their_segment(built: Built) -> None:
    seg = read(built, "seg")
    sr = read(built, "measurements")
    groups = [i for i in dicom_tools.content_items(sr) if dicom_tools.concept(i) == ("125007", "DCM")]
    volumetric = [g for g in groups if dicom_tools.children(g, "121191", "DCM")]  # those with a Referenced Segment
    by_label = {dicom_tools.children(g, "112039", "DCM")[0].TextValue: g for g in volumetric}
    assert len(volumetric) == len(built.ct.organs)
    assert set(by_label) == {o.label_name for o in built.ct.organs}
    source_uids = set(built.ct.source.sop_instance_uids)
    for organ in built.ct.organs:
        group = by_label[organ.label_name]
        numbers = {}
        for item in dicom_tools.children(group, "112031", "DCM") + dicom_tools.children(group, "118565006", "SCT"):
            value = float(item.MeasuredValueSequence[0].NumericValue)
            unit = item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue
            derivation = dicom_tools.children(item, "121401", "DCM")
            key = derivation[0].ConceptCodeSequence[0].CodeMeaning if derivation else "Volume"
            numbers[key] = (value, unit)
        assert numbers["Volume"][0] == pytest.approx(organ.volume_ml, rel=1e-9)
        assert numbers["Volume"][1] == "cm3"
        assert numbers["Mean"] == (pytest.approx(organ.mean_hu, rel=1e-9), "[hnsf'U]")
        assert numbers["Standard Deviation"] == (pytest.approx(organ.std_hu, rel=1e-9), "[hnsf'U]")
        segment_ref = dicom_tools.children(group, "121191", "DCM")[0].ReferencedSOPSequence[0]
        assert segment_ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        segment_number = built.objects.measured.segmentation.segment_numbers[organ.label_name]
        assert segment_ref.ReferencedSegmentNumber == segment_number
        assert seg.SegmentSequence[segment_number - 1].SegmentLabel == organ.label_name
        # Tracking UID of the group == Tracking UID of the segment: viewers can join the two objects
        tracking = dicom_tools.children(group, "112040", "DCM")[0].UID
        assert seg.SegmentSequence[segment_number - 1].TrackingUID == tracking
        # Source Series for Segmentation (121232): the CT series (the SEG lists every source image itself)
        series = dicom_tools.children(group, "121232", "DCM")
        assert [item.UID for item in series] == [built.ct.source.series_instance_uid]
        assert {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} <= source_uids


def test_each_organ_has_a_cross_section_group_with_its_outline_and_area(built: Built) -> None:
    """The TID 1410 group per organ (what OHIF needs to show the organ's values): same tracking UID as the
    volumetric group, a closed POLYLINE on the slice where the organ is largest, and the area inside it."""
    sr = read(built, "measurements")
    groups = [i for i in dicom_tools.content_items(sr) if dicom_tools.concept(i) == ("125007", "DCM")]
    planar = [g for g in groups if dicom_tools.children(g, "111030", "DCM")]  # Image Region
    assert len(planar) == len(groups) - len(built.ct.organs) == len(built.ct.organs)
    ct = built.ct
    for organ in ct.organs:
        uid = dicom_tools.children(
            next(g for g in groups if dicom_tools.children(g, "121191", "DCM")
                 and dicom_tools.children(g, "112039", "DCM")[0].TextValue == organ.label_name), "112040", "DCM")[0].UID
        group = next(g for g in planar if dicom_tools.children(g, "112040", "DCM")[0].UID == uid)
        assert dicom_tools.children(group, "112039", "DCM")[0].TextValue == organ.label_name
        region = dicom_tools.children(group, "111030", "DCM")[0]
        assert region.ValueType == "SCOORD" and region.GraphicType == "POLYLINE"
        points = np.asarray(region.GraphicData, dtype=float).reshape(-1, 2)
        assert np.array_equal(points[0], points[-1]) and len(points) >= 5
        areas = (ct.label_map == organ.label_value).sum(axis=(1, 2))
        largest = int(np.argmax(areas))
        image = region.ContentSequence[0]
        assert image.RelationshipType == "SELECTED FROM"
        assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ct.source.sop_instance_uids[largest]
        # Every vertex lies on a pixel corner of the organ's mask on that slice, inside the image.
        mask = ct.label_map[largest] == organ.label_value
        assert points.min() >= 0 and points[:, 0].max() <= mask.shape[1] and points[:, 1].max() <= mask.shape[0]
        area = dicom_tools.children(group, "42798000", "SCT")[0].MeasuredValueSequence[0]
        assert area.MeasurementUnitsCodeSequence[0].CodeValue == "cm2"
        spacing = np.prod([float(v) for v in ct.source.datasets[largest].PixelSpacing])
        assert float(area.NumericValue) == pytest.approx(areas[largest] * spacing / 100.0, abs=1e-3)


def test_outer_boundary_follows_pixel_edges_of_the_largest_component() -> None:
    from reports.measurement_sr import outer_boundary, polygon_area

    mask = np.zeros((12, 12), dtype=bool)
    mask[2:8, 2:9] = True
    mask[4:6, 4:6] = False  # a hole: filled, the outline is the outer one
    mask[8, 3] = True  # a one-pixel bump below
    mask[10:12, 10:12] = True  # a smaller separate component: ignored
    outline = outer_boundary(mask)
    assert np.array_equal(outline[0], outline[-1])
    assert polygon_area(outline) == 6 * 7 + 1
    assert outline[:, 0].min() == 2 and outline[:, 0].max() == 9 and outline[:, 1].max() == 9
    assert len(outline) == 9  # corners only: rectangle (4) + bump (4) + the repeated first vertex
    with pytest.raises(ReportInputError):
        outer_boundary(np.zeros((4, 4), dtype=bool))


def test_segmentation_masks_round_trip(built: Built) -> None:
    seg = hd.seg.segread(built.files["seg"])
    source = built.ct.source
    assert seg.SegmentationType == "BINARY"
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(source.sop_instance_uids),
        segment_numbers=[1, 2, 3],
        combine_segments=True,
        skip_overlap_checks=True,
    )
    expected = np.zeros(source.shape, dtype=np.uint8)
    for organ in built.ct.organs:
        expected[built.ct.label_map == organ.label_value] = built.objects.measured.segmentation.segment_numbers[organ.label_name]
    np.testing.assert_array_equal(pixels, expected)
    item = seg.SegmentSequence[1]  # kidney_left: laterality as Segmented Property Type Modifier
    assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == "64033007"
    assert item.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "7771000"
    algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("TotalSegmentator", "2.18.0")
    assert "task=total" in algorithm.AlgorithmParameters


@dataclass
class ReadAnswer:
    """One answer as read back from the findings SR's Findings section."""

    question: str
    answer: str
    images: list[str]  # SOP Instance UIDs INFERRED FROM by the answer text
    priority: str | None = None
    finding: tuple[str, str] | None = None  # (code value, scheme) of the coded finding
    presence: str | None = None  # its presence (the CODE's value), or the bare Presence of property (121052, DCM)
    site: str | None = None  # code value of Finding Site (363698007, SCT)
    laterality: str | None = None
    finding_images: list[str] = field(default_factory=list)


def code_of(item: pydicom.Dataset) -> tuple[str, str]:
    return str(item.ConceptCodeSequence[0].CodeValue), str(item.ConceptCodeSequence[0].CodingSchemeDesignator)


def modifiers(item: pydicom.Dataset) -> tuple[str | None, str | None, str | None, str | None]:
    """(priority, presence, site, laterality) code values among an item's HAS CONCEPT MOD children."""
    found: dict[tuple[str, str], pydicom.Dataset] = {}
    for child in item.get("ContentSequence", []):
        if child.RelationshipType == "HAS CONCEPT MOD":
            assert dicom_tools.concept(child) not in found, "a modifier repeated"
            found[dicom_tools.concept(child)] = child
    site = found.get(("363698007", "SCT"))
    laterality = dicom_tools.children(site, "272741003", "SCT") if site is not None else []
    return (
        code_of(found[("260870009", "SCT")])[0] if ("260870009", "SCT") in found else None,
        code_of(found[("121052", "DCM")])[0] if ("121052", "DCM") in found else None,
        code_of(site)[0] if site is not None else None,
        code_of(laterality[0])[0] if laterality else None,
    )


def inferred_images(item: pydicom.Dataset) -> list[str]:
    images = [c for c in item.get("ContentSequence", []) if c.ValueType == "IMAGE"]
    for image in images:  # TID 2002 row 2/4 -> TID 2001 row 1: INFERRED FROM IMAGE, a CID 7003 purpose
        assert image.RelationshipType == "INFERRED FROM" and dicom_tools.concept(image) == ("121080", "DCM")
    return [str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in images]


def read_answers(sr: pydicom.Dataset) -> list[ReadAnswer]:
    """Parse the Findings section back into answers: a Question TEXT opens an answer, the Finding TEXT is its
    answer, a CODE its coded finding (<finding> = presence, or Finding (121071, DCM) = <finding>); nothing else."""
    (section,) = [i for i in sr.ContentSequence if dicom_tools.concept(i) == ("59776-5", "LN")]
    assert section.ValueType == "CONTAINER" and section.ContinuityOfContent == "SEPARATE"
    answers: list[ReadAnswer] = []
    for item in section.ContentSequence:
        assert item.RelationshipType == "CONTAINS"
        if item.ValueType == "TEXT" and dicom_tools.concept(item) == ("VQA-QUESTION", "99OMNICT"):
            answers.append(ReadAnswer(question=item.TextValue, answer="", images=[]))
        elif item.ValueType == "TEXT" and dicom_tools.concept(item) == ("121071", "DCM"):
            current = answers[-1]
            assert current.answer == "", "two answer texts for one question"
            current.answer, current.images = item.TextValue, inferred_images(item)
            current.priority, current.presence, current.site, current.laterality = modifiers(item)
        elif item.ValueType == "CODE":
            current = answers[-1]
            assert current.answer and current.finding is None and current.presence is None, "coded finding misplaced"
            if dicom_tools.concept(item) == ("121071", "DCM"):  # the coded answer is itself the finding
                current.finding = code_of(item)
            else:  # <finding asked about> = its presence
                current.finding, current.presence = dicom_tools.concept(item), code_of(item)[0]
                presence_values = {c.value for c in codes.cid240.concepts.values()}
                assert code_of(item)[1] == "SCT" and current.presence in presence_values
            priority, presence, current.site, current.laterality = modifiers(item)
            assert priority is None and presence is None
            current.finding_images = inferred_images(item)
        else:
            raise AssertionError(f"unexpected item in Findings: {item.ValueType} {dicom_tools.concept(item)}")
    return answers


def test_findings_sr_is_a_tid_2000_diagnostic_imaging_report(built: Built) -> None:
    sr = read(built, "findings")
    assert sr.SOPClassUID == pydicom.uid.ComprehensiveSRStorage
    assert (sr.ValueType, dicom_tools.concept(sr)) == ("CONTAINER", ("18748-4", "LN"))
    assert sr.ContinuityOfContent == "SEPARATE"
    template = sr.ContentTemplateSequence[0]
    assert (template.MappingResource, template.TemplateIdentifier) == ("DCMR", "2000")
    # TID 2000 rows in order: Procedure reported, Language (TID 1204), Observation Context (TID 1001), ..., headings
    top = [(i.RelationshipType, dicom_tools.concept(i)) for i in sr.ContentSequence]
    assert top[:3] == [("HAS CONCEPT MOD", ("121058", "DCM")), ("HAS CONCEPT MOD", ("121049", "DCM")),
                       ("HAS OBS CONTEXT", ("121005", "DCM"))]
    assert code_of(sr.ContentSequence[2]) == ("121007", "DCM")  # Observer Type = Device
    assert top[-1] == ("CONTAINS", ("59776-5", "LN")) and [t for t in top if t[0] == "CONTAINS"] == top[-1:]
    assert not [i for i in dicom_tools.content_items(sr) if dicom_tools.concept(i) == ("126000", "DCM")]
    assert not [i for i in dicom_tools.content_items(sr) if dicom_tools.concept(i) == ("125007", "DCM")]
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99OMNICT"


def test_findings_sr_answers_round_trip(built: Built) -> None:
    source = built.ct.source
    read_back = read_answers(read(built, "findings"))
    assert len(read_back) == len(built.answers)
    for got, answer in zip(read_back, built.answers, strict=True):
        assert (got.question, got.answer) == (answer.question, answer.answer)  # verbatim, any script
        assert got.priority == answer.urgency_level.value.value
        wanted = {source.dataset_for(ref).SOPInstanceUID for ref in answer.key_images}
        assert got.images == [uid for uid in source.sop_instance_uids if uid in wanted]  # series order, once each
        site = answer.site
        assert got.site == (site.property_type.value if site else None)
        assert got.laterality == (site.laterality.value if site and site.laterality else None)
        if answer.finding is not None:
            assert got.finding == (answer.finding.value, answer.finding.scheme_designator)
            assert got.presence == answer.coded_answer.value  # all coded here
            assert got.finding_images == got.images
        else:
            assert got.finding is None and got.presence is None
    # the first answer: urgent, right lung, present
    assert read_back[0].laterality == coding.RIGHT.value and read_back[0].presence == coding.PRESENT.value
    assert read_back[2].presence == coding.ABSENT.value and read_back[2].images == []


def test_coded_findings_always_state_their_presence(built: Built) -> None:
    """A finding asked about without a coded answer is written as <finding> = Undetermined (never as if present); a
    coded answer that is itself a finding becomes Finding = <it>; a bare Present modifies the answer text; a finding
    answered with anything but a CID 240 presence is refused."""
    from reports.vqa_sr import UNDETERMINED, build_findings_report

    ct, run = built.ct, built.run
    spleen = coding.FINDINGS["splenomegaly"]
    answers = [
        VqaAnswer("Is there splenomegaly?", "No, the spleen is of normal size.", finding=spleen, finding_site="spleen"),
        VqaAnswer("What is the main finding?", "A liver lesion.", coded_answer=coding.FINDINGS["liver_lesion"]),
        VqaAnswer("Anything in the abdomen?", "Yes.", coded_answer=coding.PRESENT, finding_site="abdomen"),
    ]
    sr = build_findings_report(ct.source, answers, ALGORITHM, run)
    got = read_answers(sr)  # the dataset as built, no file needed
    spleen_site, abdomen_site = (coding.organ_coding(n).property_type.value for n in ("spleen", "abdomen"))
    assert (got[0].finding, got[0].presence, got[0].site) == (("16294009", "SCT"), UNDETERMINED.value, spleen_site)
    assert (got[1].finding, got[1].presence) == (("300331000", "SCT"), None)
    assert (got[2].finding, got[2].presence, got[2].site) == (None, coding.PRESENT.value, abdomen_site)
    with pytest.raises(ReportInputError, match="CID 240"):
        build_findings_report(ct.source, [VqaAnswer("q", "a", coded_answer=spleen, finding=spleen)], ALGORITHM, run)
    with pytest.raises(ReportInputError, match="no answers"):
        build_findings_report(ct.source, [], ALGORITHM, run)


def test_key_image_references_point_at_real_source_images(built: Built) -> None:
    source = built.ct.source
    findings = read(built, "findings")
    source_by_uid = {ds.SOPInstanceUID: ds for ds in source.datasets}
    for got, answer in zip(read_answers(findings), built.answers, strict=True):
        assert set(got.images) == {source.dataset_for(ref).SOPInstanceUID for ref in answer.key_images}
    images = [i for i in dicom_tools.content_items(findings) if i.ValueType == "IMAGE"]
    for image in images:  # each reference names a real slice with its real SOP class
        reference = image.ReferencedSOPSequence[0]
        assert reference.ReferencedSOPClassUID == source_by_uid[reference.ReferencedSOPInstanceUID].SOPClassUID
    evidence = findings.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    listed = {ref.ReferencedSOPInstanceUID for series in evidence for ref in series.ReferencedSOPSequence}
    assert {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images} <= listed
    kos = read(built, "kos")
    kos_images = [i for i in dicom_tools.content_items(kos) if i.ValueType == "IMAGE"]
    expected = {source.sop_instance_uids[i] for i in (3, 5, 6)}
    assert {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in kos_images} == expected
    kos_sr = [i for i in dicom_tools.content_items(kos) if i.ValueType == "COMPOSITE"]
    assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in kos_sr] == [findings.SOPInstanceUID]
    assert kos_sr[0].ReferencedSOPSequence[0].ReferencedSOPClassUID == findings.SOPClassUID
    evidence = kos.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    listed = {ref.ReferencedSOPInstanceUID for series in evidence for ref in series.ReferencedSOPSequence}
    assert expected <= listed and findings.SOPInstanceUID in listed


def test_all_objects_sit_in_the_source_study_in_new_series(built: Built) -> None:
    source = built.ct.source.first
    objects = [read(built, name) for name in built.files]
    for ds in objects:
        for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"):
            assert ds[keyword].value == source[keyword].value, (ds.Modality, keyword)
        assert str(ds.PatientName) == "Müller^Jörg" and ds.SpecificCharacterSet == "ISO_IR 192"
        assert ds.Manufacturer == "OmniCT node"
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert any("omnict-node" in v for v in ds.SoftwareVersions)
        assert (ds.ContentDate, ds.ContentTime) == ("20261122", "103000")
    assert len({ds.SeriesInstanceUID for ds in objects}) == len(objects)
    assert sorted(int(ds.SeriesNumber) for ds in objects) == [k.series_number for k in ObjectKind]
    for ds in objects[1:4]:  # the SRs: an algorithm's draft
        assert (ds.CompletionFlag, ds.VerificationFlag) == ("PARTIAL", "UNVERIFIED")


def test_srs_carry_algorithm_identification(built: Built) -> None:
    for name, algorithm in (("measurements", SEG_ALGORITHM), ("findings", ALGORITHM), ("narrative", ALGORITHM)):
        items = list(dicom_tools.content_items(read(built, name)))
        names = {i.TextValue for i in items if dicom_tools.concept(i) == ("111001", "DCM")}
        versions = {i.TextValue for i in items if dicom_tools.concept(i) == ("111003", "DCM")}
        parameters = {i.TextValue for i in items if dicom_tools.concept(i) == ("111002", "DCM")}
        assert names == {algorithm.name} and versions == {algorithm.version}, name
        assert parameters == set(algorithm.parameter_strings()), name
        observer = {i.TextValue for i in items if dicom_tools.concept(i) == ("121013", "DCM")}
        assert observer == {algorithm.name}, name


# --- Determinism -----------------------------------------------------------------------------------------------


def test_same_run_gives_identical_uids_and_another_run_new_ones(built: Built) -> None:
    ct, answers = built.ct, built.answers
    again = build_result_objects(
        ct.source, ct.label_map, ct.organs, answers, ALGORITHM, built.run, segmentation_algorithm=SEG_ALGORITHM
    )
    other = build_result_objects(
        ct.source,
        ct.label_map,
        ct.organs,
        answers,
        ALGORITHM,
        replace(built.run, run_id="run-0002"),
        segmentation_algorithm=SEG_ALGORITHM,
    )
    written = [built.files[name] for name in ("seg", "measurements", "findings", "narrative", "kos")]
    for first, second, third, path in zip(
        built.objects.datasets(), again.datasets(), other.datasets(), written, strict=True
    ):
        assert dicom_tools.all_uid_values(first) == dicom_tools.all_uid_values(second)
        encoded = io.BytesIO()
        second.save_as(encoded, enforce_file_format=True)
        assert encoded.getvalue() == path.read_bytes(), f"{first.Modality}: same run, different bytes"
        assert second.SOPInstanceUID == first.SOPInstanceUID and second.SeriesInstanceUID == first.SeriesInstanceUID
        assert third.SOPInstanceUID != first.SOPInstanceUID
        assert third.SeriesInstanceUID != first.SeriesInstanceUID
        assert third.StudyInstanceUID == first.StudyInstanceUID
    first_uids = {ds.SOPInstanceUID for ds in built.objects.datasets()}
    assert first_uids.isdisjoint({ds.SOPInstanceUID for ds in other.datasets()})


def test_derived_uids_are_valid_with_and_without_an_org_root(built: Built) -> None:
    plain = derive_uid(built.run, "seg", "instance")
    assert plain.startswith("2.25.") and len(plain) <= 64 and UID_PATTERN.match(plain)
    rooted_run = replace(built.run, uid_root="1.2.826.0.1.3680043.10.999")
    rooted = derive_uid(rooted_run, "seg", "instance")
    assert rooted.startswith("1.2.826.0.1.3680043.10.999.") and len(rooted) <= 64 and UID_PATTERN.match(rooted)
    assert rooted != derive_uid(rooted_run, "seg", "series")
    with pytest.raises(ValueError, match="too long"):
        derive_uid(replace(built.run, uid_root="1." * 30), "seg")


# --- Narrative ---------------------------------------------------------------------------------------------------


def test_narrative_renders_measurements_and_flags_positive_answers(built: Built) -> None:
    text = render_narrative(built.ct.organs, built.answers, ALGORITHM)
    sections = split_sections(text)
    liver = next(o for o in built.ct.organs if o.label_name == "liver")
    assert f"Liver: volume {liver.volume_ml:.1f} ml" in sections.findings[0]
    assert any(s.startswith("URGENT: Yes, a small right-sided") for s in sections.impressions)
    assert not any("No ascites" in s for s in sections.impressions)  # coded Absent stays out of the impression
    assert "not reviewed by a radiologist" in sections.impressions[-1]
    assert built.objects.reading.narrative_text == text


def test_narrative_without_sections_is_refused() -> None:
    with pytest.raises(ReportInputError, match="before the first heading"):
        split_sections("Liver normal.\nFINDINGS\n- x\nIMPRESSION\n- y\n")
    with pytest.raises(ReportInputError, match="at least one"):
        split_sections("FINDINGS\n- x\nIMPRESSION\n")


# --- Bad input ----------------------------------------------------------------------------------------------------


def test_bad_inputs_get_clear_errors(built: Built) -> None:
    ct, run = built.ct, built.run
    with pytest.raises(ReportInputError, match="label map shape"):
        build_segmentation(ct.source, ct.label_map[:-1], ct.organs, ALGORITHM, run)
    with pytest.raises(ReportInputError, match="without voxels"):
        missing = OrganMeasurement("pancreas", 9, 1.0, 40.0, 5.0)
        build_segmentation(ct.source, ct.label_map, [*ct.organs, missing], ALGORITHM, run)
    with pytest.raises(KeyError, match="no SNOMED CT coding"):
        unknown = OrganMeasurement("left_thing", 5, 1.0, 40.0, 5.0)
        build_segmentation(ct.source, ct.label_map, [unknown], ALGORITHM, run)
    with pytest.raises(ReportInputError, match="study"):
        build_segmentation(ct.source, ct.label_map, ct.organs, ALGORITHM, replace(run, study_instance_uid="1.2.3"))
    with pytest.raises(ReportInputError, match="slice index 99"):
        build_key_object_selection(ct.source, [99], ALGORITHM, run)
    with pytest.raises(ReportInputError, match="not in the source series"):
        build_key_object_selection(ct.source, ["1.2.3.4"], ALGORITHM, run)
    with pytest.raises(ValueError, match="unknown urgency"):
        _ = VqaAnswer("q", "a", urgency="whenever").urgency_level


def test_source_series_repairs_blank_ct_sop_class_and_refuses_blank_study(tmp_path: Path) -> None:
    datasets = [pydicom.dcmread(p) for p in build_synthetic_ct(tmp_path / "ct").files]
    for ds in datasets:
        ds.SOPClassUID = ""
    source = SourceSeries.from_datasets(datasets)
    assert source.sop_class_uid == pydicom.uid.CTImageStorage
    # sorted along the slice normal whatever the input order
    positions = [float(ds.ImagePositionPatient[2]) for ds in source.datasets]
    assert positions == sorted(positions)
    datasets[0].StudyInstanceUID = ""
    with pytest.raises(ReportInputError, match="StudyInstanceUID"):
        SourceSeries.from_datasets(datasets)


# --- Codes ----------------------------------------------------------------------------------------------------


def test_codes_fit_their_value_representations() -> None:
    every = [*coding.FINDINGS.values(), *(u.value for u in coding.Urgency), coding.QUESTION, coding.PRIORITY]
    for organ in coding.organ_table().values():
        every += [organ.category, organ.property_type, *([organ.laterality] if organ.laterality else [])]
    for code in every:
        assert 0 < len(code.value) <= 16 and 0 < len(code.meaning) <= 64, code  # SH / LO
    categories = {o.category.value for o in coding.organ_table().values()}
    cid7150 = {c.value for c in codes.cid7150.concepts.values()}
    assert categories <= cid7150 | {"260787004"}  # + "Physical object" (hip implant), not in CID 7150
    assert coding.organ_coding("kidney_left").label == "Kidney, Left"
    assert coding.finding_code("Pleural effusion") == coding.FINDINGS["pleural_effusion"]
