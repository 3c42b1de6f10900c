"""Ingest benchmark: our storage SCP against dcmtk's storescp, same sender, same series, same run.

    .venv/bin/python bench/ingest.py [--rounds 7] [--slices 300] [--no-fast-path]

* The series (300 CT slices 512x512, int16, explicit VR little endian, realistic CT headers) is generated once
  with pydicom and cached under ``.cache/bench/ct<slices>/``.
* Each round runs, interleaved (this machine is shared and noisy): dcmtk ``storescu +sd`` -> dcmtk ``storescp``
  (writes to a temporary folder, no fsync), then ``storescu +sd`` -> our :class:`dicom_node.scp.StorageSCP`
  (durable writes: fsync of every file and directory, plus registration of every instance in a fresh SQLite
  database, the embedded default, committed before each success status). ``TCP_NODELAY=1`` for the dcmtk tools.
* Time = wall clock of the ``storescu`` process (association, all C-STOREs, release).
* During our rounds the node's completeness sweeper runs (series quiet 0.5 s, study quiet 1 s); after each round,
  every instance is checked on disk and in the database, and the study must have completed (and been dispatched)
  exactly once. The wait for the quiet periods is not timed.
* Prints each round, the medians, and as its LAST line ``ingest_ratio=<our MB/s / storescp MB/s>``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CACHE = REPO / ".cache" / "bench"
DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on port {port}")


def make_series(folder: Path, slices: int, size: int = 512) -> list[Path]:
    """A CT series with the headers a scanner writes (no real patient: a synthetic name/ID)."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    done = folder.parent / f"{folder.name}.complete"  # outside the folder: storescu +sd sends every file in it
    paths = sorted(folder.glob("ct*.dcm"))
    if done.exists() and len(paths) == slices:
        return paths
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(20261122)
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) ** 2 / (0.42 * size) ** 2 + (xx - size / 2) ** 2 / (0.47 * size) ** 2) < 1
    for i in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20261122"
        ds.StudyTime = ds.SeriesTime = "101500"
        ds.AccessionNumber, ds.Modality, ds.Manufacturer = "BENCH0001", "CT", "OmniCT bench"
        ds.ReferringPhysicianName, ds.StudyDescription = "", "CT CHEST ABDOMEN PELVIS W CONTRAST"
        ds.SeriesDescription = "Axial 1.0 soft tissue"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Bench^Synthetic", "BENCH-0", "19700101", "O"
        ds.BodyPartExamined, ds.SliceThickness, ds.KVP = "CHEST", 1.0, 120
        ds.DataCollectionDiameter, ds.ReconstructionDiameter = 500, 360
        ds.GantryDetectorTilt, ds.TableHeight, ds.RotationDirection = 0, 150, "CW"
        ds.ExposureTime, ds.XRayTubeCurrent, ds.Exposure = 500, 250, 125
        ds.ConvolutionKernel, ds.PatientPosition = "B30f", "FFS"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyID, ds.SeriesNumber, ds.AcquisitionNumber, ds.InstanceNumber = "1", 3, 1, i + 1
        ds.ImagePositionPatient = [-180.0, -180.0, -float(i)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = -float(i)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.PixelSpacing = [0.703125, 0.703125]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        noise = rng.integers(-40, 40, (size, size), dtype=np.int16)
        pixels = np.where(body, 1064, 24).astype(np.int16) + noise
        ds.PixelData = pixels.tobytes()
        ds.save_as(folder / f"ct{i:04d}.dcm", enforce_file_format=True)
    done.touch()
    return sorted(folder.glob("ct*.dcm"))


def time_storescu(port: int, called_ae: str, folder: Path) -> float:
    cmd = ["storescu", "+sd", "-aet", "BENCHSCU", "-aec", called_ae, "127.0.0.1", str(port), str(folder)]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=DCMTK_ENV, timeout=600)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed ({result.returncode}): {result.stderr[-2000:]}")
    return elapsed


def round_storescp(folder: Path, work: Path) -> float:
    out = work / "storescp-out"
    out.mkdir()
    port = free_port()
    server = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(out), str(port)], env=DCMTK_ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        return time_storescu(port, "STORESCP", folder)
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(out, ignore_errors=True)


