"""A run's result object files, shared by the stages and side tasks that encode them: where they are written, what
their ``result_objects`` rows record, the run identity their UIDs derive from, and the label map on the source
slices."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from sqlalchemy import select

from db.models import PipelineRun
from db.session import session_scope
from workers.pipeline import StageContext
from workers.stages.assemble import replace_atomically


def results_dir(context: StageContext) -> Path:
    return context.settings.data_dir / "results" / context.study_instance_uid / f"run-{context.run_number}"


@dataclass(frozen=True)
class ObjectFile:
    """One encoded result object on disk: what its ``result_objects`` row records."""

    kind: str  # seg, measurement_sr, findings_sr, narrative_sr, kos
    path: str  # relative to the data directory
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    size_bytes: int

    def is_intact(self, data_dir: Path) -> bool:
        """The file is there with the size it was written with (not removed, not cut short)."""
        path = data_dir / self.path
        return path.is_file() and path.stat().st_size == self.size_bytes


def write_object_files(context: StageContext, named: list[tuple[str, Dataset]]) -> list[ObjectFile]:
    """Write ``(kind, dataset)`` pairs (a ``reports`` object group's ``named()``) into the run's results folder."""
    from reports import write_objects

    paths = write_objects([dataset for _, dataset in named], results_dir(context))
    return [ObjectFile(kind, str(path.relative_to(context.settings.data_dir)), str(ds.SOPClassUID),
                       str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID),
                       path.stat().st_size)
            for (kind, ds), path in zip(named, paths, strict=True)]


def write_record(context: StageContext, name: str, record: dict) -> None:
    """A JSON record in the run's work folder, replaced atomically (a reader sees the old one or the new one)."""
    replace_atomically(context.work_dir / name, lambda fh: fh.write(json.dumps(record).encode()))


def read_record(context: StageContext, name: str) -> dict | None:
    """The record :func:`write_record` wrote, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((context.work_dir / name).read_text())
    except (OSError, ValueError):
        return None


def object_files(record: dict | None, data_dir: Path) -> list[ObjectFile] | None:
    """The object files a record lists under "objects", or None unless every one of them is intact."""
    try:
        files = [ObjectFile(**f) for f in (record or {}).get("objects") or []]
    except TypeError:  # a record of another shape
        return None
    return files if files and all(f.is_intact(data_dir) for f in files) else None


def as_record(files: list[ObjectFile]) -> list[dict]:
    return [asdict(f) for f in files]


def run_identity(context: StageContext):
    """The identity every object UID derives from (the same run gives the same UIDs), dated at the study's
    completion."""
    from reports import RunIdentity

    with session_scope(context.session_factory) as session:
        completed_at = session.scalar(select(PipelineRun.completed_at).where(PipelineRun.id == context.run_id))
    return RunIdentity(context.study_instance_uid, f"{context.study_instance_uid}/run-{context.run_number}",
                       created=completed_at)


def label_map_on_source_slices(label_map: np.ndarray, assembled: dict, n_source_slices: int) -> np.ndarray:
    """The label map with one plane per source image. The assembled volume has one plane per source slice unless
    gaps were filled by resampling; then each source slice takes the nearest volume plane."""
    if label_map.shape[0] == n_source_slices:
        return label_map
    spacing_z = assembled["spacing_zyx_mm"][0]
    positions = np.asarray(assembled.get("source_positions_mm") or [], dtype=float)
    if positions.size != n_source_slices:
        raise ValueError(f"cannot align a {label_map.shape[0]}-plane label map with {n_source_slices} source slices")
    planes = np.clip(np.rint((positions - positions[0]) / spacing_z).astype(int), 0, label_map.shape[0] - 1)
    return label_map[planes]
