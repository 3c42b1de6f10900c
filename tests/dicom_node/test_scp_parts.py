"""The SCP's parts on their own: UID validation, the durable store, the dataset scan, the watermark, the registrar."""

from __future__ import annotations

import threading
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select

from db.ingest import InstanceRecord
from db.models import Instance
from db.session import make_engine, make_session_factory
from dicom_node.fastpath import (
    UndecodableDataset,
    c_store_rsp_pdu,
    parse_c_store_rq,
    part10_header,
    scan_dataset,
)
from dicom_node.registrar import RegistrationError, Registrar
from dicom_node.storage import MAX_SPARES, DiskWatermark, InstanceStore, StoreOutcome, dataset_offset, uid_problem
from tests.dicom_node.scp_helpers import ct_slice


@pytest.mark.parametrize("uid", ["1.2.840.10008.5.1.4.1.1.2", "0.1", "2.25.0", "1" * 64,
                                 "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678"])
def test_valid_uids(uid):
    assert uid_problem(uid) is None


@pytest.mark.parametrize("uid", [None, "", "1..2", "1.02", ".1", "1.", "1.2.a", "1/2", "../1", "1.2 ", "1" * 65,
                                 "1.2\x00", "１.2"])
def test_invalid_uids(uid):
    assert uid_problem(uid) is not None


def _store(tmp_path: Path) -> InstanceStore:
    return InstanceStore(tmp_path / "s", tmp_path / "q", tmp_path / "old")


def test_store_create_identical_replace(tmp_path):
    store = _store(tmp_path)
    header = part10_header(CTImageStorage, "1.2.3", ExplicitVRLittleEndian, "A")
    first = store.store("1.2", "1.2.1", "1.2.3", header, b"\x08\x00\x16\x00UI\x02\x001\x00")
    assert first.outcome is StoreOutcome.CREATED and first.relative_path == "1.2/1.2.1/1.2.3.dcm"
    target = tmp_path / "s" / first.relative_path
    # Another sender (other AE in the file meta), same dataset: identical, nothing rewritten.
    other_header = part10_header(CTImageStorage, "1.2.3", ExplicitVRLittleEndian, "OTHER")
    assert store.store("1.2", "1.2.1", "1.2.3", other_header, b"\x08\x00\x16\x00UI\x02\x001\x00").outcome \
        is StoreOutcome.IDENTICAL
    assert target.read_bytes().startswith(header)
    replaced = store.store("1.2", "1.2.1", "1.2.3", header, b"\x08\x00\x16\x00UI\x02\x002\x00")
    assert replaced.outcome is StoreOutcome.REPLACED
    assert target.read_bytes().endswith(b"2\x00")
    assert replaced.superseded_path.read_bytes().endswith(b"1\x00")
    assert not list((tmp_path / "s").rglob(".tmp-*"))


def test_spare_temporary_file_is_used_by_the_next_store_and_removed_at_close(tmp_path):
    store = _store(tmp_path)
    header = part10_header(CTImageStorage, "1.2.3", ExplicitVRLittleEndian, "A")
    folder = tmp_path / "s" / "1.2" / "1.2.1"
    store.prepare_spare(folder)  # a folder this store has not made: nothing
    assert not folder.exists()
    store.store("1.2", "1.2.1", "1.2.3", header, b"\x08\x00\x16\x00UI\x02\x001\x00")
    store.prepare_spare(folder)
    store.prepare_spare(folder)  # one spare per folder
    spares = list(folder.glob(".tmp-*"))
    assert len(spares) == 1 and spares[0].stat().st_size == 0
    second = store.store("1.2", "1.2.1", "1.2.4", header, b"\x08\x00\x16\x00UI\x02\x002\x00")
    assert not spares[0].exists()  # renamed into place as the new instance
    assert (tmp_path / "s" / second.relative_path).read_bytes() == header + b"\x08\x00\x16\x00UI\x02\x002\x00"
    store.prepare_spare(folder)
    assert len(list(folder.glob(".tmp-*"))) == 1
    store.close_spares()
    assert not list(folder.glob(".tmp-*"))
    # A spare left by a killed process is removed when a new process first stores into its folder.
    store.prepare_spare(folder)
    restarted = _store(tmp_path)
    restarted.store("1.2", "1.2.1", "1.2.5", header, b"\x08\x00\x16\x00UI\x02\x003\x00")
    assert not list(folder.glob(".tmp-*"))
    assert sorted(p.name for p in folder.iterdir()) == ["1.2.3.dcm", "1.2.4.dcm", "1.2.5.dcm"]


