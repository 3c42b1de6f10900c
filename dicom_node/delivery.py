"""Sending a run's result objects (SEG, SR, KOS) to a configured destination as C-STORE SCU.

:func:`deliver` sends files over one association and reports a DIMSE status per file. It proposes, for every
file, its exact SOP Class with its own transfer syntax (plain ``storescu`` has no context for Comprehensive 3D SR;
we never guess), plus the other uncompressed little-endian syntax as an alternative (pynetdicom re-encodes between
the two). A compressed file whose syntax the peer does not accept is decompressed if the peer took an
uncompressed one. TLS is used when ``destination.tls.enabled`` (client context from :mod:`dicom_node.security`).

Failures of the connection are raised as :class:`DeliveryError` with ``transient`` telling the caller (the lead's
Celery task with its retry/backoff policy) whether retrying can help:

==================================================  ==========
connection refused / timed out, TLS/network error   transient
association rejected, result "rejected-transient"   transient
association rejected, result "rejected-permanent"   permanent
association aborted (A-ABORT, dropped connection)   transient
==================================================  ==========

Failure statuses of single instances do not raise from :func:`deliver`: they are in the report
(:attr:`DeliveryReport.failed`). :func:`deliver_run` turns them into a :class:`DeliveryError`: out-of-resources
(0xA7xx) and "no status" are transient, anything else (0xA9xx data set does not match, 0xCxxx cannot understand,
no presentation context) is permanent.

:func:`deliver_run` is the database side: one :class:`db.models.Delivery` row per run and destination (attempts,
last_error, state ``pending`` → ``delivered`` / ``failed``, delivered_at, sop_instance_uids). It is idempotent:
the result objects carry UIDs derived from the run (reports.RunIdentity), so a re-delivery replaces the objects in
the PACS under the same UIDs instead of duplicating them, and a delivery already done is skipped unless forced.

Logs carry UIDs, AE titles, addresses and statuses only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.presentation import PresentationContext
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Delivery, ResultObject, utcnow
from dicom_node import fastpath
from dicom_node.security import client_ssl_context
from omnict_node.config import DestinationSettings, DicomSettings, Settings
from omnict_node.logs import log_event

log = logging.getLogger("omnict.delivery")

_UNCOMPRESSED = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))
MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: at most 128 presentation contexts per association
NO_RESPONSE = -1  # status recorded when no C-STORE response came back


class DeliveryError(Exception):
    """Delivery to a destination failed. ``transient``: the same request may succeed later (retry it)."""

    def __init__(self, message: str, transient: bool, report: DeliveryReport | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.report = report


@dataclass(frozen=True)
class InstanceResult:
    """What happened to one file."""

    path: Path
    sop_class_uid: str | None
    sop_instance_uid: str | None
    transfer_syntax_uid: str | None
    status: int | None  # DIMSE status of the C-STORE response; None: not sent (see ``error``)
    error: str | None = None

    @property
    def delivered(self) -> bool:
        # Success, or a warning (0xB000 coercion, 0xB006 element discarded, 0xB007 does not match SOP class):
        # the receiver stored the instance.
        return self.status is not None and (self.status == 0x0000 or self.status & 0xF000 == 0xB000)

    @property
    def transient(self) -> bool:
        """A failure that a later retry may cure: out of resources (0xA7xx) or no response at all."""
        return self.status is not None and (self.status & 0xFF00 == 0xA700 or self.status == NO_RESPONSE)


@dataclass
class DeliveryReport:
    destination: str  # AE@host:port
    results: list[InstanceResult] = field(default_factory=list)
    tls: bool = False
    duration_s: float = 0.0
    skipped: bool = False  # deliver_run: already delivered, nothing sent

    @property
    def delivered(self) -> list[InstanceResult]:
        return [r for r in self.results if r.delivered]

    @property
    def failed(self) -> list[InstanceResult]:
        return [r for r in self.results if not r.delivered]

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        """One line for ``Delivery.last_error`` and logs (UIDs and statuses only)."""
        if self.ok:
            return f"{len(self.delivered)} delivered to {self.destination}"
        parts = [f"{r.sop_instance_uid or r.path.name}: "
                 + (f"0x{r.status:04X}" if r.status not in (None, NO_RESPONSE) else (r.error or "no response"))
                 for r in self.failed[:5]]
        more = f" (+{len(self.failed) - 5} more)" if len(self.failed) > 5 else ""
        return f"{len(self.failed)} of {len(self.results)} failed at {self.destination}: " + "; ".join(parts) + more


def destination_label(destination: DestinationSettings) -> str:
    return f"{destination.ae_title}@{destination.host}:{destination.port}"


@dataclass(frozen=True)
class _FileFacts:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def _file_facts(path: Path) -> _FileFacts:
    meta = read_file_meta_info(str(path))
    return _FileFacts(path, str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
                      str(meta.TransferSyntaxUID))


def requested_contexts(facts: Sequence[_FileFacts]) -> list[PresentationContext]:
    """One context per (SOP class, transfer syntax) of the files; an uncompressed syntax also offers the other
    uncompressed one, a compressed one gets an extra uncompressed context as fallback (decompressed on send)."""
    contexts: list[PresentationContext] = []
    seen: set[tuple[str, tuple[str, ...]]] = set()
    for fact in facts:
        if fact.transfer_syntax_uid in _UNCOMPRESSED:
            wanted = [(fact.sop_class_uid, tuple(dict.fromkeys([fact.transfer_syntax_uid, *_UNCOMPRESSED])))]
        else:
            wanted = [(fact.sop_class_uid, (fact.transfer_syntax_uid,)), (fact.sop_class_uid, _UNCOMPRESSED)]
        for key in wanted:
            if key not in seen:
                seen.add(key)
                contexts.append(build_context(key[0], list(key[1])))
    if len(contexts) > MAX_CONTEXTS:
        raise DeliveryError(f"{len(contexts)} presentation contexts needed, at most {MAX_CONTEXTS} allowed: "
                            "split the files over several deliveries", transient=False)
    return contexts


def deliver(files: Sequence[Path], destination: DestinationSettings, calling_ae: str = "OMNICT", *,
            connect_timeout_s: float = 10.0, acse_timeout_s: float = 30.0, dimse_timeout_s: float = 60.0,
            network_timeout_s: float = 60.0, max_pdu_bytes: int = 131072) -> DeliveryReport:
    """C-STORE ``files`` to ``destination`` over one association (TLS if ``destination.tls.enabled``).

    Returns a report with one :class:`InstanceResult` per file, in order. Raises :class:`DeliveryError` when the
    association cannot be established or is lost (``report`` then holds what was sent before).
    """
    fastpath.quiet_pynetdicom()
    label = destination_label(destination)
    started = time.monotonic()
    report = DeliveryReport(label, tls=destination.tls.enabled)
    facts: list[_FileFacts] = []
    for path in map(Path, files):
        try:
            facts.append(_file_facts(path))
        except Exception as exc:  # noqa: BLE001 - an unreadable file fails alone, the others still go
            report.results.append(InstanceResult(path, None, None, None, None, f"unreadable: {type(exc).__name__}"))
    if not facts:
        report.duration_s = time.monotonic() - started
        return report

    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = connect_timeout_s
    ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = acse_timeout_s, dimse_timeout_s, network_timeout_s
    ae.maximum_pdu_size = max_pdu_bytes
    ae.implementation_class_uid = fastpath.IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = fastpath.IMPLEMENTATION_VERSION_NAME
    contexts = requested_contexts(facts)
    try:
        ssl_context = client_ssl_context(destination.tls)
    except (OSError, ValueError) as exc:  # unreadable certificate/key files: configuration, not the network
        raise DeliveryError(f"TLS configuration for {label} unusable: {type(exc).__name__}: {exc}",
                            transient=False, report=report) from None
    tls_args = (ssl_context, None) if ssl_context is not None else None
    assoc = ae.associate(destination.host, destination.port, contexts=contexts, ae_title=destination.ae_title,
                         tls_args=tls_args)
    if not assoc.is_established:
        raise _association_failure(assoc, label, report)
    try:
        accepted = _accepted(assoc)
        for fact in facts:
            result = _send_one(assoc, fact, accepted)
            report.results.append(result)
            if result.status == NO_RESPONSE and not assoc.is_established:
                raise DeliveryError(f"association with {label} lost after {len(report.delivered)} instance(s)",
                                    transient=True, report=report)
    finally:
        if assoc.is_established:
            assoc.release()
        report.duration_s = time.monotonic() - started
    log_event(log, "delivery.sent", destination=label, tls=report.tls, delivered=len(report.delivered),
              failed=len(report.failed), duration_s=report.duration_s)
    return report


def _association_failure(assoc, label: str, report: DeliveryReport) -> DeliveryError:
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        result, source, reason = (getattr(primitive, name, None) for name in ("result", "result_source",
                                                                              "diagnostic"))
        transient = result == 0x02  # rejected-transient (PS3.8 9.3.4)
        log_event(log, "delivery.rejected", logging.WARNING, destination=label, result=result, source=source,
                  diagnostic=reason, transient=transient)
        return DeliveryError(f"association rejected by {label} (result={result}, source={source}, "
                             f"diagnostic={reason})", transient=transient, report=report)
    # Connection refused, timed out, TLS handshake failed, or the peer aborted during negotiation.
    log_event(log, "delivery.unreachable", logging.WARNING, destination=label, aborted=assoc.is_aborted)
    return DeliveryError(f"could not associate with {label} (connection refused, timed out or aborted)",
                         transient=True, report=report)


def _accepted(assoc) -> dict[str, set[str]]:
    accepted: dict[str, set[str]] = {}
    for context in assoc.accepted_contexts:
        accepted.setdefault(str(context.abstract_syntax), set()).add(str(context.transfer_syntax[0]))
    return accepted


def _send_one(assoc, fact: _FileFacts, accepted: dict[str, set[str]]) -> InstanceResult:
    def result(status: int | None, error: str | None = None) -> InstanceResult:
        return InstanceResult(fact.path, fact.sop_class_uid, fact.sop_instance_uid, fact.transfer_syntax_uid,
                              status, error)

    syntaxes = accepted.get(fact.sop_class_uid)
    if not syntaxes:
        log_event(log, "delivery.no_context", logging.WARNING, sop_uid=fact.sop_instance_uid,
                  sop_class=fact.sop_class_uid)
        return result(None, "no accepted presentation context for its SOP class")
    try:
        dataset = dcmread(str(fact.path))
        if fact.transfer_syntax_uid not in syntaxes and UID(fact.transfer_syntax_uid).is_compressed:
            if not syntaxes & set(_UNCOMPRESSED):
                return result(None, "transfer syntax not accepted")
            dataset.decompress()
    except Exception as exc:  # noqa: BLE001 - this file fails, the association goes on
        return result(None, f"unreadable: {type(exc).__name__}")
    try:
        response = assoc.send_c_store(dataset)
    except Exception as exc:  # noqa: BLE001 - pynetdicom raises on encoding/context problems
        return result(None, f"not sent: {type(exc).__name__}")
    if response is None or "Status" not in response:
        return result(NO_RESPONSE, "no response (association aborted or DIMSE timeout)")
    status = int(response.Status)
    if status != 0x0000:
        log_event(log, "delivery.instance.status", logging.WARNING, sop_uid=fact.sop_instance_uid,
                  status=f"0x{status:04X}")
    return result(status)


def deliver_with_settings(files: Sequence[Path], destination: DestinationSettings, dicom: DicomSettings,
                          calling_ae: str | None = None) -> DeliveryReport:
    """:func:`deliver` as the node calls it: its AE title (unless ``calling_ae``) and its DICOM timeouts."""
    return deliver(files, destination, calling_ae or dicom.ae_title, acse_timeout_s=dicom.acse_timeout_s,
                   dimse_timeout_s=dicom.dimse_timeout_s, network_timeout_s=dicom.network_timeout_s)


# -- database side -------------------------------------------------------------------------------------------------


def result_files(session: Session, settings: Settings, run_id: int) -> list[tuple[ResultObject, Path]]:
    """The run's result objects with their absolute paths, in the order they were generated (SEG before the SR
    that references it, KOS last)."""
    rows = session.scalars(select(ResultObject).where(ResultObject.run_id == run_id).order_by(ResultObject.id)).all()
    return [(row, Path(settings.data_dir) / row.path) for row in rows]


def deliver_run(session_factory: sessionmaker[Session], settings: Settings, run_id: int,
                destination: DestinationSettings, *, calling_ae: str | None = None, force: bool = False,
                final_attempt: bool = False, delivered_before: Collection[str] = ()) -> DeliveryReport:
    """Deliver run ``run_id``'s result objects to ``destination`` and record it in its :class:`Delivery` row.

    The row (one per run and destination) gets ``attempts += 1`` and ``state = 'pending'`` before anything is sent,
    then ``delivered`` (with ``delivered_at`` and ``sop_instance_uids``) or, on failure, ``last_error`` and
    ``failed`` when the failure is permanent or ``final_attempt`` is set, else it stays ``pending`` for the caller's
    retry. Failures raise :class:`DeliveryError` (after the row is committed).

    A run already delivered to this destination with the same objects is not sent again unless ``force``
    (a re-delivery sends the same SOP Instance UIDs, so the PACS replaces rather than duplicates them).

    ``delivered_before``: SOP Instance UIDs of the run that reached this destination already (the measurement objects
    sent while the model ran); on the run's first delivery attempt to it they are not sent again, on any later attempt
    (a retry, an operator's re-delivery) everything is sent.
    """
    label = destination_label(destination)
    dicom = settings.dicom
    with session_factory.begin() as session:
        files = result_files(session, settings, run_id)
        uids = [row.sop_instance_uid for row, _ in files]
        row = session.scalars(select(Delivery).where(Delivery.run_id == run_id, Delivery.destination == label)
                              .order_by(Delivery.id)).first()
        first_attempt = row is None or row.attempts == 0
        if row is None:
            row = Delivery(run_id=run_id, destination=label, state="pending", attempts=0)
            session.add(row)
        elif row.state == "delivered" and not force and sorted(row.sop_instance_uids or []) == sorted(uids):
            log_event(log, "delivery.skipped", run_id=run_id, destination=label, reason="already delivered")
            return DeliveryReport(label, tls=destination.tls.enabled, skipped=True)
        row.attempts += 1
        row.state = "pending"
        session.flush()
        delivery_id = row.id
    if not files:
        error = DeliveryError(f"run {run_id} has no result objects to deliver", transient=False)
        _record_failure(session_factory, delivery_id, error, final_attempt)
        raise error
    already = set(delivered_before) if first_attempt and not force else set()
    sent_before = [obj.sop_instance_uid for obj, _ in files if obj.sop_instance_uid in already]
    log_event(log, "delivery.start", run_id=run_id, delivery_id=delivery_id, destination=label, objects=len(files),
              delivered_before=len(sent_before))
    try:
        report = deliver_with_settings([path for obj, path in files if obj.sop_instance_uid not in already],
                                       destination, settings.dicom, calling_ae)
    except DeliveryError as error:
        _record_failure(session_factory, delivery_id, error, final_attempt)
        raise
    if not report.ok:
        transient = all(r.transient for r in report.failed)
        error = DeliveryError(report.summary(), transient=transient, report=report)
        _record_failure(session_factory, delivery_id, error, final_attempt)
        raise error
    with session_factory.begin() as session:
        row = session.get(Delivery, delivery_id)
        row.state, row.delivered_at, row.last_error = "delivered", utcnow(), None
        row.sop_instance_uids = sent_before + [r.sop_instance_uid for r in report.results]
    log_event(log, "delivery.done", run_id=run_id, delivery_id=delivery_id, destination=label,
              objects=len(report.results), duration_s=report.duration_s)
    return report


def _record_failure(session_factory: sessionmaker[Session], delivery_id: int, error: DeliveryError,
                    final_attempt: bool) -> None:
    failed = not error.transient or final_attempt
    with session_factory.begin() as session:
        row = session.get(Delivery, delivery_id)
        row.last_error = str(error)[:2000]
        row.state = "failed" if failed else "pending"
        if error.report is not None and error.report.delivered:
            row.sop_instance_uids = [r.sop_instance_uid for r in error.report.delivered]
    log_event(log, "delivery.failed", logging.WARNING if not failed else logging.ERROR, delivery_id=delivery_id,
              transient=error.transient, state="failed" if failed else "pending")
