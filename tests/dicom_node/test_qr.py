"""The Q/R SCP (dicom_node.qr) answering the real dcmtk tools (findscu, getscu, movescu) on SQLite and PostgreSQL.

The node's content is built the way the node builds it: CT files registered through db.ingest.register_instances
under the storage root, and SEG/SR/KOS result objects (reports.build_result_objects) as ResultObject rows under the
data folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom import sop_class as sop

from db.ingest import InstanceRecord, register_instances
from db.models import PipelineRun, ResultObject, Study
from dicom_node.qr import QueryKey, add_query_retrieve, matches
from reports import RunIdentity, build_result_objects
from tests.dicom_factory import TEST_PATIENT_ID, TEST_PATIENT_NAME, ct_slice
from tests.reports.synthetic_ct import build_synthetic_ct
from tests.reports.test_reports import ALGORITHM, SEG_ALGORITHM, make_answers
from tests.services import free_port, wait_for_port

SYNTHETIC_PATIENT_ID = "SYN-0001"  # tests/reports/synthetic_ct.py
SYNTHETIC_PATIENT_NAME = "Müller^Jörg"
# For tests whose subject does not touch the database beyond setting it up: SQLite only (keeps the suite lean).
sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@dataclass
class NodeContent:
    study_uid: str  # synthetic CT (8 slices) + 5 generated objects
    ct_series_uid: str
    ct_sop_uids: list[str]
    result_sop_uids: dict[str, str]  # SOP Instance UID -> SOP Class UID
    other_study_uid: str  # 3 CT slices, another patient, StudyDate 20250505
    run_id: int

    @property
    def all_sop_uids(self) -> set[str]:
        return set(self.ct_sop_uids) | set(self.result_sop_uids)


def _register(session_factory, settings, files: list[Path]) -> list[str]:
    """Copy CT files into the storage layout the SCP uses and register them as the SCP would."""
    root = Path(settings.storage.root)
    records = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        relative = Path(ds.StudyInstanceUID) / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, root / relative)
        records.append(InstanceRecord(
            study_instance_uid=ds.StudyInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
            sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
            transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, path=str(relative),
            size_bytes=(root / relative).stat().st_size, modality=ds.Modality, series_number=int(ds.SeriesNumber),
            instance_number=int(ds.InstanceNumber), study_date=ds.StudyDate, calling_ae_title="TESTSCU"))
    with session_factory.begin() as session:
        register_instances(session, records)
    return [r.sop_instance_uid for r in records]


@dataclass
class _Prebuilt:
    ct_files: list[Path]
    study_uid: str
    series_uid: str
    result_files: list[Path]


_PREBUILT: dict[str, _Prebuilt] = {}


def _prebuilt(work: Path) -> _Prebuilt:
    """The synthetic CT and its SEG/SR/KOS, built once per test session (every test gets a fresh database and
    fresh copies of the files, so sharing the UIDs between tests is harmless)."""
    if "content" not in _PREBUILT:
        ct = build_synthetic_ct(work / "ct")
        objects = build_result_objects(ct.source, ct.label_map, ct.organs, make_answers(ct.source), ALGORITHM,
                                       RunIdentity(ct.source.study_instance_uid, "1"),
                                       segmentation_algorithm=SEG_ALGORITHM)
        _PREBUILT["content"] = _Prebuilt(ct.files, ct.source.study_instance_uid, ct.source.series_instance_uid,
                                         objects.write(work / "results"))
    return _PREBUILT["content"]


def build_node_content(settings, session_factory, work: Path) -> NodeContent:
    """A study with CT + generated SEG/SR/KOS, and a second CT-only study."""
    prebuilt = _prebuilt(work.parent.parent / "qr-prebuilt")  # next to the tests' tmp_paths (pytest's basetemp)
    work.mkdir(parents=True, exist_ok=True)
    ct_uids = _register(session_factory, settings, prebuilt.ct_files)
    other_study = generate_uid()
    other_series = generate_uid()
    other_files = []
    for index in range(3):
        ds = ct_slice(other_study, other_series, index, size=16)
        ds.StudyDate, ds.AccessionNumber = "20250505", "ACC-OTHER"
        other_files.append(work / f"other_{index}.dcm")
        ds.save_as(other_files[-1], enforce_file_format=True)
    _register(session_factory, settings, other_files)

    with session_factory.begin() as session:
        study = session.query(Study).filter_by(study_instance_uid=prebuilt.study_uid).one()
        run = session.query(PipelineRun).filter_by(study_id=study.id).one()
        run_id = run.id
    relative_dir = Path("results") / str(run_id)
    (Path(settings.data_dir) / relative_dir).mkdir(parents=True)
    paths = [Path(shutil.copy(path, Path(settings.data_dir) / relative_dir)) for path in prebuilt.result_files]
    results: dict[str, str] = {}
    kinds = {"SEG": "seg", "KO": "kos"}
    with session_factory.begin() as session:
        for path in paths:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            session.add(ResultObject(
                run_id=run_id, kind=kinds.get(ds.Modality, "findings_sr"), sop_class_uid=ds.SOPClassUID,
                sop_instance_uid=ds.SOPInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
                study_instance_uid=ds.StudyInstanceUID, path=str(relative_dir / path.name),
                size_bytes=path.stat().st_size))
            results[ds.SOPInstanceUID] = ds.SOPClassUID
    return NodeContent(prebuilt.study_uid, prebuilt.series_uid, ct_uids, results, other_study, run_id)


@pytest.fixture
def content(settings, session_factory, tmp_path) -> NodeContent:
    return build_node_content(settings, session_factory, tmp_path / "work")


@dataclass
class QrServer:
    port: int
    move_port: int  # where the test's movescu listens as storage SCP ("MOVEDEST")


@pytest.fixture
def qr_server(settings, session_factory, content) -> Iterator[QrServer]:
    move_port = free_port()
    ae = AE(ae_title=settings.dicom.ae_title)
    handlers = add_query_retrieve(ae, settings, session_factory, move_destinations={"MOVEDEST": ("127.0.0.1", move_port)})
    server = ae.start_server(("127.0.0.1", settings.dicom.port), block=False, evt_handlers=handlers)
    try:
        yield QrServer(settings.dicom.port, move_port)
    finally:
        server.shutdown()


def dcmtk(tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, TCP_NODELAY="1")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=timeout, env=env)


def findscu(port: int, out: Path, *keys: str, model: str = "-S") -> list[Dataset]:
    """Run findscu with ``-k`` keys, extracting the responses to files; returns them in order."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rsp*.dcm"):
        old.unlink()
    args = [model, "-aet", "FINDSCU", "-aec", "OMNICT", "-X", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    result = dcmtk("findscu", *args, "127.0.0.1", str(port))
    assert result.returncode == 0, result.stdout + result.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


# -- C-FIND ---------------------------------------------------------------------------------------------------------


def test_findscu_study_level_fills_keys_from_db_and_headers(qr_server, content, tmp_path):
    responses = findscu(qr_server.port, tmp_path / "f1", "QueryRetrieveLevel=STUDY",
                        f"StudyInstanceUID={content.study_uid}", "PatientName", "PatientID", "StudyDate",
                        "StudyTime", "AccessionNumber", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
                        "NumberOfStudyRelatedInstances")
    assert len(responses) == 1
    rsp = responses[0]
    assert rsp.StudyInstanceUID == content.study_uid
    assert str(rsp.PatientName) == SYNTHETIC_PATIENT_NAME  # from the header, sent as UTF-8
    assert rsp.PatientID == SYNTHETIC_PATIENT_ID
    assert (rsp.StudyDate, rsp.StudyTime, rsp.AccessionNumber) == ("20260101", "101500", "ACC42")
    assert set(rsp.ModalitiesInStudy) == {"CT", "SEG", "SR", "KO"}
    assert int(rsp.NumberOfStudyRelatedSeries) == 1 + len(content.result_sop_uids)  # each object its own series
    assert int(rsp.NumberOfStudyRelatedInstances) == len(content.all_sop_uids)


def test_findscu_study_matching_lists_wildcards_and_date_ranges(qr_server, content, tmp_path):
    def uids(*keys: str) -> set[str]:
        return {r.StudyInstanceUID for r in findscu(qr_server.port, tmp_path / "f", "QueryRetrieveLevel=STUDY",
                                                      "StudyInstanceUID", *keys)}

    both = {content.study_uid, content.other_study_uid}
    assert uids() == both
    assert uids(f"StudyInstanceUID={content.study_uid}\\{content.other_study_uid}") == both
    assert uids("StudyDate=20260101-") == {content.study_uid}
    assert uids("StudyDate=-20251231") == {content.other_study_uid}
    assert uids("StudyDate=20250101-20261231") == both
    assert uids("PatientID=SYN-*") == {content.study_uid}
    assert uids("PatientName=testpatient*") == {content.other_study_uid}  # PN: case-insensitive
    assert uids("AccessionNumber=ACC-OTHE?") == {content.other_study_uid}
    assert uids("ModalitiesInStudy=SEG") == {content.study_uid}
    assert uids("PatientID=nobody") == set()


def test_findscu_series_and_image_levels(qr_server, content, tmp_path):
    series = findscu(qr_server.port, tmp_path / "s", "QueryRetrieveLevel=SERIES",
                     f"StudyInstanceUID={content.study_uid}", "SeriesInstanceUID", "Modality", "SeriesNumber",
                     "SeriesDescription", "NumberOfSeriesRelatedInstances")
    by_uid = {r.SeriesInstanceUID: r for r in series}
    assert len(by_uid) == 1 + len(content.result_sop_uids)
    ct = by_uid[content.ct_series_uid]
    assert (ct.Modality, int(ct.SeriesNumber), ct.SeriesDescription) == ("CT", 3, "Abdomen 2.5mm")
    assert int(ct.NumberOfSeriesRelatedInstances) == 8
    assert sorted(r.Modality for r in series) == ["CT", "KO", "SEG", "SR", "SR", "SR"]
    generated = [r for r in series if r.Modality != "CT"]
    assert all(r.SeriesDescription for r in generated)  # read from the generated objects' own headers

    sr_only = findscu(qr_server.port, tmp_path / "s2", "QueryRetrieveLevel=SERIES",
                      f"StudyInstanceUID={content.study_uid}", "SeriesInstanceUID", "Modality=SR")
    assert len(sr_only) == 3

    images = findscu(qr_server.port, tmp_path / "i", "QueryRetrieveLevel=IMAGE",
                     f"StudyInstanceUID={content.study_uid}", f"SeriesInstanceUID={content.ct_series_uid}",
                     "SOPInstanceUID", "SOPClassUID", "InstanceNumber")
    assert {r.SOPInstanceUID for r in images} == set(content.ct_sop_uids)
    assert sorted(int(r.InstanceNumber) for r in images) == list(range(1, 9))

    c3d = str(sop.Comprehensive3DSRStorage)
    one = findscu(qr_server.port, tmp_path / "i2", "QueryRetrieveLevel=IMAGE",
                  f"StudyInstanceUID={content.study_uid}", "SOPInstanceUID", f"SOPClassUID={c3d}")
    assert [r.SOPInstanceUID for r in one] == [u for u, c in content.result_sop_uids.items() if c == c3d]


@sqlite_only
def test_patient_root_and_invalid_level(qr_server, content, tmp_path):
    patients = findscu(qr_server.port, tmp_path / "p", "QueryRetrieveLevel=PATIENT", "PatientID", "PatientName",
                       "NumberOfPatientRelatedStudies", model="-P")
    assert {r.PatientID for r in patients} == {SYNTHETIC_PATIENT_ID, TEST_PATIENT_ID}
    assert all(int(r.NumberOfPatientRelatedStudies) == 1 for r in patients)
    assert {str(r.PatientName) for r in patients} == {SYNTHETIC_PATIENT_NAME, TEST_PATIENT_NAME}

    # PATIENT is not a level of the Study Root model: 0xA900, no matches
    result = dcmtk("findscu", "-v", "-S", "-aec", "OMNICT", "-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID",
                   "127.0.0.1", str(qr_server.port))
    assert "DataSetDoesNotMatchSOPClass" in result.stdout + result.stderr  # dcmtk's name for 0xA900


# -- C-GET / C-MOVE -------------------------------------------------------------------------------------------------


def _received(folder: Path) -> dict[str, str]:
    out = {}
    for path in folder.iterdir():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out[ds.SOPInstanceUID] = ds.SOPClassUID
    return out


def test_getscu_retrieves_received_and_generated_objects(qr_server, content, tmp_path):
    out = tmp_path / "get"
    out.mkdir()
    result = dcmtk("getscu", "-S", "-aet", "GETSCU", "-aec", "OMNICT", "-od", str(out),
                   "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={content.study_uid}",
                   "127.0.0.1", str(qr_server.port))
    assert result.returncode == 0, result.stdout + result.stderr
    received = _received(out)
    assert set(received) == content.all_sop_uids
    assert str(sop.Comprehensive3DSRStorage) in received.values()
    assert str(sop.SegmentationStorage) in received.values()
    # the SR arrives byte-identical in content
    sr_uid = next(u for u, c in content.result_sop_uids.items() if c == str(sop.Comprehensive3DSRStorage))
    got = next(p for p in out.iterdir() if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID == sr_uid)
    original = next(Path(content_path) for content_path in
                    (Path(p) for p in (tmp_path / "data" / "results" / str(content.run_id)).iterdir())
                    if sr_uid in content_path.name)
    assert pydicom.dcmread(got).ContentSequence == pydicom.dcmread(original).ContentSequence

    series_out = tmp_path / "get_series"
    series_out.mkdir()
    result = dcmtk("getscu", "-S", "-aec", "OMNICT", "-od", str(series_out), "-k", "QueryRetrieveLevel=IMAGE",
                   "-k", f"StudyInstanceUID={content.study_uid}", "-k", f"SeriesInstanceUID={content.ct_series_uid}",
                   "-k", f"SOPInstanceUID={content.ct_sop_uids[0]}", "127.0.0.1", str(qr_server.port))
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(_received(series_out)) == {content.ct_sop_uids[0]}


def test_movescu_to_known_destination_and_unknown_destination_fails(qr_server, content, tmp_path):
    out = tmp_path / "move"
    out.mkdir()
    result = dcmtk("movescu", "-S", "-aet", "MOVEDEST", "-aem", "MOVEDEST", "-aec", "OMNICT",
                   "+P", str(qr_server.move_port), "-od", str(out),
                   "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={content.study_uid}",
                   "-k", f"SeriesInstanceUID={content.ct_series_uid}", "127.0.0.1", str(qr_server.port))
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(_received(out)) == set(content.ct_sop_uids)

    out_sr = tmp_path / "move_sr"
    out_sr.mkdir()
    generated = list(content.result_sop_uids)
    result = dcmtk("movescu", "-S", "-aet", "MOVEDEST", "-aem", "MOVEDEST", "-aec", "OMNICT",
                   "+P", str(qr_server.move_port), "-od", str(out_sr), "-k", "QueryRetrieveLevel=IMAGE",
                   "-k", f"StudyInstanceUID={content.study_uid}", "-k", "SOPInstanceUID=" + "\\".join(generated),
                   "127.0.0.1", str(qr_server.port))
    assert result.returncode == 0, result.stdout + result.stderr
    assert _received(out_sr) == content.result_sop_uids  # incl. Comprehensive 3D SR, SEG, KOS

    stray = tmp_path / "stray"
    stray.mkdir()
    result = dcmtk("movescu", "-v", "-S", "-aem", "NOBODY", "-aec", "OMNICT", "+P", str(free_port()), "-od", str(stray),
                   "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={content.study_uid}",
                   "127.0.0.1", str(qr_server.port))
    assert "MoveDestinationUnknown" in result.stdout + result.stderr  # dcmtk's name for 0xA801
    assert not list(stray.iterdir())


@sqlite_only
def test_compressed_instance_is_decompressed_for_peers_that_take_only_uncompressed(qr_server, content, settings,
                                                                                   session_factory, tmp_path):
    """A received instance stored RLE-compressed (as sent) reaches getscu/movescu, which propose only uncompressed
    syntaxes, decompressed with identical pixels."""
    from pydicom.uid import RLELossless

    from db.models import Instance

    with session_factory.begin() as session:
        row = session.query(Instance).filter_by(sop_instance_uid=content.ct_sop_uids[2]).one()
        path = Path(settings.storage.root) / row.path
        ds = pydicom.dcmread(path)
        original_pixels = ds.pixel_array.copy()
        ds.compress(RLELossless)
        ds.save_as(path, enforce_file_format=True)
        row.transfer_syntax_uid = RLELossless
    for tool, extra in (("getscu", []), ("movescu", ["-aet", "MOVEDEST", "-aem", "MOVEDEST", "+P",
                                                     str(qr_server.move_port)])):
        out = tmp_path / tool
        out.mkdir()
        result = dcmtk(tool, "-S", "-aec", "OMNICT", *extra, "-od", str(out), "-k", "QueryRetrieveLevel=IMAGE",
                       "-k", f"StudyInstanceUID={content.study_uid}", "-k", f"SOPInstanceUID={content.ct_sop_uids[2]}",
                       "127.0.0.1", str(qr_server.port))
        assert result.returncode == 0, result.stdout + result.stderr
        [got] = [pydicom.dcmread(p) for p in out.iterdir()]
        assert not got.file_meta.TransferSyntaxUID.is_compressed
        assert (got.pixel_array == original_pixels).all()


def test_retrieve_without_unique_key_and_missing_file_are_reported(qr_server, content, settings, tmp_path):
    ae = AE(ae_title="PYGET")
    ae.add_requested_context(sop.StudyRootQueryRetrieveInformationModelGet)
    for uid in (sop.CTImageStorage,):
        ae.add_requested_context(uid)
    from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = sop.CTImageStorage, False, True
    stored: list[str] = []

    def on_store(event):
        stored.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    from pynetdicom import evt
    assoc = ae.associate("127.0.0.1", qr_server.port, ae_title="OMNICT", ext_neg=[role],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        no_key = Dataset()
        no_key.QueryRetrieveLevel = "SERIES"
        no_key.StudyInstanceUID = content.study_uid
        statuses = [status.Status for status, _ in
                    assoc.send_c_get(no_key, sop.StudyRootQueryRetrieveInformationModelGet) if status]
        assert statuses[-1] == 0xA900

        victim = Path(settings.storage.root) / content.study_uid / content.ct_series_uid / f"{content.ct_sop_uids[0]}.dcm"
        victim.unlink()
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = content.study_uid
        query.SeriesInstanceUID = content.ct_series_uid
        responses = list(assoc.send_c_get(query, sop.StudyRootQueryRetrieveInformationModelGet))
        final_status, final_identifier = responses[-1]
        assert final_status.Status == 0xB000  # warning: one sub-operation failed
        assert final_status.NumberOfFailedSuboperations == 1
        assert final_status.NumberOfCompletedSuboperations == 7
        assert content.ct_sop_uids[0] in final_identifier.FailedSOPInstanceUIDList
        assert sorted(stored) == sorted(content.ct_sop_uids[1:])
    finally:
        assoc.release()


@sqlite_only
def test_no_patient_data_in_logs(qr_server, content, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    findscu(qr_server.port, tmp_path / "f", "QueryRetrieveLevel=STUDY", "PatientName=Müll*", "PatientID")
    out = tmp_path / "g"
    out.mkdir()
    dcmtk("getscu", "-S", "-aec", "OMNICT", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
          "-k", f"StudyInstanceUID={content.other_study_uid}", "127.0.0.1", str(qr_server.port))
    assert len(list(out.iterdir())) == 3
    text = caplog.text
    assert "qr.find.done" in text and "qr.get.done" in text
    for secret in (TEST_PATIENT_NAME, TEST_PATIENT_ID, SYNTHETIC_PATIENT_ID, "Müller", "Testpatient"):
        assert secret not in text


# -- matching rules (no network) --------------------------------------------------------------------------------


@pytest.mark.parametrize("vr,wanted,actual,expected", [
    ("DA", "20260101-20260131", "20260115", True),
    ("DA", "20260101-20260131", "20260201", False),
    ("DA", "-20251231", "20250505", True),
    ("TM", "1000-1100", "101500", True),
    ("TM", "1000-1100", "110030", True),  # 1100 covers up to 11:00:59
    ("TM", "1000-1100", "110100", False),
    ("PN", "MÜLL*", "Müller^Jörg", True),
    ("PN", "m?ller*", "Müller^Jörg", True),
    ("LO", "SYN-*", "SYN-0001", True),
    ("LO", "syn-*", "SYN-0001", False),  # only person names match case-insensitively
    ("CS", "", None, True),  # universal
    ("CS", "*", None, True),
    ("CS", "CT", None, False),  # a value was asked for, the entity has none
    ("UI", "1.2\\1.3", "1.3", True),
    ("IS", "3", "3", True),
])
def test_matching_rules(vr, wanted, actual, expected):
    key = QueryKey("X", 0, vr, wanted)
    assert matches(key, actual) is expected


def test_multi_valued_entity_value_matches_any():
    assert matches(QueryKey("ModalitiesInStudy", 0x00080061, "CS", "SEG"), ["CT", "SEG"])
    assert not matches(QueryKey("ModalitiesInStudy", 0x00080061, "CS", "MR"), ["CT", "SEG"])


# -- one AE, one port: the storage SCP with the Q/R handlers merged in ---------------------------------------------


def test_storage_scp_and_query_retrieve_on_one_ae(settings, session_factory, tmp_path):
    """As the node runs it: StorageSCP's AE gets add_query_retrieve's contexts + handlers through its
    extra_services hook. Stores, finds and gets then work on one port, fast path on."""
    from dicom_node.scp import StorageSCP
    from tests.dicom_factory import write_ct_series

    files = write_ct_series(tmp_path / "in", n_slices=4, size=16)
    study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
    with StorageSCP(settings, session_factory,
                    extra_services=lambda ae: add_query_retrieve(ae, settings, session_factory)) as scp:
        wait_for_port(scp.port)
        stored = dcmtk("storescu", "-aet", "STORESCU", "-aec", "OMNICT", "127.0.0.1", str(scp.port), *map(str, files))
        assert stored.returncode == 0, stored.stdout + stored.stderr
        found = findscu(scp.port, tmp_path / "f", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}",
                        "NumberOfStudyRelatedInstances", "PatientID")
        assert [(r.StudyInstanceUID, int(r.NumberOfStudyRelatedInstances)) for r in found] == [(study_uid, 4)]
        out = tmp_path / "get"
        out.mkdir()
        got = dcmtk("getscu", "-S", "-aec", "OMNICT", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
                    "-k", f"StudyInstanceUID={study_uid}", "127.0.0.1", str(scp.port))
        assert got.returncode == 0, got.stdout + got.stderr
        sent = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p).PixelData for p in files}
        back = {ds.SOPInstanceUID: ds.PixelData for ds in map(pydicom.dcmread, out.iterdir())}
        assert back == sent
