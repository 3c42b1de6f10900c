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
from workers.pipeline import PermanentStageError, StageContext

log = logging.getLogger("omnict.stage.assemble")

VOLUME_FILE = "volume.npz"


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
    hu: np.ndarray  # (z, y, x) float32 HU, slices ascending along the slice normal
    spacing: tuple[float, float, float]  # (dz, dy, dx) mm
    affine: np.ndarray  # 4x4, (i, j, k, 1) -> patient LPS mm
    direction: np.ndarray  # 3x3, columns: LPS directions of the x, y and slice indices


def load_assembled_volume(context: StageContext) -> AssembledVolume:
    """The volume the assemble stage wrote for this run."""
    with np.load(context.work_dir / VOLUME_FILE) as data:
        return AssembledVolume(data["hu"], tuple(float(v) for v in data["spacing"]), data["affine"], data["direction"])


def assemble(context: StageContext) -> dict:
    from omnict_core.io.dicom_series import DicomSeriesError, load_volume, select_ct_series

    files = study_files_by_series(context)
    if not files:
        raise PermanentStageError("the study has no stored instances")
    choice = select_ct_series(files)
    if not choice.ok:
        raise PermanentStageError(f"no CT series to analyse: {choice.reason}")
    try:
        volume = load_volume(choice.instances)
    except DicomSeriesError as exc:
        raise PermanentStageError(f"cannot build a volume from series {choice.series_uid}: {exc}") from exc

    out = context.work_dir / VOLUME_FILE
    tmp = out.with_suffix(".tmp.npz")
    np.savez(tmp, hu=volume.hu.astype(np.float32), affine=volume.affine, direction=volume.direction,
             spacing=np.asarray(volume.spacing))
    tmp.replace(out)  # idempotent: a retried stage overwrites the same file
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
