"""DICOMweb subset over the generated objects: QIDO-RS searches and WADO-RS multipart retrieves."""

from __future__ import annotations

import io
import re
from email.parser import BytesParser
from email.policy import HTTP

import pydicom
import pytest

from tests.api.conftest import READ_TOKEN, bearer
from tests.api.seed import NODULE, PNEUMOTHORAX, seed_processed_study

READ = bearer(READ_TOKEN)
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"


@pytest.fixture
def two_studies(settings, session_factory):
    with session_factory() as session:
        first = seed_processed_study(session, settings, [PNEUMOTHORAX, NODULE])
        second = seed_processed_study(session, settings, [NODULE])
        session.commit()
    return first, second


def parse_multipart(response) -> list[pydicom.Dataset]:
    """Split a multipart/related response with the standard library's MIME parser and read each part as DICOM."""
    content_type = response.headers["content-type"]
    assert content_type.startswith("multipart/related") and 'type="application/dicom"' in content_type
    boundary = re.search(r"boundary=([^;]+)", content_type).group(1)
    assert response.content.rstrip().endswith(f"--{boundary}--".encode())
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + response.content)
    parts = list(message.iter_parts())
    assert all(p.get_content_type() == "application/dicom" for p in parts)
    return [pydicom.dcmread(io.BytesIO(p.get_payload(decode=True))) for p in parts]


def _value(item: dict, tag: str):
    return item[tag].get("Value", [None])[0]


def test_qido_searches_studies_series_and_instances(client, two_studies):
    first, second = two_studies
    studies = client.get("/dicomweb/studies", headers=READ)
    assert studies.status_code == 200 and studies.headers["content-type"] == "application/dicom+json"
    by_uid = {_value(s, "0020000D"): s for s in studies.json()}
    assert set(by_uid) == {first.study_uid, second.study_uid}
    assert by_uid[first.study_uid]["00080061"]["Value"] == ["KO", "SR"]
    assert _value(by_uid[first.study_uid], "00201208") == 2 and _value(by_uid[first.study_uid], "00080020") == "20261122"

    # Matching by keyword and by tag, UID lists, modality, date ranges, paging.
    only = client.get("/dicomweb/studies", params={"StudyInstanceUID": first.study_uid}, headers=READ).json()
    assert [_value(s, "0020000D") for s in only] == [first.study_uid]
    by_tag = client.get("/dicomweb/studies", params={"0020000D": f"{first.study_uid},{second.study_uid}"}, headers=READ)
    assert len(by_tag.json()) == 2
    assert len(client.get("/dicomweb/studies", params={"StudyDate": "20261101-20261130"}, headers=READ).json()) == 2
    assert client.get("/dicomweb/studies", params={"StudyDate": "-20250101"}, headers=READ).json() == []
    assert len(client.get("/dicomweb/studies", params={"limit": 1}, headers=READ).json()) == 1

    series = client.get(f"/dicomweb/studies/{first.study_uid}/series", headers=READ).json()
    assert {_value(s, "0020000E"): _value(s, "00080060") for s in series} == {
        first.result_series_uids["findings_sr"]: "SR", first.result_series_uids["kos"]: "KO"}
    ko_only = client.get(f"/dicomweb/studies/{first.study_uid}/series", params={"Modality": "KO"}, headers=READ).json()
    assert [_value(s, "0020000E") for s in ko_only] == [first.result_series_uids["kos"]]

    sr_series = first.result_series_uids["findings_sr"]
    instances = client.get(f"/dicomweb/studies/{first.study_uid}/series/{sr_series}/instances", headers=READ).json()
    assert [(_value(i, "00080018"), _value(i, "00080016")) for i in instances] == [
        (first.result_sop_uids["findings_sr"], SR_CLASS)]
    assert _value(instances[0], "00081190").endswith(f"/instances/{first.result_sop_uids['findings_sr']}")


def test_qido_refuses_what_it_cannot_match(client, two_studies):
    assert client.get("/dicomweb/studies", params={"PatientID": "X"}, headers=READ).status_code == 400
    assert client.get("/dicomweb/studies", params={"StudyDate": "last week"}, headers=READ).status_code == 400
    assert client.get("/dicomweb/studies", params={"StudyInstanceUID": "abc"}, headers=READ).status_code == 400
    assert client.get("/dicomweb/studies", params={"limit": "0"}, headers=READ).status_code == 400
    assert client.get("/dicomweb/studies", headers={**READ, "Accept": "application/xml"}).status_code == 406


def test_wado_retrieves_instances_series_and_studies_as_multipart(client, two_studies):
    first, second = two_studies
    sr_uid, sr_series = first.result_sop_uids["findings_sr"], first.result_series_uids["findings_sr"]
    instance = client.get(f"/dicomweb/studies/{first.study_uid}/series/{sr_series}/instances/{sr_uid}",
                          headers={**READ, "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert instance.status_code == 200
    [sr] = parse_multipart(instance)
    assert sr.SOPInstanceUID == sr_uid and sr.SOPClassUID == SR_CLASS
    # The SR is the one the pipeline wrote: its evidence is the study's CT.
    evidence = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert evidence == set(first.ct_sop_uids)

    series = parse_multipart(client.get(f"/dicomweb/studies/{first.study_uid}/series/{first.result_series_uids['kos']}",
                                        headers=READ))
    assert [d.SOPClassUID for d in series] == [KOS_CLASS]
    study = parse_multipart(client.get(f"/dicomweb/studies/{first.study_uid}", headers=READ))
    assert {d.SOPInstanceUID for d in study} == set(first.result_sop_uids.values())

    metadata = client.get(f"/dicomweb/studies/{first.study_uid}/series/{sr_series}/metadata", headers=READ)
    assert metadata.headers["content-type"] == "application/dicom+json"
    assert _value(metadata.json()[0], "00080018") == sr_uid

    assert client.get(f"/dicomweb/studies/{second.study_uid}/series/{sr_series}", headers=READ).status_code == 404
    assert client.get(f"/dicomweb/studies/{first.study_uid}",
                      headers={**READ, "Accept": "application/dicom+json"}).status_code == 406
    assert client.get(f"/dicomweb/studies/{first.study_uid}", headers={
        **READ, "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'}
    ).status_code == 406
