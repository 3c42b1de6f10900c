"""Database side of the SCP: group-committed instance registration, association audit rows, quarantine rows.

:class:`Registrar` owns one writer thread. C-STORE handlers call :meth:`Registrar.register` (submit an
:class:`~db.ingest.InstanceRecord` and wait for its future); the thread takes whatever is queued, up to
``batch_max`` records, and commits them in ONE transaction with :func:`db.ingest.register_instances`. Concurrent
associations therefore share commits (one fsync of the database for many instances), while each handler still
answers only after its own record is committed: nothing is acknowledged that is not in the database.

If a batch fails, its records are retried one by one so a single bad record cannot fail its neighbours; a record
that still fails gets the exception on its future (the handler answers 0xA7xx). A database outage therefore
costs the sender a retry, never a silent loss.

Association audit and quarantine rows are written directly (once per association / per refused instance).
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.ingest import InstanceRecord, RegistrationOutcome, register_instances
from db.models import Association, QuarantinedInstance, utcnow
from db.session import session_scope
from omnict_node.logs import log_event

log = logging.getLogger("omnict.scp.registrar")
_STOP = object()


class RegistrationError(RuntimeError):
    """The instance could not be registered (database error or registrar stopped)."""


class Registrar:
    """Group-commit writer thread for instance registrations."""

    def __init__(self, session_factory: sessionmaker[Session], batch_max: int = 256) -> None:
        self._factory = session_factory
        self._batch_max = max(1, batch_max)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self.batches_committed = 0  # for tests and the bench: evidence of group commits
        self.records_committed = 0

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopped.clear()
        self._thread = threading.Thread(target=self._run, name="omnict-registrar", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Commit what is queued, then stop the thread."""
        if self._thread is None:
            return
        self._stopped.set()
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._thread = None

    def submit(self, record: InstanceRecord) -> Future:
        future: Future = Future()
        if self._stopped.is_set() or self._thread is None:
            future.set_exception(RegistrationError("registrar is not running"))
            return future
        self._queue.put((record, future))
        return future

    def register(self, record: InstanceRecord, timeout: float = 60.0) -> RegistrationOutcome:
        """Register ``record`` and wait until its transaction is committed. Raises on failure."""
        return self.submit(record).result(timeout)

    # -- writer thread -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                stopping = True
                batch = []
            else:
                batch = [first]
            while len(batch) < self._batch_max:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    continue
                batch.append(item)
            if batch:
                self._commit(batch)
        # Anything that raced in after the stop marker gets a clear failure rather than a hang.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                item[1].set_exception(RegistrationError("registrar stopped"))

    def _commit(self, batch: list[tuple[InstanceRecord, Future]]) -> None:
        records = [record for record, _ in batch]
        try:
            outcomes = self._commit_records(records)
        except Exception as exc:  # noqa: BLE001 - any DB failure: isolate the bad record(s)
            if len(batch) == 1:
                log_event(log, "scp.registration.failed", logging.ERROR, sop_uid=records[0].sop_instance_uid,
                          error=type(exc).__name__)
                batch[0][1].set_exception(RegistrationError(f"database error: {type(exc).__name__}: {exc}"))
                return
            for one in batch:
                self._commit([one])
            return
        for (_, future), outcome in zip(batch, outcomes):
            future.set_result(outcome)

    def _commit_records(self, records: Sequence[InstanceRecord]) -> list[RegistrationOutcome]:
        with session_scope(self._factory) as session:
            outcomes = register_instances(session, records)
        self.batches_committed += 1
        self.records_committed += len(records)
        return outcomes


# -- audit rows --------------------------------------------------------------------------------------------------

@dataclass
class AssociationFacts:
    """What we know about one association; written at start and updated at end."""

    calling_ae_title: str | None
    called_ae_title: str | None
    peer_address: str | None
    peer_port: int | None
    tls: bool
    started_at: dt.datetime
    id: int | None = None
    instances_stored: int = 0
    instances_failed: int = 0
    bytes_received: int = 0
    outcome: str = "open"
    detail: str | None = None


def open_association(factory: sessionmaker[Session], facts: AssociationFacts) -> int:
    """Insert the association's audit row (outcome ``open``, or ``rejected`` when already decided)."""
    with session_scope(factory) as session:
        row = Association(
            calling_ae_title=_ae(facts.calling_ae_title), called_ae_title=_ae(facts.called_ae_title),
            peer_address=facts.peer_address, peer_port=facts.peer_port, started_at=facts.started_at,
            outcome=facts.outcome, detail=facts.detail, tls=facts.tls,
        )
        if facts.outcome != "open":
            row.ended_at = facts.started_at
            row.duration_s = 0.0
        session.add(row)
        session.flush()
        facts.id = row.id
    return facts.id  # type: ignore[return-value]


def close_stale_associations(factory: sessionmaker[Session]) -> int:
    """Mark rows still ``open`` from a previous run of the node (it was killed mid-association) as aborted.

    Called once at SCP start, before any association is accepted: this node is the only writer of these rows."""
    with session_scope(factory) as session:
        stale = list(session.scalars(select(Association).where(Association.outcome == "open")))
        for row in stale:
            row.outcome = "aborted"
            row.detail = "node stopped before the association ended"
        return len(stale)


def close_association(factory: sessionmaker[Session], facts: AssociationFacts) -> None:
    """Write the association's final counters and outcome."""
    if facts.id is None:
        return
    ended = utcnow()
    with session_scope(factory) as session:
        row = session.get(Association, facts.id)
        if row is None:
            return
        row.ended_at = ended
        row.duration_s = (ended - facts.started_at).total_seconds()
        row.instances_stored = facts.instances_stored
        row.instances_failed = facts.instances_failed
        row.bytes_received = facts.bytes_received
        row.outcome = facts.outcome
        row.detail = facts.detail


def record_quarantine(factory: sessionmaker[Session], *, path: str, reason: str, detail: str | None,
                      status_code: int, sop_instance_uid: str | None, study_instance_uid: str | None,
                      association_id: int | None, size_bytes: int) -> int:
    """Insert a :class:`QuarantinedInstance` row. UIDs that are not valid UIDs are stored truncated to 64 chars."""
    with session_scope(factory) as session:
        row = QuarantinedInstance(
            path=path, reason=reason[:32], detail=detail, status_code=status_code,
            sop_instance_uid=_clip(sop_instance_uid), study_instance_uid=_clip(study_instance_uid),
            association_id=association_id, size_bytes=size_bytes,
        )
        session.add(row)
        session.flush()
        return row.id


def _ae(value: str | None) -> str | None:
    return value.strip()[:16] if value else value


def _clip(uid: str | None) -> str | None:
    return uid[:64] if uid else None
