"""Nothing handed to the workers is lost: the embedded broker hands out whole messages only, and the node's watchdog
dispatches again every run whose worker died or whose message was lost (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import logging
import multiprocessing
from pathlib import Path

from pydicom.uid import generate_uid
from sqlalchemy import update

from db.models import PipelineRun, RunState, StageRecord, Study, utcnow
from omnict_node.config import load_settings
from workers.celery_app import make_celery
from workers.watchdog import StallWatchdog

MESSAGES = 3000
PADDING = 20_000  # bytes: a write long enough for a consumer to look in between


def _produce(data_dir: str) -> None:
    app = make_celery(load_settings(data_dir=data_dir))
    with app.connection_for_write() as connection:
        queue = connection.SimpleQueue("race")
        for index in range(MESSAGES):
            queue.put({"index": index, "padding": "x" * PADDING})
        queue.close()


def test_embedded_broker_never_hands_out_a_partial_message(tmp_path: Path) -> None:
    """A producer process and a consumer on the same queue folder at full speed: every message arrives once and
    whole. (kombu's own filesystem transport hands out files it has created but not yet written: against it this
    consumer fails with JSONDecodeError, a dozen messages lost, measured.)"""
    data_dir = str(tmp_path / "node")
    app = make_celery(load_settings(data_dir=data_dir))
    received: list[dict] = []
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue("race")
        producer = multiprocessing.get_context("spawn").Process(target=_produce, args=(data_dir,))
        producer.start()
        while len(received) < MESSAGES:
            message = queue.get(timeout=60)
            received.append(message.payload)
            message.ack()
        producer.join(60)
        queue.close()
    assert producer.exitcode == 0
    assert sorted(m["index"] for m in received) == list(range(MESSAGES))
    assert all(len(m["padding"]) == PADDING for m in received)
    assert not list((tmp_path / "node" / "broker" / "queue").iterdir())  # no partial file left behind


def test_an_unreadable_message_is_set_aside_and_the_next_one_is_delivered(tmp_path: Path, caplog) -> None:
    settings = load_settings(data_dir=str(tmp_path / "node"))
    app = make_celery(settings)
    with app.connection_for_write() as connection:
        queue = connection.SimpleQueue("torn")
        torn = settings.broker_dir / "queue" / "1_00000000-0000-0000-0000-000000000000.torn.msg"
        torn.write_bytes(b"")  # what a crash between create and write leaves
        queue.put({"whole": True})
        with caplog.at_level(logging.ERROR, logger="omnict.broker"):
            message = queue.get(timeout=10)
        assert message.payload == {"whole": True}
        message.ack()
        queue.close()
    assert not torn.exists()
    assert (settings.broker_dir / "unreadable" / torn.name).read_bytes() == b""  # kept for the operator
    assert f"broker.message.unreadable message={torn.name} bytes=0" in caplog.text


def _run(session, state: RunState, minutes_untouched: float, dispatched: bool = True,
         stage_outcomes: tuple[tuple[str, str], ...] = (), result: dict | None = None) -> int:
    study = Study(study_instance_uid=generate_uid(), modalities="CT")
    session.add(study)
    session.flush()
    run = PipelineRun(study_id=study.id, run_number=1, state=state, dispatched_at=utcnow() if dispatched else None,
                      result=result)
    session.add(run)
    session.flush()
    for stage, outcome in stage_outcomes:
        session.add(StageRecord(run_id=run.id, stage=stage, outcome=outcome))
    session.flush()
    session.execute(update(PipelineRun).where(PipelineRun.id == run.id)
                    .values(updated_at=utcnow() - dt.timedelta(minutes=minutes_untouched)))
    return run.id


def test_watchdog_dispatches_the_stage_that_takes_each_untouched_run_on(session_factory, caplog) -> None:
    with session_factory() as session:
        lost_dispatch = _run(session, RunState.COMPLETE, 5)
        lost_handoff = _run(session, RunState.ASSEMBLING, 5, stage_outcomes=(("assemble", "ok"),),
                            result={"assemble": {"shape_zyx": [6, 32, 32]}})
        # killed between recording the attempt ok and recording its output: the stage runs again
        died_before_output = _run(session, RunState.ASSEMBLING, 5, stage_outcomes=(("assemble", "ok"),))
        died_mid_stage = _run(session, RunState.SEGMENTING, 5, stage_outcomes=(("assemble", "ok"), ("segment", "running")))
        died_in_retry = _run(session, RunState.INFERRING, 5, stage_outcomes=(("infer", "ok"), ("infer", "retry")))
        _run(session, RunState.COMPLETE, 5, dispatched=False)  # the sweeper's: not dispatched yet
        _run(session, RunState.SEGMENTING, 0.1, stage_outcomes=(("segment", "running"),))  # beating
        _run(session, RunState.DELIVERED, 5, stage_outcomes=(("deliver", "ok"),))  # done
        session.commit()

    dispatched: list[tuple[int, str]] = []
    watchdog = StallWatchdog(session_factory, 120.0, lambda run_id, stage: dispatched.append((run_id, stage.name)))
    with caplog.at_level(logging.WARNING, logger="omnict.watchdog"):
        assert sorted(watchdog.check_once()) == sorted([lost_dispatch, lost_handoff, died_before_output, died_mid_stage,
                                                        died_in_retry])
    assert sorted(dispatched) == sorted([(lost_dispatch, "assemble"), (lost_handoff, "segment"),
                                         (died_before_output, "assemble"), (died_mid_stage, "segment"),
                                         (died_in_retry, "infer")])
    assert f"pipeline.stage.stalled run_id={lost_handoff} stage=segment reason=handoff" in caplog.text
    assert f"pipeline.stage.stalled run_id={lost_dispatch} stage=assemble reason=dispatch" in caplog.text
    assert f"pipeline.stage.stalled run_id={died_mid_stage} stage=segment reason=heartbeat" in caplog.text
    assert watchdog.check_once() == []  # the clock restarted: one dispatch per stall timeout