def test_spares_are_bounded_the_oldest_series_folder_losing_its_own(tmp_path):
    """A node that runs for months receives series after series: the spares (open files) must not add up."""
    store = _store(tmp_path)
    header = part10_header(CTImageStorage, "1.2.3", ExplicitVRLittleEndian, "A")
    folders = []
    for n in range(MAX_SPARES + 3):
        store.store("1.2", f"1.2.{n}", f"1.2.{n}.1", header, b"\x08\x00\x16\x00UI\x02\x001\x00")
        folders.append(tmp_path / "s" / "1.2" / f"1.2.{n}")
        store.prepare_spare(folders[-1])
    with_spare = [f for f in folders if list(f.glob(".tmp-*"))]
    assert with_spare == folders[3:]  # the newest MAX_SPARES folders keep theirs
    store.close_spares()
    assert not list((tmp_path / "s").rglob(".tmp-*"))


def test_store_refuses_invalid_uids_as_paths(tmp_path):
    store = _store(tmp_path)
    with pytest.raises(ValueError):
        store.store("..", "1.2", "1.3", b"", b"x")
    with pytest.raises(ValueError):
        store.store("1.2", "1.2/../../x", "1.3", b"", b"x")
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_quarantine_keeps_bytes(tmp_path):
    kept = _store(tmp_path).quarantine([b"abc", memoryview(b"def")], "invalid_uid")
    assert kept.read_bytes() == b"abcdef" and kept.is_relative_to(tmp_path / "q")


def test_part10_header_reads_back_with_pydicom():
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, "1.2.345"  # odd length: padded with NUL
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    header = part10_header(CTImageStorage, "1.2.345", ExplicitVRLittleEndian, "ODD")
    assert dataset_offset(header) == len(header)
    read = dcmread(BytesIO(header + body.getvalue()))
    assert read.file_meta.MediaStorageSOPInstanceUID == "1.2.345"
    assert read.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert read.file_meta.SourceApplicationEntityTitle.strip() == "ODD"
    assert read.SOPInstanceUID == "1.2.345"


def _encoded(ds: Dataset, implicit: bool = False) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def _with_undefined_length_sequence() -> Dataset:
    ds = ct_slice(0, generate_uid(), generate_uid())
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CTImageStorage, generate_uid()
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "T-D0050", "SRT", "Tissue"
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([item])
    for owner, keyword in ((ds, "ReferencedImageSequence"), (item, "PurposeOfReferenceCodeSequence")):
        owner[keyword].is_undefined_length = True
    for one in (item, inner):
        one.is_undefined_length_sequence_item = True
    return ds


@pytest.mark.parametrize("implicit", [False, True])
def test_scan_reads_uids_and_walks_nested_sequences(implicit):
    ds = _with_undefined_length_sequence()
    data = _encoded(ds, implicit)
    assert b"\xfe\xff\xdd\xe0" in data  # really undefined-length sequences
    found = scan_dataset(data, implicit, False, frozenset({0x00080018, 0x0020000D, 0x00200013}))
    assert found[0x00080018].rstrip(b"\0") == ds.SOPInstanceUID.encode()
    assert found[0x0020000D].rstrip(b"\0") == ds.StudyInstanceUID.encode()
    assert found[0x00200013].strip() == b"1"


@pytest.mark.parametrize("implicit", [False, True])
def test_scan_refuses_every_truncation_inside_an_element(implicit):
    data = _encoded(_with_undefined_length_sequence(), implicit)
    pixel_start = data.index(b"\xe0\x7f\x10\x00")
    sequence_start = data.index(b"\x08\x00\x40\x11")  # ReferencedImageSequence
    cuts = list(range(sequence_start + 1, sequence_start + 120, 3)) + [pixel_start + 5, pixel_start + 100, len(data) - 1]
    for cut in cuts:
        with pytest.raises(UndecodableDataset):
            scan_dataset(data[:cut], implicit, False, frozenset())


def test_scan_refuses_garbage_and_bad_deflate():
    with pytest.raises(UndecodableDataset):
        scan_dataset(b"\x08\x00\x18\x00\x01\x02\xff\xff", False, False, frozenset())
    with pytest.raises(UndecodableDataset):
        scan_dataset(b"not deflate at all", False, True, frozenset())


