"""At SCP start: register stored instance files that have no database row.

Why this exists: the SCP answers success only after the instance file is fsynced and its registration is
committed. The registration commit is not flushed to disk on its own (``database.fsync_registrations`` off, the
default: one fsync less per instance), so a power cut or kernel crash can roll back the last few registrations
while their files, fsynced, survive. The storage folder is then the write-ahead log: this module finds those
files and registers them again (same rows, timers and pipeline-run rules as a C-STORE), so an acknowledged
instance is never lost. A crash of the node process alone loses no commit at all.

Cost is bounded: only series folders modified since the newest registration (minus :data:`RECONCILE_MARGIN`)
are listed; a fresh database (no registration at all) lists everything.

A file found without a row whose content does not parse (the power cut hit a store that was never acknowledged
and left unsynced bytes under the final name) is moved to quarantine with reason ``unregistered_unreadable``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.ingest import InstanceRecord, register_instances
from db.models import Instance
from db.session import session_scope
from dicom_node.fastpath import UndecodableDataset, scan_dataset, uid_text
from dicom_node.header import (
    META_SOURCE_AE_TITLE,
    META_TRANSFER_SYNTAX_UID,
    META_WANTED_TAGS,
    WANTED_TAGS,
    dataset_facts,
    short_text,
)
from dicom_node.registrar import record_quarantine
from dicom_node.storage import InstanceStore, dataset_offset, uid_problem
from omnict_node.logs import log_event

log = logging.getLogger("omnict.scp.reconcile")

# Series folders touched this long before the newest registration are listed too: covers clock steps and the
# commits a power cut can roll back (seconds' worth) with a wide margin.
RECONCILE_MARGIN = dt.timedelta(minutes=10)
_QUERY_CHUNK = 500
UNREADABLE_REASON = "unregistered_unreadable"


@dataclass
class ReconcileReport:
    series_listed: int = 0
    registered: int = 0
    quarantined: int = 0


def reconcile_storage(store: InstanceStore, session_factory: sessionmaker[Session],
                      margin: dt.timedelta = RECONCILE_MARGIN) -> ReconcileReport:
    """Register every recently stored file without an ``instances`` row; quarantine unreadable ones."""
    report = ReconcileReport()
    cutoff = _listing_cutoff(session_factory, margin)
    for series_dir in _series_dirs_since(store.root, cutoff):
        report.series_listed += 1
        on_disk = {entry.name[:-4]: Path(entry.path) for entry in os.scandir(series_dir)
                   if entry.name.endswith(".dcm") and not entry.name.startswith(".")}
        missing = sorted(set(on_disk) - _registered(session_factory, list(on_disk)))
        records: list[InstanceRecord] = []
        for sop_uid in missing:
            raw = on_disk[sop_uid].read_bytes()
            record = _record_for_file(store.root, on_disk[sop_uid], sop_uid, raw)
            if record is None:
                _quarantine_unreadable(store, session_factory, on_disk[sop_uid], sop_uid, raw)
                report.quarantined += 1
            else:
                records.append(record)
        if records:
            with session_scope(session_factory) as session:
                register_instances(session, records)
            report.registered += len(records)
            log_event(log, "scp.reconcile.registered", study_uid=records[0].study_instance_uid,
                      series_uid=records[0].series_instance_uid, count=len(records))
    return report


def _listing_cutoff(session_factory: sessionmaker[Session], margin: dt.timedelta) -> float | None:
    """POSIX time before which series folders need no listing; ``None``: list all (no registration yet)."""
    with session_factory() as session:
        newest = session.scalar(select(func.max(Instance.received_at)))
    if newest is None:
        return None
    if newest.tzinfo is None:  # SQLite returns naive datetimes; they are stored as UTC
        newest = newest.replace(tzinfo=dt.timezone.utc)
    return (newest - margin).timestamp()


def _series_dirs_since(root: Path, cutoff: float | None) -> Iterator[Path]:
    """``<root>/<study UID>/<series UID>`` folders modified at or after ``cutoff`` (all when ``None``)."""
    for study in _uid_dirs(root):
        for series in _uid_dirs(study):
            if cutoff is None or series.stat().st_mtime >= cutoff:
                yield series


def _uid_dirs(folder: Path) -> Iterator[Path]:
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False) and uid_problem(entry.name) is None:
            yield Path(entry.path)


def _registered(session_factory: sessionmaker[Session], sop_uids: list[str]) -> set[str]:
    found: set[str] = set()
    with session_factory() as session:
        for start in range(0, len(sop_uids), _QUERY_CHUNK):
            chunk = sop_uids[start:start + _QUERY_CHUNK]
            found.update(session.scalars(select(Instance.sop_instance_uid)
                                         .where(Instance.sop_instance_uid.in_(chunk))))
    return found


def _record_for_file(root: Path, path: Path, sop_uid: str, raw: bytes) -> InstanceRecord | None:
    """The registration record of the stored Part 10 file ``path`` (content ``raw``), or ``None`` if it does not
    parse or does not belong where it lies (its UIDs must match its folder and file names)."""
    offset = dataset_offset(raw[:144])
    if offset is None or offset > len(raw):
        return None
    try:
        meta = scan_dataset(memoryview(raw)[132:offset], False, False, META_WANTED_TAGS)
        transfer_syntax = uid_text(meta.get(META_TRANSFER_SYNTAX_UID))
        values = scan_dataset(memoryview(raw)[offset:], transfer_syntax == ImplicitVRLittleEndian,
                              transfer_syntax == DeflatedExplicitVRLittleEndian, WANTED_TAGS)
    except UndecodableDataset:
        return None
    facts = dataset_facts(values)
    series_dir = path.parent
    if (transfer_syntax is None or facts.sop_class_uid is None or facts.sop_instance_uid != sop_uid
            or facts.series_uid != series_dir.name or facts.study_uid != series_dir.parent.name):
        return None
    return facts.record(transfer_syntax_uid=transfer_syntax, path=path.relative_to(root).as_posix(),
                        size_bytes=len(raw), calling_ae_title=short_text(meta.get(META_SOURCE_AE_TITLE), 16),
                        association_id=None, replaces_existing=False)


def _quarantine_unreadable(store: InstanceStore, session_factory: sessionmaker[Session], path: Path,
                           sop_uid: str, raw: bytes) -> None:
    kept = store.quarantine([raw], UNREADABLE_REASON)
    record_quarantine(session_factory, path=str(kept), reason=UNREADABLE_REASON,
                      detail=f"found at {path.relative_to(store.root).as_posix()} without a database row",
                      status_code=None, sop_instance_uid=sop_uid, study_instance_uid=path.parent.parent.name,
                      association_id=None, size_bytes=len(raw))
    path.unlink()
    log_event(log, "scp.reconcile.quarantined", logging.WARNING, sop_uid=sop_uid, path=kept)
