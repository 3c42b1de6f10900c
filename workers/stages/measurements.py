"""Side task after segment (cpu queue): encode the SEG and the TID 1500 measurement SR, which need no model answer,
and send them to the destinations while the gpu worker runs inference.

Not a stage of the run's state machine (see ``workers.pipeline.SideTask``): the run never waits for it and cannot
fail by it. The report stage takes its files when they are all there (they are byte for byte what that stage would
write: content and UIDs derive from the run), and the deliver stage, on its first attempt, does not send again what
it delivered. When it has not finished (still running, failed, its worker died) those stages do the work themselves;
the price is time, never a missing or a duplicated object (the UIDs are the same, so a second C-STORE replaces).

Its record, ``<work dir>/measurement_objects.json``, holds the object files and, per destination, the SOP Instance
UIDs delivered there.
"""

from __future__ import annotations

import logging

from sqlalchemy import select

from db.models import RunState, Study
from db.session import session_scope
from omnict_node.logs import log_event
from workers.celery_app import CPU_QUEUE
from workers.pipeline import SideTask, StageContext, cyclic_gc_paused
from workers.stages.deliver import destinations_for
from workers.stages.report import encode_measurement_files, measurement_inputs, record_early_objects

log = logging.getLogger("omnict.stage.measurements")


def publish_measurements(context: StageContext) -> dict:
    from dicom_node.delivery import DeliveryError, deliver_with_settings, destination_label

    with cyclic_gc_paused():
        source, organs, run = measurement_inputs(context)
        files = encode_measurement_files(context, source, organs, run)
    record_early_objects(context, files, {})  # the report stage may take the files from now on
    with session_scope(context.session_factory) as session:
        source_ae = session.scalar(select(Study.source_ae_title)
                                   .where(Study.study_instance_uid == context.study_instance_uid))
    delivered: dict[str, list[str]] = {}
    for destination in destinations_for(context.settings, source_ae):
        label = destination_label(destination)
        try:
            report = deliver_with_settings([context.settings.data_dir / f.path for f in files], destination,
                                           context.settings.dicom)
        except DeliveryError as exc:  # the deliver stage sends them with the rest, with its retries
            log_event(log, "pipeline.measurements.delivery_deferred", logging.WARNING, run_id=context.run_id,
                      destination=label, transient=exc.transient)
            continue
        delivered[label] = [r.sop_instance_uid for r in report.delivered]
        if not report.ok:
            log_event(log, "pipeline.measurements.delivery_deferred", logging.WARNING, run_id=context.run_id,
                      destination=label, failed=len(report.failed))
    record_early_objects(context, files, delivered)
    return {"objects": len(files), "destinations": len(delivered)}


MEASUREMENTS = SideTask(
    "measurements", CPU_QUEUE, publish_measurements,
    # after segment and until the report stage starts: later, the main line has encoded the objects itself
    while_states=frozenset({RunState.SEGMENTING, RunState.INFERRING}),
)
