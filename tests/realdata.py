"""Real CT data for tests, fetched once into the repository's ignored ``.cache/``.

``totalseg_example_dicom_dir()``: the 20-slice 512x512 JPEG 2000 lossless CT series (Siemens, de-identified:
SOPClassUID/SOPInstanceUID/SeriesInstanceUID blank) shipped in the TotalSegmentator 2.18.0 sdist (Apache-2.0),
downloaded with ``pip download`` from PyPI.  The test is skipped, with the pip error, only when the registry cannot
be reached.
"""

from __future__ import annotations

import fcntl
import subprocess
import sys
import tarfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO_ROOT / ".cache" / "totalseg"
TOTALSEG_VERSION = "2.18.0"
_SDIST_DIR = f"totalsegmentator-{TOTALSEG_VERSION}"


def totalseg_sdist_dir() -> Path:
    """The unpacked sdist folder (downloaded and unpacked on first use; safe with parallel test processes)."""
    root = CACHE_DIR / _SDIST_DIR
    marker = root / "tests" / "reference_files"
    if marker.is_dir():
        return root
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_dir():
            return root
        archive = CACHE_DIR / f"{_SDIST_DIR}.tar.gz"
        if not archive.exists():
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   f"totalsegmentator=={TOTALSEG_VERSION}", "-d", str(CACHE_DIR), "--quiet"]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0 or not archive.exists():
                import pytest

                pytest.skip(f"cannot download totalsegmentator=={TOTALSEG_VERSION} sdist from PyPI: "
                            f"{(proc.stderr or proc.stdout).strip()[-400:]}")
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(f"{_SDIST_DIR}/tests/")]
            tar.extractall(CACHE_DIR, members=members, filter="data")
    return root


def totalseg_example_dicom_dir() -> Path:
    """Folder with the 20 real CT slices (JPEG 2000 lossless, 2 mm apart, SliceThickness 3 mm)."""
    path = totalseg_sdist_dir() / "tests" / "reference_files" / "example_ct_dicom"
    assert path.is_dir(), f"{path} missing from the sdist"
    return path


def totalseg_example_nifti(name: str = "example_ct.nii.gz") -> Path:
    """Real CT NIfTI volumes of the sdist: example_ct.nii.gz (3 mm) or aorta_report/example_ct.nii.gz (1.5 mm)."""
    path = totalseg_sdist_dir() / "tests" / "reference_files" / name
    assert path.exists(), f"{path} missing from the sdist"
    return path


def fixed_totalseg_series(out: Path) -> list[Path]:
    """The sdist's real 20-slice CT with valid UIDs restored (de-identification blanked them; a PACS would refuse
    such files). Pixel data and transfer syntax (JPEG 2000 lossless) are untouched."""
    import pydicom
    from pydicom.uid import CTImageStorage, generate_uid

    source = totalseg_example_dicom_dir()
    out.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    written = []
    for path in sorted(source.iterdir()):
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID or generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        target = out / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(target)
        written.append(target)
    return written
