"""Fault test: the SCP process is killed with SIGKILL in the middle of a series. Everything the sender saw
acknowledged must be on disk and in the database; a re-send after restart completes the series without duplicates."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import func, select

from db.models import Association, Instance, Series, Study
from tests.dicom_node.scp_helpers import PATIENT_ID, PATIENT_NAME, storescu, write_series
from tests.services import wait_for_port

REPO = Path(__file__).resolve().parents[2]
SERIES_SIZE = 40
KILL_AFTER = 12


def start_scp_process(settings, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, OMNICT_DATA_DIR=str(settings.data_dir), OMNICT_DATABASE__URL=str(settings.database.url),
               OMNICT_DICOM__PORT=str(settings.dicom.port),
               OMNICT_STORAGE__MIN_FREE_BYTES=str(settings.storage.min_free_bytes), OMNICT_LOG_LEVEL="DEBUG")
    env.pop("OMNICT_CONFIG", None)
    process = subprocess.Popen([sys.executable, "-m", "dicom_node.cli"], cwd=REPO, env=env,
                               stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)
    try:
        wait_for_port(settings.dicom.port, timeout=60)
    except TimeoutError:
        process.kill()
        raise AssertionError(f"SCP did not start:\n{log_path.read_text()}")
    return process


def send_until_killed(port: int, paths: list[Path], acknowledged: list[str], enough: threading.Event) -> None:
    """pynetdicom SCU: one C-STORE at a time, recording every SOP Instance UID answered 0x0000."""
    ae = AE(ae_title="FAULTSCU")
    ae.dimse_timeout = 5  # a killed peer answers nothing: do not wait pynetdicom's default 30 s for it
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="OMNICT")
    assert assoc.is_established
    try:
        for path in paths:
            ds = dcmread(path)
            try:
                rsp = assoc.send_c_store(ds)
            except Exception:  # noqa: BLE001 - the peer is gone
                break
            if rsp is not None and "Status" in rsp and rsp.Status == 0:
                acknowledged.append(ds.SOPInstanceUID)
                if len(acknowledged) == KILL_AFTER:
                    enough.set()
            if not assoc.is_established:
                break
    finally:
        enough.set()
        if assoc.is_established:
            assoc.abort()


def test_kill_9_mid_series_loses_nothing_acknowledged(settings, session_factory, tmp_path):
    paths = write_series(tmp_path / "series", SERIES_SIZE)
    log_path = tmp_path / "scp.log"
    process = start_scp_process(settings, log_path)
    acknowledged: list[str] = []
    enough = threading.Event()
    sender = threading.Thread(target=send_until_killed, args=(settings.dicom.port, paths, acknowledged, enough))
    sender.start()
    try:
        assert enough.wait(60)
        os.kill(process.pid, signal.SIGKILL)  # while the next C-STOREs are in flight
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
        sender.join(60)
    assert KILL_AFTER <= len(acknowledged) < SERIES_SIZE, len(acknowledged)

    by_uid = {dcmread(p).SOPInstanceUID: p for p in paths}
    root = Path(settings.storage.root)
    with session_factory() as session:
        registered = {i.sop_instance_uid: i for i in session.scalars(select(Instance))}
    for uid in acknowledged:
        assert uid in registered, f"acknowledged {uid} is not in the database"
        stored = root / registered[uid].path
        assert stored.is_file(), f"acknowledged {uid} is not on disk"
        assert dcmread(stored).PixelData == dcmread(by_uid[uid]).PixelData

    # Restart and re-send the whole series with dcmtk: complete, no duplicates, killed association closed.
    process = start_scp_process(settings, log_path)
    try:
        result = storescu(settings.dicom.port, paths)
        assert result.returncode == 0, result.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == SERIES_SIZE
        assert session.scalar(select(func.count(func.distinct(Instance.sop_instance_uid)))) == SERIES_SIZE
        assert session.scalar(select(Series.instance_count)) == SERIES_SIZE
        assert session.scalar(select(Study.instance_count)) == SERIES_SIZE
        outcomes = [a.outcome for a in session.scalars(select(Association).order_by(Association.id))]
    assert outcomes[0] == "aborted"  # the killed association, closed at restart
    assert outcomes[-1] == "released"
    assert len(list(root.rglob("*.dcm"))) == SERIES_SIZE
    assert not list(root.rglob(".tmp-*"))  # what the killed process was writing was cleaned up
    log_text = log_path.read_text()
    assert "scp.started" in log_text and "scp.association.stale_closed" in log_text
    assert PATIENT_NAME not in log_text and PATIENT_ID not in log_text
