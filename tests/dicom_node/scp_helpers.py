"""Helpers for the storage SCP tests: small synthetic CT series and real DICOM senders (pynetdicom, dcmtk)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from tests.dicom_factory import ct_instance

# Patient data that must never show up in a log line.
PATIENT_NAME = "Secretname^Patientia"
PATIENT_ID = "PID-7781-SECRET"
PATIENT_BIRTH_DATE = "19410203"


def ct_slice(index: int, study_uid: str, series_uid: str, size: int = 64, sop_uid: str | None = None,
             seed: int = 0, unsigned: bool = False) -> Dataset:
    """One small CT slice with realistic headers (explicit VR little endian); signed 16-bit pixels, or
    unsigned 12-bit ones (some encoders, e.g. near-lossless JPEG-LS, take only those)."""
    ds = ct_instance(study_uid, series_uid, sop_uid)
    ds.FrameOfReferenceUID = generate_uid()
    ds.Modality = "CT"
    ds.StudyDate, ds.StudyTime = "20260301", "101500"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, PATIENT_BIRTH_DATE
    ds.AccessionNumber = "ACC1"
    ds.SeriesNumber, ds.InstanceNumber = 2, index + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [-100.0, -100.0, -index * 2.5]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 2.5
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    rng = np.random.default_rng(seed * 1000 + index)
    if unsigned:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = rng.integers(0, 4000, (size, size), dtype=np.uint16).tobytes()
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = rng.integers(-1000, 2000, (size, size), dtype=np.int16).tobytes()
    return ds


def write_series(folder: Path, count: int, size: int = 64, study_uid: str | None = None,
                 series_uid: str | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    paths = []
    for i in range(count):
        path = folder / f"ct{i:04d}.dcm"
        ct_slice(i, study_uid, series_uid, size).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def send_datasets(port: int, datasets: Sequence[Dataset], transfer_syntax: str | None = None,
                  ae_title: str = "TESTSCU", ssl_context=None, contexts: Sequence[str] | None = None) -> list[int]:
    """C-STORE each dataset over one association; return the statuses (-1 for no response)."""
    ae = AE(ae_title=ae_title)
    wanted = set(contexts or []) | {ds.SOPClassUID for ds in datasets}
    for uid in sorted(wanted):
        syntaxes = [transfer_syntax] if transfer_syntax else [ExplicitVRLittleEndian]
        ae.add_requested_context(uid, syntaxes)
    tls_args = (ssl_context, None) if ssl_context is not None else None
    assoc = ae.associate("127.0.0.1", port, ae_title="OMNICT", tls_args=tls_args)
    assert assoc.is_established, "association was not established"
    statuses = []
    try:
        for ds in datasets:
            rsp = assoc.send_c_store(ds)
            statuses.append(int(rsp.Status) if rsp and "Status" in rsp else -1)
    finally:
        assoc.release()
    return statuses


def send_files(port: int, paths: Sequence[Path], **kwargs) -> list[int]:
    return send_datasets(port, [dcmread(p) for p in paths], **kwargs)


def storescu(port: int, paths: Sequence[Path], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, TCP_NODELAY="1")
    cmd = ["storescu", "-v", "-aet", "STORESCU", "-aec", "OMNICT", *args, "127.0.0.1", str(port), *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
