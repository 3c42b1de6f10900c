"""Stage 5, deliver (cpu queue): C-STORE the run's result objects to the configured destinations.

Destinations: ``dicom.destinations`` when configured; otherwise the peer that sent the study (its allow-list entry
must give a ``port``). With neither, the results stay on the node — retrievable by C-GET/C-MOVE and the API — and the
stage records that no destination was configured.

Transient failures (PACS down, association aborted) are retried with backoff by the task layer; when the retries
are spent, or on a permanent refusal, the run goes to DELIVERY_FAILED, visible to operators, who can send it again
with ``omnict-node study redeliver UID``. Re-delivery sends the same SOP Instance UIDs, so the PACS replaces the
objects instead of duplicating them.
"""

from __future__ import annotations

import logging

from sqlalchemy import select

from db.models import Study
from db.session import session_scope
from omnict_node.config import DestinationSettings, Settings
from omnict_node.logs import log_event
from workers.pipeline import DeliveryFailedError, StageContext

log = logging.getLogger("omnict.stage.deliver")


def destinations_for(settings: Settings, source_ae_title: str | None) -> list[DestinationSettings]:
    """Where this study's results go: the configured destinations, else the sending peer if it has a port."""
    if settings.dicom.destinations:
        return list(settings.dicom.destinations)
    for peer in settings.dicom.allowed_peers:
        if peer.ae_title == source_ae_title and peer.port and peer.host != "*":
            return [DestinationSettings(ae_title=peer.ae_title, host=peer.host, port=peer.port, tls=peer.tls)]
    return []


def run_destinations(context: StageContext) -> list[DestinationSettings]:
    """:func:`destinations_for` the run's study (the AE title that sent it is in the database)."""
    with session_scope(context.session_factory) as session:
        source_ae = session.scalar(select(Study.source_ae_title)
                                   .where(Study.study_instance_uid == context.study_instance_uid))
    return destinations_for(context.settings, source_ae)


def deliver(context: StageContext) -> dict:
    from dicom_node.delivery import DeliveryError, deliver_run, destination_label
    from workers.stages.measurements import early_deliveries

    targets = run_destinations(context)
    if not targets:
        log_event(log, "pipeline.deliver.no_destination", run_id=context.run_id)
        return {"destinations": [], "note": "no destination configured; results are kept on the node"}
    delivered = []
    sent_early = early_deliveries(context)  # by the measurements side task, while the model ran
    for destination in targets:
        label = destination_label(destination)
        try:
            report = deliver_run(context.session_factory, context.settings, context.run_id, destination,
                                 final_attempt=context.final_attempt,
                                 delivered_before=sent_early.get(label, ()))
        except DeliveryError as exc:
            if exc.transient and not context.final_attempt:
                raise  # retried with backoff by the task layer
            raise DeliveryFailedError(f"{label}: {exc}") from exc
        delivered.append({"destination": label,
                          "skipped": report.skipped})
    return {"destinations": delivered}