def round_ours(folder: Path, work: Path, expected: int, fast_path: bool) -> tuple[float, str]:
    from sqlalchemy import func, select

    from db.migrate import upgrade
    from db.models import Instance, PipelineRun
    from db.session import make_engine, make_session_factory
    from db.states import RunState
    from dicom_node.completeness import CompletenessSweeper
    from dicom_node.scp import StorageSCP
    from omnict_node.config import load_settings

    data_dir = work / "omnict-data"
    port = free_port()
    settings = load_settings(data_dir=str(data_dir), dicom={"port": port, "ae_title": "OMNICT"},
                             storage={"min_free_bytes": 1024**3},
                             completeness={"series_quiet_s": 0.5, "study_quiet_s": 1.0, "sweep_interval_s": 0.2})
    upgrade(str(settings.database.url))  # a fresh database every round
    engine = make_engine(str(settings.database.url))
    factory = make_session_factory(engine)
    scp = StorageSCP(settings, factory, fast_path=fast_path)
    dispatched: list[int] = []  # the node's sweeper runs during the transfer, as under `serve`
    sweeper = CompletenessSweeper(settings.completeness, factory, dispatched.append)
    scp.start()
    sweeper.start()
    try:
        elapsed = time_storescu(scp.port, "OMNICT", folder)
        deadline = time.monotonic() + 30  # not timed: the quiet periods must pass
        while not dispatched and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(3 * settings.completeness.sweep_interval_s)  # would a second completion follow? (must not)
    finally:
        sweeper.stop()
        scp.stop()
    root = Path(settings.storage.root)
    on_disk = sum(1 for _ in root.rglob("*.dcm"))
    with factory() as session:
        in_db = session.scalar(select(func.count()).select_from(Instance))
        runs = session.execute(select(PipelineRun.state)).scalars().all()
    engine.dispose()
    shutil.rmtree(data_dir, ignore_errors=True)
    if on_disk != expected or in_db != expected:
        raise RuntimeError(f"verification failed: {on_disk} files on disk, {in_db} rows in the database, "
                           f"{expected} sent")
    if len(runs) != 1 or runs[0] is not RunState.COMPLETE or len(dispatched) != 1:
        raise RuntimeError(f"verification failed: runs {runs}, dispatched {len(dispatched)} times (want 1 complete)")
    return elapsed, f"verified {on_disk}/{expected} on disk, {in_db}/{expected} in the database " \
                    f"({scp.registrar.batches_committed} commits), study complete once"


def round_transport_only(folder: Path, work: Path, fast_path: bool) -> float:
    """DIAGNOSTIC, not part of the ratio: our SCP with its C-STORE work (checks, file, database) replaced by an
    immediate success, to show what the DICOM transport alone costs with and without dicom_node.fastpath."""
    from db.migrate import upgrade
    from db.session import make_engine, make_session_factory
    from dicom_node.scp import StorageSCP
    from omnict_node.config import load_settings

    settings = load_settings(data_dir=str(work / "omnict-data"), dicom={"port": free_port()},
                             storage={"min_free_bytes": 1024**3})
    upgrade(str(settings.database.url))
    engine = make_engine(str(settings.database.url))
    scp = StorageSCP(settings, make_session_factory(engine), fast_path=fast_path)
    scp._store = lambda event, view, facts: None  # type: ignore[method-assign]  # discard: diagnostic only
    scp.start()
    try:
        return time_storescu(scp.port, "OMNICT", folder)
    finally:
        scp.stop()
        engine.dispose()


