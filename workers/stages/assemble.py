"""Stage 1, assemble: choose the CT series to analyse and build its HU volume.

Series choice follows MONAI Deploy's selector rules (CT, not LOCALIZER, axial, most slices; enhanced multi-frame
handled) — implemented in ``omnict_core.io.dicom_series`` and shared with the model's preprocessing. The volume
(sorted along the slice normal by ImagePositionPatient, rescaled to HU, with spacing and orientation) is saved to
the run's work folder; gaps, duplicate positions and mixed series are reported in the run's result.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import select

from db.models import Instance, Series, Study
from db.session import session_scope
from omnict_node.logs import log_event
from workers.pipeline import PermanentStageError, StageContext, cyclic_gc_paused

log = logging.getLogger("omnict.stage.assemble")

VOLUME_FILE = "volume.npy"  # float32 HU (z, y, x): a plain .npy is written and read at disk speed (no zip, no CRC)
GEOMETRY_FILE = "volume_geometry.npz"  # spacing, affine, direction


def study_files_by_series(context: StageContext) -> dict[str, list[Path]]:
    """Absolute paths of every stored instance of the run's study, grouped by SeriesInstanceUID."""
    root = Path(context.settings.storage.root)
    with session_scope(context.session_factory) as session:
        rows = session.execute(
            select(Series.series_instance_uid, Instance.path)
            .join(Instance, Instance.series_id == Series.id)
            .join(Study, Study.id == Series.study_id)
            .where(Study.study_instance_uid == context.study_instance_uid)
        ).all()
    grouped: dict[str, list[Path]] = defaultdict(list)
    for series_uid, path in rows:
        grouped[series_uid].append(root / path)
    return dict(grouped)


@dataclass(frozen=True)
class AssembledVolume:
    hu: np.ndarray  # (z, y, x) HU (int16 when they are integers, else float32), slices ascending along the normal
    spacing: tuple[float, float, float]  # (dz, dy, dx) mm
    affine: np.ndarray  # 4x4, (i, j, k, 1) -> patient LPS mm
    direction: np.ndarray  # 3x3, columns: LPS directions of the x, y and slice indices


# The analysed series' headers, kept by the worker process for the steps after assemble (the side tasks and the report
# stage read them again otherwise: 0.12-0.19 s for 300 files alone, 0.35-0.52 s beside inference).
_SOURCE_HEADERS = "source-headers"


def file_version(path: Path) -> tuple[int, int, int]:
    """Which version of a file this is (inode, size, mtime): writers here replace a file by renaming a new one over
    it, so a rewritten file is a new version."""
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _file_signature(paths: list[Path]) -> tuple:
    """Which files, and which version of each: a re-sent instance is a new file (the SCP writes and renames)."""
    return tuple(sorted((str(path), *file_version(path)) for path in paths))


def _remember_source_headers(context: StageContext, paths: list[Path], instances: list) -> None:
    """Keep the headers the series selection read, when they are those of every file of the series (in the order
    of ``paths``, as :func:`source_series` reads them)."""
    from reports import ReportInputError, SourceSeries

    context.resources.cache.pop(_SOURCE_HEADERS, None)
    headers = {str(i.path): i.dataset for i in instances if i.path is not None and i.dataset is not None}
    if not paths or len(headers) != len(paths) or any(str(p) not in headers for p in paths):
        return
    try:
        series = SourceSeries.from_datasets(headers[str(p)] for p in paths)
    except ReportInputError:  # the stage that needs them reads them again and reports the problem
        return
    context.resources.cache[_SOURCE_HEADERS] = (_file_signature(paths), series)


def source_series(context: StageContext):
    """The analysed series' headers as a ``reports.SourceSeries`` (the source of every result object's patient,
    study and references): this worker's copy when it read these very files (the assemble stage, or an earlier
    stage of the run, on the same process), else read from the files."""
    from reports import SourceSeries

    paths = study_files_by_series(context)[context.results["assemble"]["series_instance_uid"]]
    signature = _file_signature(paths)
    cached = context.resources.cache.get(_SOURCE_HEADERS)
    if cached is not None and cached[0] == signature:
        return cached[1]
    series = SourceSeries.from_files(paths)
    context.resources.cache[_SOURCE_HEADERS] = (signature, series)
    return series


