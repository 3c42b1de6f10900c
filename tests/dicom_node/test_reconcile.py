"""Start-up reconciliation: stored files whose registration a power cut rolled back are registered again.

A power cut cannot be staged in a test; what it leaves behind can: fsynced instance files in the store with no
database row (registration commits are not flushed one by one, see ``database.fsync_registrations``). The SCP must
register them when it starts, exactly as a C-STORE would, and move unreadable leftovers to quarantine.
"""

from __future__ import annotations

import os
import time
from io import BytesIO
from pathlib import Path

from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from db.models import Instance, PipelineRun, QuarantinedInstance, Series, Study
from db.states import RunState
from dicom_node.fastpath import part10_header
from dicom_node.reconcile import UNREADABLE_REASON, reconcile_storage
from dicom_node.scp import StorageSCP
from dicom_node.storage import InstanceStore
from tests.dicom_node.scp_helpers import ct_slice, send_datasets


def dataset_bytes(ds) -> bytes:
    buffer = BytesIO()
    dcmwrite(buffer, ds, little_endian=True, implicit_vr=False)  # the dataset alone, as a C-STORE carries it
    return buffer.getvalue()


def store_unregistered(store: InstanceStore, ds) -> Path:
    """Put an instance in the store the way the SCP does, without registering it (a rolled-back commit)."""
    header = part10_header(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, "PACS")
    stored = store.store(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, header, dataset_bytes(ds))
    return store.root / stored.relative_path


def test_scp_start_registers_stored_files_without_rows(settings, session_factory):
    study, series = generate_uid(), generate_uid()
    slices = [ct_slice(i, study, series) for i in range(3)]
    scp = StorageSCP(settings, session_factory)
    scp.start()
    try:
        assert send_datasets(scp.port, slices[:1]) == [0x0000]  # one instance arrives normally
    finally:
        scp.stop()
    lost = [store_unregistered(scp.store, ds) for ds in slices[1:]]
    garbage = scp.store.root / study / series / f"{generate_uid()}.dcm"
    garbage.write_bytes(lost[0].read_bytes()[:700])  # unsynced bytes under a final name: never acknowledged

    restarted = StorageSCP(settings, session_factory)
    restarted.start()
    restarted.stop()

    with session_factory() as session:
        rows = {row.sop_instance_uid: row for row in session.scalars(select(Instance))}
        assert set(rows) == {ds.SOPInstanceUID for ds in slices}
        assert rows[slices[2].SOPInstanceUID].path == f"{study}/{series}/{slices[2].SOPInstanceUID}.dcm"
        assert session.scalar(select(Series.instance_count).where(Series.series_instance_uid == series)) == 3
        study_row = session.scalars(select(Study).where(Study.study_instance_uid == study)).one()
        assert study_row.instance_count == 3
        runs = list(session.scalars(select(PipelineRun).where(PipelineRun.study_id == study_row.id)))
        assert [run.state for run in runs] == [RunState.RECEIVING]  # the study still completes, once
        quarantined = session.scalars(select(QuarantinedInstance)).one()
        assert quarantined.reason == UNREADABLE_REASON and quarantined.study_instance_uid == study
    assert not garbage.exists() and Path(quarantined.path).read_bytes() == lost[0].read_bytes()[:700]


def test_reconcile_lists_only_recently_changed_series(settings, session_factory):
    scp = StorageSCP(settings, session_factory)
    scp.start()
    study = generate_uid()
    old_series, new_series = generate_uid(), generate_uid()
    try:
        assert send_datasets(scp.port, [ct_slice(0, study, new_series)]) == [0x0000]
    finally:
        scp.stop()
    old = store_unregistered(scp.store, ct_slice(0, study, old_series))
    a_day_ago = time.time() - 86400
    os.utime(old.parent, (a_day_ago, a_day_ago))  # untouched since long before the newest registration

    report = reconcile_storage(scp.store, session_factory)

    assert report.series_listed == 1 and report.registered == 0  # the old folder was not even listed
    with session_factory() as session:
        assert session.scalar(select(Instance).where(Instance.sop_instance_uid == old.stem)) is None
