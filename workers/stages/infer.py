"""Stage 3, infer (gpu queue): ask the study the protocol's question battery and write the findings.

The OmniCT engine (omnict_core.inference) is loaded once per worker process from a LOCAL checkpoint directory
(``model.checkpoint``, default the shipped ``checkpoints/omnict-tiny-phantom``) and kept warm. For one study it
encodes the volume once, reuses the shared prompt prefix across questions, and returns for every answer the source
slices it drew on: these become the key images of the findings SR and the KOS. ``findings`` rows are replaced as a
whole, so a retried stage leaves one set.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import delete

from db.models import Finding
from db.session import session_scope
from omnict_node.logs import log_event
from omnict_node.config import Settings
from workers.pipeline import PermanentStageError, StageContext, WorkerResources
from workers.protocol import judgment, load_protocol
from workers.stages.assemble import load_assembled_volume
from workers.stages.segment import load_label_map

if TYPE_CHECKING:
    from omnict_core.inference.engine import Question

log = logging.getLogger("omnict.stage.infer")

SHIPPED_CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "omnict-tiny-phantom"
REPORT_QUESTION_ID = "report"
NO_ANSWER = "[no answer generated]"  # an empty generation must still be an explicit, valid SR text value


def _answer_text(text: str) -> str:
    return text.strip() or NO_ANSWER


def checkpoint_dir(settings: Settings) -> Path:
    return Path(settings.model.checkpoint or SHIPPED_CHECKPOINT)


def engine_for(resources: WorkerResources):
    """The worker process's OmniCT engine, loaded on first use (or by the worker's preload) and kept warm."""
    from omnict_core.inference.engine import OmniCTEngine

    path = checkpoint_dir(resources.settings)
    if not (path / "config.json").is_file():
        raise PermanentStageError(f"OmniCT checkpoint not found at {path} (model.checkpoint); weights are never "
                                  f"downloaded: put a checkpoint directory there")
    model = resources.settings.model
    return resources.get_or_create(
        f"engine:{path}", lambda: OmniCTEngine(path, device=model.device, max_new_tokens=model.max_new_tokens))


def battery_questions(battery, closed_answers: str) -> "list[Question]":
    """The engine's questions for a protocol battery ``[(ProtocolQuestion, region)]``. The protocol's questions are
    yes/no: ranked (``model.closed_answers = "rank"``), each allows exactly the two trained answers."""
    from omnict_core.data.vqa import JUDGMENT_ANSWERS
    from omnict_core.inference.engine import Question

    choices = JUDGMENT_ANSWERS if closed_answers == "rank" else None
    return [Question(q.text, organ=region, choices=choices) for q, region in battery]


def plane_to_sop_uid(assembled: dict, plane: int) -> str | None:
    """SOP Instance UID of the source image at volume plane ``plane`` (nearest image when gaps were resampled)."""
    uids = assembled.get("sop_instance_uids") or []
    positions = assembled.get("source_positions_mm") or []
    if not assembled.get("resampled") and 0 <= plane < len(uids):
        return uids[plane]
    if not positions or len(positions) != len(uids):
        return None
    z = positions[0] + plane * assembled["spacing_zyx_mm"][0]
    return uids[int(np.argmin(np.abs(np.asarray(positions) - z)))]


def infer(context: StageContext) -> dict:
    from omnict_core.inference.engine import Question
    from omnict_core.preprocessing import prepare_volume
    from reports.coding import FINDINGS

    protocol = load_protocol(context.settings.model.protocol)
    engine = engine_for(context.resources)
    volume = load_assembled_volume(context)
    label_map, labels = load_label_map(context)
    study = prepare_volume(volume.hu, engine.config, labels=label_map, spacing=volume.spacing, label_names=labels)
    battery = protocol.battery(labels.values())
    # The report is one more question of the same call: the image is encoded and the prefix prefilled once.
    report_question = Question(protocol.report_prompt, None, context.settings.model.report_max_new_tokens)
    questions = battery_questions(battery, context.settings.model.closed_answers)
    *answers, report = engine.ask(study, questions + [report_question])

    assembled = context.results["assemble"]
    rows = []
    for (question, _region), answer in zip(battery, answers, strict=True):
        code = FINDINGS[question.finding]
        rows.append(Finding(
            run_id=context.run_id, question_id=question.id, question=question.text, answer=_answer_text(answer.text),
            organ=question.finding_site, code_value=code.value, code_scheme=code.scheme_designator,
            code_meaning=code.meaning, positive=judgment(answer.text), critical=question.critical,
            urgency_weight=question.urgency_weight, key_slices=list(answer.key_slices),
            key_sop_instance_uids=[u for u in (plane_to_sop_uid(assembled, s) for s in answer.key_slices) if u]))
    rows.append(Finding(
        run_id=context.run_id, question_id=REPORT_QUESTION_ID, question=protocol.report_prompt,
        answer=_answer_text(report.text),
        key_slices=list(report.key_slices),
        key_sop_instance_uids=[u for u in (plane_to_sop_uid(assembled, s) for s in report.key_slices) if u]))
    with session_scope(context.session_factory) as session:
        session.execute(delete(Finding).where(Finding.run_id == context.run_id))
        session.add_all(rows)
    positives = [r.question_id for r in rows if r.positive]
    decode = engine.last_decode  # drafted tokens kept = decoder passes saved (answer_ngrams.json of the checkpoint)
    log_event(log, "pipeline.infer.done", run_id=context.run_id, questions=len(battery), positive=len(positives),
              decoder_passes=decode.passes, draft_tokens_kept=decode.draft_tokens_kept)
    return {
        "checkpoint": str(checkpoint_dir(context.settings)),
        "model_version": getattr(engine.config, "_name_or_path", "") or checkpoint_dir(context.settings).name,
        "protocol": protocol.version,
        "questions": len(battery),
        "positive": positives,
        "report": _answer_text(report.text),
    }
