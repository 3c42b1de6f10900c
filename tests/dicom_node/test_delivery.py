"""Delivery of result objects (dicom_node.delivery) to a real Orthanc, and failure handling against real peers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from pynetdicom import AE, evt
from pynetdicom import sop_class as sop
from sqlalchemy import select

from db.models import Delivery
from dicom_node.delivery import DeliveryError, deliver, deliver_run, destination_label
from omnict_node.config import DestinationSettings, TlsSettings
from tests.dicom_node.test_qr import NodeContent, build_node_content, sqlite_only
from tests.services import free_port


@pytest.fixture
def content(settings, session_factory, tmp_path) -> NodeContent:
    return build_node_content(settings, session_factory, tmp_path / "work")


def orthanc_destination(orthanc, **tls) -> DestinationSettings:
    return DestinationSettings(ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port,
                               tls=TlsSettings(**tls) if tls else TlsSettings())


def orthanc_sop_uids(orthanc) -> list[str]:
    """SOP Instance UIDs of every instance Orthanc holds (a list: duplicates would show)."""
    return [orthanc.get_json(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"]
            for i in orthanc.get_json("/instances")]


def delivery_rows(session_factory) -> list[Delivery]:
    with session_factory() as session:
        return list(session.scalars(select(Delivery).order_by(Delivery.id)))


def test_deliver_run_to_orthanc_is_idempotent(settings, session_factory, content, orthanc):
    destination = orthanc_destination(orthanc)
    report = deliver_run(session_factory, settings, content.run_id, destination)
    assert report.ok and len(report.delivered) == len(content.result_sop_uids) == 5
    assert {r.sop_class_uid for r in report.results} >= {str(sop.Comprehensive3DSRStorage),
                                                         str(sop.SegmentationStorage),
                                                         str(sop.KeyObjectSelectionDocumentStorage)}
    assert sorted(orthanc_sop_uids(orthanc)) == sorted(content.result_sop_uids)
    studies = orthanc.get_json("/studies")
    assert len(studies) == 1
    study = orthanc.get_json(f"/studies/{studies[0]}")
    assert study["MainDicomTags"]["StudyInstanceUID"] == content.study_uid
    assert len(study["Series"]) == 5

    [row] = delivery_rows(session_factory)
    assert (row.state, row.attempts, row.last_error) == ("delivered", 1, None)
    assert row.destination == destination_label(destination)
    assert row.delivered_at is not None
    assert sorted(row.sop_instance_uids) == sorted(content.result_sop_uids)

    again = deliver_run(session_factory, settings, content.run_id, destination)  # e.g. a redelivered task
    assert again.skipped and not again.results
    forced = deliver_run(session_factory, settings, content.run_id, destination, force=True)
    assert forced.ok and len(forced.delivered) == 5
    assert sorted(orthanc_sop_uids(orthanc)) == sorted(content.result_sop_uids)  # replaced, not duplicated
    [row] = delivery_rows(session_factory)
    assert (row.state, row.attempts) == ("delivered", 2)


def test_objects_delivered_before_are_skipped_on_the_first_attempt_only(settings, session_factory, content, orthanc):
    """The measurement objects the side task sent while the model ran are not sent again by the deliver stage's first
    attempt (yet recorded as delivered); a later attempt, e.g. an operator's re-delivery, sends everything."""
    destination = orthanc_destination(orthanc)
    uids = list(content.result_sop_uids)  # in the order of the result_objects rows: SEG and measurement SR first
    early = uids[:2]
    report = deliver_run(session_factory, settings, content.run_id, destination, delivered_before=early)
    assert report.ok
    assert [r.sop_instance_uid for r in report.results] == uids[2:]
    assert sorted(orthanc_sop_uids(orthanc)) == sorted(uids[2:])  # the early two were not sent
    [row] = delivery_rows(session_factory)
    assert row.state == "delivered" and sorted(row.sop_instance_uids) == sorted(content.result_sop_uids)

    again = deliver_run(session_factory, settings, content.run_id, destination, force=True, delivered_before=early)
    assert sorted(r.sop_instance_uid for r in again.delivered) == sorted(content.result_sop_uids)
    assert sorted(orthanc_sop_uids(orthanc)) == sorted(content.result_sop_uids)


def test_a_retry_after_a_failed_first_attempt_sends_everything(settings, session_factory, content, orthanc):
    """What the early delivery claims is trusted on the first attempt only: after a failure, all objects go."""
    destination = orthanc_destination(orthanc)
    uids = list(content.result_sop_uids)
    orthanc.stop()
    with pytest.raises(DeliveryError):
        deliver_run(session_factory, settings, content.run_id, destination, delivered_before=uids[:2])
    orthanc.start()
    retry = deliver_run(session_factory, settings, content.run_id, destination, delivered_before=uids[:2])
    assert sorted(r.sop_instance_uid for r in retry.delivered) == sorted(uids)
    assert sorted(orthanc_sop_uids(orthanc)) == sorted(uids)


def test_orthanc_down_is_transient_then_delivery_succeeds(settings, session_factory, content, orthanc):
    destination = orthanc_destination(orthanc)
    orthanc.stop()  # waits for the process to exit (its index stays locked until then)
    with pytest.raises(DeliveryError) as failure:
        deliver_run(session_factory, settings, content.run_id, destination)
    assert failure.value.transient
    [row] = delivery_rows(session_factory)
    assert (row.state, row.attempts) == ("pending", 1)
    assert "could not associate" in row.last_error

    orthanc.start()
    report = deliver_run(session_factory, settings, content.run_id, destination)
    assert report.ok
    assert sorted(orthanc_sop_uids(orthanc)) == sorted(content.result_sop_uids)
    [row] = delivery_rows(session_factory)
    assert (row.state, row.attempts, row.last_error) == ("delivered", 2, None)


