"""Stage 2, segment (gpu queue): organ label map of the assembled volume and per-organ measurements.

The backend (``model.segmentation_backend``: the embedded classical one, or TotalSegmentator from local weights) is
built once per worker process and kept warm. Outputs: ``labels.npy`` (the label map, uncompressed: zlib took ~0.4 s to
write and ~0.3 s to read back in each later stage on a 300-slice study, for ~80 MB of disk) and ``labels.json``
({value: organ name} and the backend that made them) in the run folder, ``organ_measurements`` rows (replaced as a
whole, so a retried stage leaves one set).

Once the label files are written, and before the organs are measured, the stage starts the ``seg_object`` side
task: the SEG, which needs the label map only, is encoded on the cpu worker meanwhile.
"""

from __future__ import annotations

import json
import logging

import numpy as np
from sqlalchemy import delete

from db.models import OrganMeasurement
from db.session import session_scope
from omnict_node.logs import log_event
from workers.pipeline import StageContext, WorkerResources
from workers.stages.assemble import load_assembled_volume, replace_atomically
from workers.stages.objects import write_record

log = logging.getLogger("omnict.stage.segment")

LABELS_FILE = "labels.npy"
LABEL_NAMES_FILE = "labels.json"


def segmenter_for(resources: WorkerResources):
    """The worker process's segmenter, created on first use (or by the worker's preload) and kept warm."""
    from omnict_core.segmentation import make_segmenter

    model = resources.settings.model
    return resources.get_or_create(
        "segmenter", lambda: make_segmenter(model.segmentation_backend, weights_dir=model.totalseg_weights,
                                            device=model.device))


def load_label_map(context: StageContext) -> tuple[np.ndarray, dict[int, str]]:
    """The label map and {value: organ name} the segment stage wrote for this run."""
    return load_labels(context), load_label_names(context)


def load_labels(context: StageContext) -> np.ndarray:
    """The label map the segment stage wrote for this run, read-only and mapped from the file: its pages come
    straight from the page cache (reading 80 MB into new memory took up to 0.3 s on a 300-slice study, most of it
    page faults)."""
    return np.load(context.work_dir / LABELS_FILE, mmap_mode="r")


def _label_record(context: StageContext) -> dict:
    record = json.loads((context.work_dir / LABEL_NAMES_FILE).read_text())
    return record if "labels" in record else {"labels": record}  # a run begun before the backend was recorded


def load_label_names(context: StageContext) -> dict[int, str]:
    """{label value: organ name} the segment stage wrote for this run."""
    return {int(k): v for k, v in _label_record(context)["labels"].items()}


def load_segmentation_algorithm(context: StageContext):
    """The segmentation backend (name, version) that made this run's label map, as the SEG and the measurement SR
    identify it."""
    from reports import AlgorithmInfo

    record = _label_record(context)
    return AlgorithmInfo(str(record.get("backend", "unknown")), str(record.get("backend_version", "unknown")))


def segment(context: StageContext) -> dict:
    from omnict_core.segmentation import axis_codes_from_direction, measure_organs
    from workers.stages.measurements import SEGMENTATION_OBJECT

    volume = load_assembled_volume(context)
    segmenter = segmenter_for(context.resources)
    result = segmenter.segment(volume.hu, volume.spacing, axis_codes_from_direction(volume.direction[:, ::-1]))
    # idempotent: a retried stage overwrites the same files
    replace_atomically(context.work_dir / LABELS_FILE, lambda fh: np.save(fh, result.label_map))
    write_record(context, LABEL_NAMES_FILE, {"backend": result.backend, "backend_version": result.backend_version,
                                             "labels": {str(k): v for k, v in result.labels.items()}})
    context.start_side_task(SEGMENTATION_OBJECT)  # the SEG needs nothing more: encoded while the organs are measured

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
