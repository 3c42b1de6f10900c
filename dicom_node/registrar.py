"""Database side of the SCP: group-committed instance registration, association audit rows, quarantine rows.

:class:`Registrar` group-commits instance registrations: a C-STORE handler calls :meth:`Registrar.register`,
and whichever handler finds no commit running commits everything queued (up to ``batch_max`` records) in ONE
transaction with :func:`db.ingest.register_instances`. Concurrent associations therefore share commits, while
each handler still answers only after its own record is committed: nothing is acknowledged that is not in the
database.

If a batch fails, its records are retried one by one so a single bad record cannot fail its neighbours; a record
that still fails raises :class:`RegistrationError` in its handler (which answers 0xA701). A database outage
therefore costs the sender a retry, never a silent loss.

Association audit and quarantine rows are written directly (once per association / per refused instance).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, select
from sqlalchemy.orm import Session, sessionmaker

from db.ingest import InstanceRecord, KnownSeries, RegistrationOutcome, register_instances
from db.models import Association, QuarantinedInstance, utcnow
from db.session import make_engine, session_scope
from omnict_node.logs import log_event

log = logging.getLogger("omnict.scp.registrar")


class RegistrationError(RuntimeError):
    """The instance could not be registered (database error, timeout, or registrar stopped)."""


@dataclass(eq=False)
class _Pending:
    record: InstanceRecord
    outcome: RegistrationOutcome | None = None
    error: Exception | None = None

    @property
    def done(self) -> bool:
        return self.outcome is not None or self.error is not None


class Registrar:
    """Group commit without a thread of its own: the caller that finds no commit running becomes the committer.

    Each C-STORE handler queues its record and takes the commit lock. Whoever holds it commits *everything*
    queued so far (up to ``batch_max``) in one transaction; the handlers that queued meanwhile then find their
    record already committed and return at once. One association therefore pays one commit per instance on its
    own thread (no hand-off to another thread, no contention for the GIL with it: measured under the ingest bench,
    the hand-off cost more than the SQL), while concurrent associations share commits.
    """

    def __init__(self, session_factory: sessionmaker[Session], batch_max: int = 256,
                 durable_commits: bool = True) -> None:
        """``durable_commits=False``: commit on an engine of our own whose commits are not flushed one by one
        (see :func:`db.session.make_engine`); every file is fsynced before its registration, and
        :mod:`dicom_node.reconcile` re-registers at start what a power cut rolled back."""
        engine: Engine | None = session_factory.kw.get("bind")
        if engine is None:
            raise ValueError("Registrar needs a session factory bound to an engine")
        self._own_engine: Engine | None = None
        if not durable_commits:
            self._own_engine = engine = make_engine(engine.url.render_as_string(hide_password=False),
                                                    durable_commits=False)
        self._engine = engine
        self._known_series: KnownSeries = {}
        self._connection: Connection | None = None  # used by the committer only (under _commit_lock)
        self._batch_max = max(1, batch_max)
        self._queue: list[_Pending] = []
        self._queue_lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._running = False
        self.batches_committed = 0  # for tests and the bench: evidence of group commits
        self.records_committed = 0

    def start(self) -> None:
        self._running = True

    def stop(self) -> None:
        """Refuse new registrations (those already taking place finish) and close our own engine, if any."""
        self._running = False
        with self._commit_lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
        if self._own_engine is not None:
            self._own_engine.dispose()

    def register(self, record: InstanceRecord, timeout: float = 60.0) -> RegistrationOutcome:
        """Register ``record`` and return once its transaction is committed. Raises :class:`RegistrationError`."""
        if not self._running:
            raise RegistrationError("registrar is not running")
        pending = _Pending(record)
        with self._queue_lock:
            self._queue.append(pending)
        deadline = time.monotonic() + timeout
        while not pending.done:
            if not self._commit_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                self._withdraw(pending)
                if pending.done:  # committed by the holder just as we gave up
                    break
                raise RegistrationError(f"no commit within {timeout:.0f} s (database busy)")
            try:
                if not pending.done:
                    with self._queue_lock:
                        batch, self._queue = self._queue[:self._batch_max], self._queue[self._batch_max:]
                    self._commit(batch)
            finally:
                self._commit_lock.release()
        if pending.error is not None:
            raise pending.error
        return pending.outcome  # type: ignore[return-value]

    def _withdraw(self, pending: _Pending) -> None:
        with self._queue_lock:
            if pending in self._queue:
                self._queue.remove(pending)

    def _commit(self, batch: list[_Pending]) -> None:
        records = [item.record for item in batch]
        try:
            outcomes = self._commit_records(records)
        except Exception as exc:  # noqa: BLE001 - any DB failure: isolate the bad record(s)
            if len(batch) == 1:
                log_event(log, "scp.registration.failed", logging.ERROR, sop_uid=records[0].sop_instance_uid,
                          error=type(exc).__name__)
                batch[0].error = RegistrationError(f"database error: {type(exc).__name__}: {exc}")
                return
            for one in batch:
                self._commit([one])
            return
        for item, outcome in zip(batch, outcomes):
            item.outcome = outcome

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """A transaction on a Core connection kept open across commits (cheaper than an ORM session and a pool
        checkout per commit, both measurable here); after any error the next commit starts a fresh connection."""
        if self._connection is None:
            self._connection = self._engine.connect()
        try:
            with self._connection.begin():
                yield self._connection
        except BaseException:
            self._connection.close()
            self._connection = None
            self._known_series.clear()  # the failed transaction may have created (now rolled back) rows
            raise

    def _commit_records(self, records: Sequence[InstanceRecord]) -> list[RegistrationOutcome]:
        with self._transaction() as target:
            outcomes = register_instances(target, records, self._known_series)
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
                      status_code: int | None, sop_instance_uid: str | None, study_instance_uid: str | None,
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
