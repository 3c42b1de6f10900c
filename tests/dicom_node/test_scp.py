"""Storage SCP against real peers (dcmtk echoscu/storescu, pynetdicom SCUs), on SQLite and PostgreSQL.

Every test starts a real :class:`dicom_node.scp.StorageSCP` (fast path on) with the lead's ``settings`` /
``session_factory`` fixtures (data under tmp_path, a fresh migrated database, a free port).
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config
from sqlalchemy import func, select

from db.models import Association, Instance, PipelineRun, QuarantinedInstance, Series, Study
from dicom_node.fastpath import part10_header
from dicom_node.scp import StorageSCP
from dicom_node.security import client_ssl_context
from dicom_node.storage import dataset_offset
from omnict_node.config import PeerSettings, TlsSettings
from tests.dicom_node.scp_helpers import (
    PATIENT_BIRTH_DATE,
    PATIENT_ID,
    PATIENT_NAME,
    ct_slice,
    send_datasets,
    storescu,
    write_series,
)

TCP_ENV = dict(os.environ, TCP_NODELAY="1")


@pytest.fixture
def scp(settings, session_factory):
    server = StorageSCP(settings, session_factory)
    server.start()
    yield server
    server.stop()


def count(session_factory, model) -> int:
    with session_factory() as session:
        return session.scalar(select(func.count()).select_from(model))


def dataset_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    offset = dataset_offset(raw[:144])
    assert offset is not None, f"{path} is not a Part 10 file"
    return raw[offset:]


def stored_path(settings, ds) -> Path:
    return Path(settings.storage.root) / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


def association_rows(session_factory, timeout: float = 10.0) -> list[Association]:
    """The audit rows, once every association has ended (the final row is written just after the peer's
    A-RELEASE was answered, so a fast peer can exit before it is committed)."""
    deadline = time.monotonic() + timeout
    while True:
        with session_factory() as session:
            rows = list(session.scalars(select(Association).order_by(Association.id)))
        if all(r.outcome != "open" for r in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.02)


def send_raw_file(port: int, path: Path, sop_class: str = CTImageStorage, transfer_syntax=ExplicitVRLittleEndian) -> int:
    """Send the bytes after a file's meta exactly as they are (pynetdicom's chunked send: no re-encoding)."""
    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context(sop_class, [transfer_syntax])
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="OMNICT")
        assert assoc.is_established
        try:
            rsp = assoc.send_c_store(path)
            return int(rsp.Status) if rsp and "Status" in rsp else -1
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


# -- echo and the basic store path ---------------------------------------------------------------------------------

def test_echoscu_gets_success_and_an_audit_row(scp, session_factory):
    result = subprocess.run(["echoscu", "-aet", "ECHOER", "-aec", "OMNICT", "127.0.0.1", str(scp.port)],
                            capture_output=True, text=True, timeout=30, env=TCP_ENV)
    assert result.returncode == 0, result.stderr
    rows = association_rows(session_factory)
    assert len(rows) == 1
    assert (rows[0].calling_ae_title, rows[0].called_ae_title, rows[0].outcome) == ("ECHOER", "OMNICT", "released")
    assert rows[0].peer_address == "127.0.0.1" and rows[0].ended_at is not None


def test_storescu_series_lands_on_disk_and_in_the_database(scp, settings, session_factory, tmp_path):
    paths = write_series(tmp_path / "in", 6)
    result = storescu(scp.port, paths)
    assert result.returncode == 0, result.stderr
    for path in paths:
        original = dcmread(path)
        target = stored_path(settings, original)
        assert target.is_file()
        # The dataset is stored byte for byte as sent; the file meta names the negotiated transfer syntax.
        assert dataset_bytes(target) == dataset_bytes(path)
        stored = dcmread(target)
        assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert stored.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
        assert stored.file_meta.SourceApplicationEntityTitle == "STORESCU"
    # Nothing half-written is left. While the SCP runs, the series folder holds one empty spare temporary file,
    # created after the last answer for a next instance (InstanceStore.prepare_spare; removed when the SCP stops).
    leftovers = list(Path(settings.storage.root).rglob(".tmp-*"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size == 0, leftovers
    first = dcmread(paths[0])
    assert leftovers[0].parent == stored_path(settings, first).parent
    with session_factory() as session:
        study = session.scalar(select(Study))
        series = session.scalar(select(Series))
        instances = list(session.scalars(select(Instance)))
        run = session.scalar(select(PipelineRun))
    assert study.study_instance_uid == first.StudyInstanceUID and study.instance_count == 6
    assert study.source_ae_title == "STORESCU" and study.modalities == "CT" and study.study_date == "20260301"
    assert series.series_instance_uid == first.SeriesInstanceUID and series.series_number == 2
    assert sorted(i.instance_number for i in instances) == [1, 2, 3, 4, 5, 6]
    assert all(i.transfer_syntax_uid == ExplicitVRLittleEndian for i in instances)
    assert all((Path(settings.storage.root) / i.path).stat().st_size == i.size_bytes for i in instances)
    assert run.state.value == "receiving"
    (row,) = association_rows(session_factory)
    assert (row.outcome, row.instances_stored, row.instances_failed) == ("released", 6, 0)
    assert row.bytes_received == sum(len(dataset_bytes(p)) for p in paths)
    assert all(i.association_id == row.id for i in instances)


# -- transfer syntaxes ----------------------------------------------------------------------------------------------

def _encode(src: Path, dst: Path, transfer_syntax: str) -> Path:
    """Re-encode a slice with a real encoder (dcmtk, or pydicom+openjpeg for JPEG 2000)."""
    tools = {
        JPEGLosslessSV1: ["dcmcjpeg", "+e1"],
        JPEGLossless: ["dcmcjpeg", "+el"],
        JPEGLSLossless: ["dcmcjpls", "+el"],
        JPEGLSNearLossless: ["dcmcjpls", "+en", "+md", "2"],
        RLELossless: ["dcmcrle"],
        DeflatedExplicitVRLittleEndian: ["dcmconv", "+td"],
        ImplicitVRLittleEndian: ["dcmconv", "+ti"],
    }
    if transfer_syntax in tools:
        subprocess.run([*tools[transfer_syntax], str(src), str(dst)], check=True, capture_output=True)
    else:
        ds = dcmread(src)
        kwargs = {} if transfer_syntax == JPEG2000Lossless else {"j2k_cr": [5]}
        ds.compress(transfer_syntax, **kwargs)
        ds.save_as(dst, enforce_file_format=True)
    assert dcmread(dst).file_meta.TransferSyntaxUID == transfer_syntax
    return dst


ALL_SYNTAXES = [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, JPEGLosslessSV1, JPEGLossless,
                JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, RLELossless]


def test_compressed_and_other_transfer_syntaxes_are_stored_as_received(scp, settings, session_factory, tmp_path):
    source = write_series(tmp_path / "src", 1)[0]
    statuses = {}
    for number, syntax in enumerate(ALL_SYNTAXES):
        ds = ct_slice(number, generate_uid(), generate_uid(), unsigned=True)
        plain = tmp_path / f"plain{number}.dcm"
        ds.save_as(plain, enforce_file_format=True)
        encoded = _encode(plain, tmp_path / f"enc{number}.dcm", syntax)
        statuses[syntax.name] = send_raw_file(scp.port, encoded, transfer_syntax=syntax)
        assert statuses[syntax.name] == 0, (syntax.name, hex(statuses[syntax.name]))
        target = stored_path(settings, dcmread(encoded))  # lossy encoders assign a new SOP Instance UID
        stored = dcmread(target)
        assert stored.file_meta.TransferSyntaxUID == syntax
        # Never decompressed, never re-encoded: the stored dataset bytes are the sent ones.
        assert dataset_bytes(target) == dataset_bytes(encoded), syntax.name
        assert stored.PatientName == PATIENT_NAME
    assert set(statuses.values()) == {0}, statuses
    with session_factory() as session:
        syntaxes = set(session.scalars(select(Instance.transfer_syntax_uid)))
    assert syntaxes == {str(s) for s in ALL_SYNTAXES}
    assert source.exists()


def test_pydicom_reference_files_in_compressed_syntaxes(scp, settings):
    from pydicom.data import get_testdata_file

    sent = 0
    for name in ("MR_small_RLE.dcm", "JPEG2000.dcm", "JPEGLSNearLossless_16.dcm", "MR_small_jp2klossless.dcm",
                 "MR_small_jpeg_ls_lossless.dcm"):
        ds = dcmread(get_testdata_file(name, download=False))
        if name.startswith("MR"):
            # MR classes are not a CT node's business: relabel as secondary capture; the pixel bytes stay as they are.
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):  # some reference files carry none
            if keyword not in ds:
                setattr(ds, keyword, generate_uid())
        syntax = ds.file_meta.TransferSyntaxUID
        assert send_datasets(scp.port, [ds], transfer_syntax=syntax) == [0], name
        stored = dcmread(stored_path(settings, ds))
        assert stored.file_meta.TransferSyntaxUID == syntax
        assert stored.PixelData == ds.PixelData
        sent += 1
    assert sent == 5


# -- re-sends ---------------------------------------------------------------------------------------------------------

def test_identical_resend_succeeds_without_duplicates(scp, settings, session_factory, tmp_path):
    paths = write_series(tmp_path / "in", 3)
    assert storescu(scp.port, paths).returncode == 0
    before = {p: stored_path(settings, dcmread(p)).stat().st_mtime_ns for p in paths}
    assert send_datasets(scp.port, [dcmread(p) for p in paths]) == [0, 0, 0]
    assert storescu(scp.port, paths).returncode == 0
    assert count(session_factory, Instance) == 3
    with session_factory() as session:
        assert set(session.scalars(select(Instance.revision))) == {1}
        assert session.scalar(select(Study.instance_count)) == 3
    assert {p: stored_path(settings, dcmread(p)).stat().st_mtime_ns for p in paths} == before  # not rewritten
    assert not list((settings.data_dir / "superseded").rglob("*.dcm"))


def test_conflicting_resend_replaces_and_keeps_the_previous_bytes(scp, settings, session_factory, tmp_path):
    study, series = generate_uid(), generate_uid()
    first = ct_slice(0, study, series, seed=1)
    second = ct_slice(0, study, series, sop_uid=first.SOPInstanceUID, seed=2)  # same UID, other pixels
    assert send_datasets(scp.port, [first]) == [0]
    target = stored_path(settings, first)
    old_bytes = dataset_bytes(target)
    assert send_datasets(scp.port, [second]) == [0]
    assert dcmread(target).PixelData == second.PixelData
    (kept,) = list((settings.data_dir / "superseded").rglob("*.dcm"))
    assert kept.name.startswith(first.SOPInstanceUID + ".")
    assert dataset_bytes(kept) == old_bytes and dcmread(kept).PixelData == first.PixelData
    with session_factory() as session:
        (instance,) = session.scalars(select(Instance))
        assert instance.revision == 2
        assert session.scalar(select(Study.instance_count)) == 1


# -- bad input: quarantine with a clear status ------------------------------------------------------------------------

def quarantine_rows(session_factory) -> list[QuarantinedInstance]:
    with session_factory() as session:
        return list(session.scalars(select(QuarantinedInstance).order_by(QuarantinedInstance.id)))


def test_invalid_uids_and_missing_uids_are_refused_and_quarantined(scp, settings, session_factory):
    traversal = ct_slice(0, "1.2.3/../../../etc", generate_uid())  # a "UID" that would escape the store
    leading_zero = ct_slice(1, "1.2.03.4", generate_uid())
    no_series = ct_slice(2, generate_uid(), generate_uid())
    del no_series.SeriesInstanceUID
    statuses = send_datasets(scp.port, [traversal, leading_zero, no_series])
    assert statuses == [0xC002, 0xC002, 0xC001]
    rows = quarantine_rows(session_factory)
    assert [r.reason for r in rows] == ["invalid_uid", "invalid_uid", "missing_uid"]
    assert [r.status_code for r in rows] == statuses
    assert rows[0].sop_instance_uid == traversal.SOPInstanceUID
    assert all(r.association_id is not None for r in rows)
    for row in rows:
        kept = Path(row.path)
        assert kept.is_file() and kept.is_relative_to(settings.storage.quarantine)
        assert dcmread(kept).SOPInstanceUID in {traversal.SOPInstanceUID, leading_zero.SOPInstanceUID,
                                                no_series.SOPInstanceUID}
    assert count(session_factory, Instance) == 0
    assert not any(p.is_file() for p in Path(settings.storage.root).rglob("*"))
    assert not (Path(settings.storage.root).parent.parent / "etc").exists()
    (assoc,) = association_rows(session_factory)
    assert (assoc.instances_stored, assoc.instances_failed) == (0, 3)


def test_truncated_dataset_is_refused_and_quarantined(scp, settings, session_factory, tmp_path):
    ds = ct_slice(0, generate_uid(), generate_uid())
    whole = tmp_path / "whole.dcm"
    ds.save_as(whole, enforce_file_format=True)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(whole.read_bytes()[:-1000])  # cut inside the pixel data
    assert send_raw_file(scp.port, truncated) == 0xC000
    (row,) = quarantine_rows(session_factory)
    assert row.reason == "undecodable" and row.status_code == 0xC000 and "truncated" in row.detail
    assert Path(row.path).read_bytes().endswith(dataset_bytes(truncated))
    assert count(session_factory, Instance) == 0
    # The complete instance is then accepted.
    assert send_raw_file(scp.port, whole) == 0
    assert count(session_factory, Instance) == 1


def test_sop_class_mismatch_is_refused_with_a900(scp, session_factory, tmp_path):
    ds = ct_slice(0, generate_uid(), generate_uid())
    ds.SOPClassUID = SecondaryCaptureImageStorage  # the dataset says SC ...
    sc_file = tmp_path / "sc.dcm"
    ds.save_as(sc_file, enforce_file_format=True)
    path = tmp_path / "mismatch.dcm"  # ... but its file meta (which picks the context) says CT
    path.write_bytes(part10_header(CTImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian) + dataset_bytes(sc_file))
    assert send_raw_file(scp.port, path, sop_class=CTImageStorage) == 0xA900
    (row,) = quarantine_rows(session_factory)
    assert (row.reason, row.status_code) == ("wrong_sop_class", 0xA900)
    assert count(session_factory, Instance) == 0


# -- resources and access ---------------------------------------------------------------------------------------------

def test_disk_watermark_answers_a700_and_stores_nothing(settings, session_factory, tmp_path):
    settings.storage.min_free_bytes = 1 << 62  # more than any disk: permanently "under pressure"
    settings.storage.reject_associations_under_pressure = False
    with StorageSCP(settings, session_factory) as server:
        assert send_datasets(server.port, [ct_slice(0, generate_uid(), generate_uid())]) == [0xA700]
    assert count(session_factory, Instance) == 0
    assert not any(p.is_file() for p in Path(settings.storage.root).rglob("*"))
    (row,) = association_rows(session_factory)
    assert row.instances_failed == 1


def test_disk_pressure_rejects_new_associations_transiently(settings, session_factory, tmp_path):
    settings.storage.max_used_fraction = 0.0  # any used byte is too many
    with StorageSCP(settings, session_factory) as server:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="OMNICT")
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)  # transient, local limit exceeded
    (row,) = association_rows(session_factory)
    assert row.outcome == "rejected" and "watermark" in row.detail


def test_allow_list_rejects_unknown_calling_ae_and_wrong_address(settings, session_factory):
    settings.dicom.allowed_peers = [PeerSettings(ae_title="GOODSCU", host="127.0.0.1"),
                                    PeerSettings(ae_title="FARAWAY", host="10.11.12.13")]
    with StorageSCP(settings, session_factory) as server:
        def echo(aet: str) -> subprocess.CompletedProcess:
            return subprocess.run(["echoscu", "-aet", aet, "-aec", "OMNICT", "127.0.0.1", str(server.port)],
                                  capture_output=True, text=True, timeout=30, env=TCP_ENV)

        assert echo("GOODSCU").returncode == 0
        bad = echo("BADSCU")
        assert bad.returncode != 0 and "Rejected" in (bad.stdout + bad.stderr)
        assert echo("FARAWAY").returncode != 0
    rows = association_rows(session_factory)
    assert [(r.calling_ae_title, r.outcome) for r in rows] == [
        ("GOODSCU", "released"), ("BADSCU", "rejected"), ("FARAWAY", "rejected")]
    assert rows[1].detail == "calling AE title not recognised"
    assert rows[2].detail == "calling AE title not allowed from this address"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate (openssl CLI, EC keys)."""
    folder = tmp_path_factory.mktemp("tls")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=omnict-test-ca")
    for name in ("server", "client"):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}.omnict.test")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2")
    return {name: folder / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def test_tls_echo_and_store_and_plain_tcp_refused(settings, session_factory, tls_files):
    settings.dicom.tls = TlsSettings(enabled=True, certificate=tls_files["server.pem"],
                                     private_key=tls_files["server.key"], ca_certificates=tls_files["ca.pem"])
    client = client_ssl_context(TlsSettings(enabled=True, certificate=tls_files["client.pem"],
                                            private_key=tls_files["client.key"], ca_certificates=tls_files["ca.pem"]))
    with StorageSCP(settings, session_factory) as server:
        ae = AE(ae_title="TLSSCU")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", server.port, ae_title="OMNICT", tls_args=(client, None))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        ds = ct_slice(0, generate_uid(), generate_uid())
        assert send_datasets(server.port, [ds], ssl_context=client) == [0]
        # Without TLS (or without a client certificate) nothing gets through.
        plain = AE(ae_title="PLAIN")
        plain.add_requested_context("1.2.840.10008.1.1")
        plain.acse_timeout = plain.network_timeout = 3
        assert not plain.associate("127.0.0.1", server.port, ae_title="OMNICT").is_established
        # dcmtk's storescu over TLS (Debian's dcmtk is built with OpenSSL).
        dcmtk_ds = ct_slice(1, generate_uid(), generate_uid())
        path = Path(tls_files["ca.pem"]).parent / f"dcmtk-{dcmtk_ds.SOPInstanceUID}.dcm"
        dcmtk_ds.save_as(path, enforce_file_format=True)
        result = storescu(server.port, [path], "+tls", str(tls_files["client.key"]), str(tls_files["client.pem"]),
                          "+cf", str(tls_files["ca.pem"]))
        assert result.returncode == 0, result.stderr
        assert stored_path(settings, dcmtk_ds).is_file()
    assert stored_path(settings, ds).is_file()
    rows = association_rows(session_factory)
    assert [r.tls for r in rows if r.outcome == "released"] == [True] * len([r for r in rows if r.outcome == "released"])
    assert len([r for r in rows if r.outcome == "released"]) >= 2


def test_database_failure_answers_a701_and_acknowledges_nothing(settings, tmp_path):
    from db.session import make_engine, make_session_factory

    # A real database without the schema: every registration fails (as with a dropped/unreachable database).
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        with StorageSCP(settings, make_session_factory(engine), registration_timeout_s=10) as server:
            statuses = send_datasets(server.port, [ct_slice(0, generate_uid(), generate_uid())])
    finally:
        engine.dispose()
    assert statuses == [0xA701]


def test_no_patient_data_in_logs(scp, settings, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    good = write_series(tmp_path / "in", 2)
    assert storescu(scp.port, good).returncode == 0
    bad = ct_slice(5, "1.2.3..4", generate_uid())  # quarantine path logs too
    assert send_datasets(scp.port, [bad, dcmread(good[0])]) == [0xC002, 0]
    text = caplog.text
    assert "scp.association.accepted" in text and "scp.instance.quarantined" in text
    for secret in (PATIENT_NAME, PATIENT_NAME.split("^")[0], PATIENT_ID, PATIENT_BIRTH_DATE):
        assert secret not in text
    assert logging.getLogger("pynetdicom").level == logging.WARNING
    assert _config.LOG_REQUEST_IDENTIFIERS is False and _config.LOG_RESPONSE_IDENTIFIERS is False


def test_concurrent_associations_share_commits(scp, settings, session_factory, tmp_path):
    series = [write_series(tmp_path / f"s{i}", 8) for i in range(3)]
    results: list[subprocess.CompletedProcess] = []
    threads = [threading.Thread(target=lambda p=p: results.append(storescu(scp.port, p))) for p in series]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.returncode for r in results] == [0, 0, 0]
    assert count(session_factory, Instance) == 24
    assert count(session_factory, Study) == 3
    assert scp.registrar.records_committed == 24


def test_absurd_pdu_length_is_refused_without_allocating_it(scp):
    import socket
    import struct

    with socket.create_connection(("127.0.0.1", scp.port), timeout=10) as raw:
        raw.sendall(struct.pack(">BBL", 0x04, 0, 0xFFFFFFF0))  # a P-DATA-TF "of 4 GiB"
        reply = raw.recv(64)  # an A-ABORT (type 0x07) or a closed connection, promptly
        assert reply == b"" or reply[:1] == b"\x07"
    result = subprocess.run(["echoscu", "-aec", "OMNICT", "127.0.0.1", str(scp.port)], capture_output=True,
                            text=True, timeout=30, env=TCP_ENV)
    assert result.returncode == 0, result.stderr  # the SCP is unharmed


def test_plain_pynetdicom_mode_still_works(settings, session_factory, tmp_path):
    """fast_path=False (pynetdicom's own reactors) stores the same way: the patches are optional."""
    with StorageSCP(settings, session_factory, fast_path=False) as server:
        paths = write_series(tmp_path / "in", 3)
        assert storescu(server.port, paths).returncode == 0
    assert count(session_factory, Instance) == 3
