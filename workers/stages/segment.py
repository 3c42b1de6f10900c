"""Stage 2, segment (gpu queue): organ label map of the assembled volume and per-organ measurements.

The backend (``model.segmentation_backend``: the embedded classical one, or TotalSegmentator from local weights) is
built once per worker process and kept warm. Outputs: ``labels.npz`` in the run folder, ``organ_measurements`` rows
(replaced as a whole, so a retried stage leaves one set).
"""

from __future__ import annotations

import json
import logging

import numpy as np
from sqlalchemy import delete

from db.models import OrganMeasurement
from db.session import session_scope
from omnict_node.logs import log_event
from workers.pipeline import StageContext
from workers.stages.assemble import load_assembled_volume

log = logging.getLogger("omnict.stage.segment")

LABELS_FILE = "labels.npz"


def _segmenter(context: StageContext):
    from omnict_core.segmentation import make_segmenter

    model = context.settings.model
    return context.resources.get_or_create(
        "segmenter", lambda: make_segmenter(model.segmentation_backend, weights_dir=model.totalseg_weights,
                                            device=model.device))


def load_label_map(context: StageContext) -> tuple[np.ndarray, dict[int, str]]:
    """The label map and {value: organ name} the segment stage wrote for this run."""
    with np.load(context.work_dir / LABELS_FILE) as data:
        return data["label_map"], {int(k): v for k, v in json.loads(str(data["labels"])).items()}


def segment(context: StageContext) -> dict:
    from omnict_core.segmentation import axis_codes_from_direction, measure_organs

    volume = load_assembled_volume(context)
    segmenter = _segmenter(context)
    result = segmenter.segment(volume.hu, volume.spacing, axis_codes_from_direction(volume.direction[:, ::-1]))
    out = context.work_dir / LABELS_FILE
    tmp = out.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, label_map=result.label_map, labels=json.dumps({str(k): v for k, v in result.labels.items()}))
    tmp.replace(out)

    measurements = measure_organs(result.label_map, volume.hu, volume.spacing, result.labels)
    with session_scope(context.session_factory) as session:
        session.execute(delete(OrganMeasurement).where(OrganMeasurement.run_id == context.run_id))
        session.add_all(OrganMeasurement(run_id=context.run_id, organ=m.name, volume_ml=m.volume_ml,
                                         mean_hu=m.hu_mean, std_hu=m.hu_std)
                        for m in measurements.values() if m.name != "body")
    log_event(log, "pipeline.segment.done", run_id=context.run_id, backend=result.backend, organs=len(result.labels))
    return {
        "backend": result.backend,
        "backend_version": result.backend_version,
        "labels": {str(k): v for k, v in result.labels.items()},
        "organs": sorted(m.name for m in measurements.values() if m.name != "body"),
    }