def load_assembled_volume(context: StageContext) -> AssembledVolume:
    """The volume the assemble stage wrote for this run."""
    with np.load(context.work_dir / GEOMETRY_FILE) as data:
        spacing, affine, direction = tuple(float(v) for v in data["spacing"]), data["affine"], data["direction"]
    return AssembledVolume(np.load(context.work_dir / VOLUME_FILE), spacing, affine, direction)


def replace_atomically(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        write(fh)
    tmp.replace(path)  # idempotent: a retried stage overwrites the same file


def _zero_filled_npy(path: Path, shape: tuple[int, ...], dtype) -> np.memmap:
    """A new .npy file of zeros, mapped for writing. The zeros are written first, not left sparse: the kernel then
    fills the page cache in bulk, where writing into a sparse mapping faults its pages in one by one (0.3-0.5 s for
    a 300-slice series on our machines, against 0.1 s)."""
    sparse = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)  # the header, a sparse body
    offset, remaining = sparse.offset, sparse.nbytes
    del sparse
    zeros = bytes(1 << 20)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        while remaining:
            remaining -= fh.write(zeros[:remaining])
    return np.lib.format.open_memmap(path, mode="r+")


def assemble(context: StageContext) -> dict:
    from omnict_core.io.dicom_series import DicomSeriesError, load_volume, select_ct_series

    files = study_files_by_series(context)
    if not files:
        raise PermanentStageError("the study has no stored instances")
    with cyclic_gc_paused():  # a header dataset per instance
        choice = select_ct_series(files)
    if not choice.ok:
        raise PermanentStageError(f"no CT series to analyse: {choice.reason}")
    out = context.work_dir / VOLUME_FILE
    tmp = out.with_name(out.name + ".tmp")
    mapped: list[np.memmap] = []

    def allocate(shape: tuple[int, int, int], dtype) -> np.ndarray:
        # The slices are decoded straight into the .npy file (page cache): no second 300 MB array, no copy to write.
        mapped[:] = [_zero_filled_npy(tmp, shape, dtype)]
        return mapped[0]

    try:
        # int16 when the HU values are integers (nearly every CT): half the bytes to write here and to read in the
        # segment and infer stages, the same values
        volume = load_volume(choice.instances, allocate=allocate, integer_when_exact=True)
    except DicomSeriesError as exc:
        raise PermanentStageError(f"cannot build a volume from series {choice.series_uid}: {exc}") from exc

    replace_atomically(context.work_dir / GEOMETRY_FILE, lambda fh: np.savez(
        fh, affine=volume.affine, direction=volume.direction, spacing=np.asarray(volume.spacing)))
    if mapped and volume.hu is mapped[0]:
        # No msync: a shared mapping writes into the page cache that every reader of the file reads (the np.save it
        # replaces did not fsync either); it would write 300 MB to disk before the stage could end.
        del mapped[0]
        tmp.replace(out)  # idempotent: a retried stage overwrites the same file
    else:  # resampled onto a new grid: the decoded slices were an intermediate
        mapped.clear()
        replace_atomically(out, lambda fh: np.save(fh, volume.hu.astype(np.float32, copy=False)))
    _remember_source_headers(context, files.get(choice.series_uid, []), choice.instances)
    problems = [{"kind": p.kind, "detail": p.detail, "count": p.count} for p in volume.report.problems]
    log_event(log, "pipeline.assemble.volume", run_id=context.run_id, series_uid=choice.series_uid,
              shape="x".join(map(str, volume.hu.shape)), problems=len(problems))
    return {
        "series_instance_uid": choice.series_uid,
        "selection_reason": choice.reason,
        "rejected_series": {r.series_uid: r.reason for r in choice.rejected},
        "shape_zyx": list(volume.hu.shape),
        "spacing_zyx_mm": [float(v) for v in volume.spacing],
        "affine": np.asarray(volume.affine).tolist(),
        "sop_instance_uids": list(volume.sop_instance_uids),
        "problems": problems,
        "resampled": volume.report.resampled,
        "source_positions_mm": [float(z) for z in volume.report.slice_positions_mm],
        "volume_path": str(out.relative_to(context.settings.data_dir)),
    }