def fsync_latency_ms(folder: Path, count: int = 20) -> tuple[float, float]:
    """Median latency of fsync(512 KiB file) and fsync(directory) here, right now: the floor under any durable
    SCP on this disk (ours pays one file fsync, then max(directory fsync, SQLite commit) per instance)."""
    probe = folder / "fsync-probe"
    probe.mkdir(parents=True, exist_ok=True)
    payload = os.urandom(512 * 1024)
    file_ms, dir_ms = [], []
    try:
        for i in range(count):
            start = time.perf_counter()
            fd = os.open(probe / f"p{i}", os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, payload)
            os.fsync(fd)
            os.close(fd)
            middle = time.perf_counter()
            dfd = os.open(probe, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(dfd)
            os.close(dfd)
            file_ms.append((middle - start) * 1000)
            dir_ms.append((time.perf_counter() - middle) * 1000)
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return statistics.median(file_ms), statistics.median(dir_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--no-fast-path", dest="fast_path", action="store_false")
    parser.add_argument("--transport-rounds", type=int, default=0,
                        help="extra DIAGNOSTIC rounds: transport only (nothing stored), fast path on/off vs storescp")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    import logging

    from omnict_node.logs import configure_logging

    configure_logging("WARNING")
    logging.getLogger("omnict.scp").setLevel(logging.ERROR)  # the empty allow-list warning, once per round

    folder = CACHE / f"ct{args.slices}"
    paths = make_series(folder, args.slices)
    total_mb = sum(p.stat().st_size for p in paths) / 1e6
    print(f"series: {len(paths)} slices, {total_mb:.1f} MB, {folder}")
    print(f"ours: fast_path={args.fast_path}, durable writes (fsync file + dir), SQLite registration")
    before = fsync_latency_ms(CACHE)
    print(f"disk now: fsync 512 KiB file {before[0]:.1f} ms, fsync directory {before[1]:.1f} ms (median of 20); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    dcmtk_s: list[float] = []
    ours_s: list[float] = []
    for number in range(1, args.rounds + 1):
        with tempfile.TemporaryDirectory(prefix="omnict-bench-", dir=CACHE) as tmp:
            reference = round_storescp(folder, Path(tmp))
        with tempfile.TemporaryDirectory(prefix="omnict-bench-", dir=CACHE) as tmp:
            ours, verdict = round_ours(folder, Path(tmp), len(paths), args.fast_path)
        dcmtk_s.append(reference)
        ours_s.append(ours)
        print(f"round {number}: storescp {reference:.3f} s = {total_mb / reference:.0f} MB/s | "
              f"ours {ours:.3f} s = {total_mb / ours:.0f} MB/s | ratio {reference / ours:.3f} | {verdict}",
              flush=True)
    if args.transport_rounds:
        diag: dict[str, list[float]] = {"storescp": [], "fast": [], "plain": []}
        for number in range(1, args.transport_rounds + 1):
            with tempfile.TemporaryDirectory(prefix="omnict-bench-", dir=CACHE) as tmp:
                diag["storescp"].append(round_storescp(folder, Path(tmp)))
            for name, fast in (("fast", True), ("plain", False)):
                with tempfile.TemporaryDirectory(prefix="omnict-bench-", dir=CACHE) as tmp:
                    diag[name].append(round_transport_only(folder, Path(tmp), fast))
            print(f"diagnostic transport-only round {number}: storescp {diag['storescp'][-1]:.3f} s | "
                  f"ours, nothing stored: fast path {diag['fast'][-1]:.3f} s, plain pynetdicom {diag['plain'][-1]:.3f} s",
                  flush=True)
        print("diagnostic transport-only medians (NOT the ratio): " + ", ".join(
            f"{name} {total_mb / statistics.median(values):.0f} MB/s" for name, values in diag.items()))
    after = fsync_latency_ms(CACHE)
    print(f"disk after: fsync file {after[0]:.1f} ms, directory {after[1]:.1f} ms; "
          f"load average {os.getloadavg()[0]:.1f}")
    reference_mbs = total_mb / statistics.median(dcmtk_s)
    ours_mbs = total_mb / statistics.median(ours_s)
    print(f"median storescp: {statistics.median(dcmtk_s):.3f} s = {reference_mbs:.1f} MB/s")
    print(f"median ours:     {statistics.median(ours_s):.3f} s = {ours_mbs:.1f} MB/s")
    print(f"ingest_ratio={ours_mbs / reference_mbs:.3f}")


if __name__ == "__main__":
    main()