@sqlite_only
def test_final_attempt_marks_transient_failure_failed(settings, session_factory, content):
    nowhere = DestinationSettings(ae_title="NOBODY", host="127.0.0.1", port=free_port())
    with pytest.raises(DeliveryError) as failure:
        deliver_run(session_factory, settings, content.run_id, nowhere, final_attempt=True)
    assert failure.value.transient
    [row] = delivery_rows(session_factory)
    assert (row.state, row.attempts) == ("failed", 1)


class PickySCP:
    """A real pynetdicom storage SCP that knows some SOP classes only and answers chosen statuses."""

    def __init__(self, classes: list[str], statuses: dict[str, int] | None = None,
                 allowed_calling: list[str] | None = None) -> None:
        self.received: list[str] = []
        self.statuses = statuses or {}
        self.ae = AE(ae_title="PICKY")
        for uid in classes:
            self.ae.add_supported_context(uid)
        if allowed_calling is not None:
            self.ae.require_calling_aet = allowed_calling
        self.port = free_port()
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event) -> int:
        sop_class = str(event.request.AffectedSOPClassUID)
        status = self.statuses.get(sop_class, 0x0000)
        if status == 0x0000:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
        return status

    @property
    def destination(self) -> DestinationSettings:
        return DestinationSettings(ae_title="PICKY", host="127.0.0.1", port=self.port)

    def stop(self) -> None:
        self.server.shutdown()


def result_paths(settings, content: NodeContent) -> list[Path]:
    return sorted((Path(settings.data_dir) / "results" / str(content.run_id)).iterdir())


def test_per_instance_statuses_and_missing_context(settings, session_factory, content):
    kos, c3d = str(sop.KeyObjectSelectionDocumentStorage), str(sop.Comprehensive3DSRStorage)
    classes = [str(sop.SegmentationStorage), str(sop.ComprehensiveSRStorage), str(sop.EnhancedSRStorage), kos]
    peer = PickySCP(classes, statuses={kos: 0xA700})  # no Comprehensive 3D SR; out of resources for KOS
    try:
        report = deliver(result_paths(settings, content), peer.destination, "OMNICT")
        by_class = {r.sop_class_uid: r for r in report.results}
        assert by_class[c3d].status is None and "no accepted presentation context" in by_class[c3d].error
        assert by_class[kos].status == 0xA700 and by_class[kos].transient
        assert len(report.delivered) == 3 and sorted(peer.received) == sorted(r.sop_instance_uid
                                                                             for r in report.delivered)

        with pytest.raises(DeliveryError) as failure:
            deliver_run(session_factory, settings, content.run_id, peer.destination)
        assert not failure.value.transient  # the missing context needs an operator, retrying cannot help
        [row] = delivery_rows(session_factory)
        assert row.state == "failed" and "0xA700" in row.last_error and "no accepted presentation context" in row.last_error
    finally:
        peer.stop()


@sqlite_only
def test_rejected_association_is_permanent(settings, content):
    peer = PickySCP([str(sop.SegmentationStorage)], allowed_calling=["SOMEONE"])
    try:
        with pytest.raises(DeliveryError) as failure:
            deliver(result_paths(settings, content), peer.destination, "OMNICT")
        assert not failure.value.transient
        assert "rejected" in str(failure.value)
        assert peer.received == []
    finally:
        peer.stop()


# -- DICOM TLS to Orthanc ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> dict[str, Path]:
    """A CA, and a server and a client certificate signed by it (openssl)."""
    d = tmp_path_factory.mktemp("tls")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca", "-keyout", "ca.key",
        "-out", "ca.pem")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=127.0.0.1", "-keyout", f"{name}.key",
            "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days",
            "2", "-out", f"{name}.pem")
    return {name: d / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@sqlite_only
def test_tls_delivery_to_orthanc(settings, session_factory, content, orthanc, tls_files):
    orthanc.stop()
    config = json.loads(orthanc.config_path.read_text())
    config.update(DicomTlsEnabled=True, DicomTlsCertificate=str(tls_files["server.pem"]),
                  DicomTlsPrivateKey=str(tls_files["server.key"]),
                  DicomTlsTrustedCertificates=str(tls_files["ca.pem"]), DicomTlsRemoteCertificateRequired=True)
    orthanc.config_path.write_text(json.dumps(config))
    orthanc.start()

    plain = orthanc_destination(orthanc)
    with pytest.raises(DeliveryError) as failure:  # plain TCP to a TLS port: no association
        deliver(result_paths(settings, content)[:1], plain, "OMNICT", acse_timeout_s=5, network_timeout_s=5)
    assert failure.value.transient

    secure = orthanc_destination(orthanc, enabled=True, certificate=tls_files["client.pem"],
                                 private_key=tls_files["client.key"], ca_certificates=tls_files["ca.pem"])
    report = deliver_run(session_factory, settings, content.run_id, secure)
    assert report.ok and report.tls
    assert sorted(orthanc_sop_uids(orthanc)) == sorted(content.result_sop_uids)