def test_watermark(tmp_path):
    assert DiskWatermark(tmp_path, 1 << 62, 1.0).under_pressure()
    assert DiskWatermark(tmp_path, 0, 0.0).under_pressure()  # any used byte is too much
    relaxed = DiskWatermark(tmp_path, 0, 1.0, interval_s=60)
    assert not relaxed.under_pressure()
    relaxed.note_written(1 << 62)  # bytes written since the last statvfs count against the free space
    assert relaxed.under_pressure()


def _record(study: str, series: str, n: int) -> InstanceRecord:
    return InstanceRecord(study_instance_uid=study, series_instance_uid=series, sop_instance_uid=f"{series}.{n}",
                          sop_class_uid=CTImageStorage, transfer_syntax_uid=ExplicitVRLittleEndian,
                          path=f"{study}/{series}/{series}.{n}.dcm", size_bytes=10, modality="CT", instance_number=n)


def test_registrar_group_commits_concurrent_submissions(session_factory):
    registrar = Registrar(session_factory, batch_max=16)
    registrar.start()
    try:
        outcomes = [registrar.register(_record("1.9", "1.9.0", n)) for n in range(20)]
        # From several threads at once, as concurrent associations do: they share commits.
        results: list = []
        start = threading.Barrier(6)

        def associate(series: int) -> None:
            start.wait()
            results.extend(registrar.register(_record("1.8", f"1.8.{series}", n)) for n in range(10))

        threads = [threading.Thread(target=associate, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        registrar.stop()
    assert all(o.created for o in outcomes) and len(results) == 60 and all(o.created for o in results)
    assert registrar.records_committed == 80
    assert registrar.batches_committed < 80  # some commits carried several associations' records
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 80
    # Idempotent: registering the same records again creates nothing.
    registrar = Registrar(session_factory)
    registrar.start()
    try:
        assert not registrar.register(_record("1.9", "1.9.0", 0)).created
    finally:
        registrar.stop()


def test_registrar_reports_database_errors(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'no-schema.db'}")
    registrar = Registrar(make_session_factory(engine))
    registrar.start()
    try:
        for n in range(3):
            with pytest.raises(RegistrationError):
                registrar.register(_record("1.7", "1.7.1", n), timeout=30)
    finally:
        registrar.stop()
        engine.dispose()
    with pytest.raises(RegistrationError):
        registrar.register(_record("1.7", "1.7.1", 9))  # stopped: a clear error, not a hang


@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xA700])
def test_hand_encoded_c_store_rsp_is_byte_identical_to_pynetdicoms(status):
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu import P_DATA_TF

    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 7
    primitive.AffectedSOPClassUID = CTImageStorage
    primitive.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.123"  # odd length: padded with NUL
    primitive.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    [p_data] = list(message.encode_msg(3, 16384))
    pdu = P_DATA_TF()
    pdu.from_primitive(p_data)

    assert c_store_rsp_pdu(3, 7, CTImageStorage, "1.2.826.0.1.3680043.8.498.123", status) == pdu.encode()


def _encoded_command_set(primitive) -> bytes:
    from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE

    message = (C_STORE_RQ if isinstance(primitive, C_STORE) else C_ECHO_RQ)()
    message.primitive_to_message(primitive)
    first = next(iter(message.encode_msg(1, 0)))  # the command set comes first, in one fragment
    [(_, pdv)] = first.presentation_data_value_list
    return pdv[1:]


def test_hand_decoded_c_store_rq_reads_what_pynetdicom_encodes():
    from pynetdicom.dimse_primitives import C_ECHO, C_STORE

    request = C_STORE()
    request.MessageID = 513
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.77"
    request.Priority = 1
    request.MoveOriginatorApplicationEntityTitle = "PACS"
    request.MoveOriginatorMessageID = 9
    request.DataSet = BytesIO(b"\x08\x00\x16\x00")

    command = parse_c_store_rq(_encoded_command_set(request))

    assert command is not None
    assert (command.message_id, command.sop_class_uid, command.sop_instance_uid, command.priority) == (
        513, CTImageStorage, "1.2.826.0.1.3680043.8.498.77", 1)
    assert (command.move_originator_ae, command.move_originator_message_id) == ("PACS", 9)
    echo = C_ECHO()
    echo.MessageID = 1
    assert parse_c_store_rq(_encoded_command_set(echo)) is None  # another command: pynetdicom decodes it
    assert parse_c_store_rq(_encoded_command_set(request)[:-3]) is None  # truncated
