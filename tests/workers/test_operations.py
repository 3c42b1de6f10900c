"""``omnict-node study rerun`` / ``study redeliver``: operator actions on a study's runs, audited, refused with a
clear message where they make no sense (SQLite and PostgreSQL)."""

from __future__ import annotations

from click.testing import CliRunner
from sqlalchemy import select

from db.models import AuditEvent, PipelineRun, RunState
from omnict_node.cli import main
from tests.api.seed import NO_EFFUSION, seed_processed_study


def _study(settings, *args: str):
    env = {"OMNICT_DATA_DIR": str(settings.data_dir), "OMNICT_DATABASE__URL": settings.database.url}
    return CliRunner().invoke(main, ["study", *args], env=env)


def _runs(session_factory, run_id: int) -> list[PipelineRun]:
    with session_factory() as session:
        study_id = session.get(PipelineRun, run_id).study_id
        return list(session.scalars(select(PipelineRun).where(PipelineRun.study_id == study_id)
                                    .order_by(PipelineRun.run_number)))


def test_rerun_opens_a_new_run_once_and_redeliver_reopens_delivery(settings, session_factory):
    with session_factory() as session:
        seeded = seed_processed_study(session, settings, [NO_EFFUSION], write_objects=False)
        session.commit()

    unknown = _study(settings, "rerun", "1.2.3.4")
    assert unknown.exit_code != 0 and "unknown study 1.2.3.4" in unknown.output

    redeliver = _study(settings, "redeliver", seeded.study_uid)  # run 1 was delivered: send its results again
    assert redeliver.exit_code == 0, redeliver.output
    assert f"redelivery of run {seeded.run_id} queued" in redeliver.output
    assert [r.state for r in _runs(session_factory, seeded.run_id)] == [RunState.DELIVERY_FAILED]

    rerun = _study(settings, "rerun", seeded.study_uid)
    assert rerun.exit_code == 0, rerun.output
    assert "run 2 opened" in rerun.output
    runs = _runs(session_factory, seeded.run_id)
    assert [(r.run_number, r.state, r.trigger) for r in runs][1] == (2, RunState.COMPLETE, "rerun")
    again = _study(settings, "rerun", seeded.study_uid)  # run 2 waits for dispatch: no third run
    assert again.exit_code != 0 and "run 2 of this study is still complete" in again.output
    nothing = _study(settings, "redeliver", seeded.study_uid)  # the latest run has delivered nothing yet
    assert nothing.exit_code != 0 and "nothing to redeliver: the latest run is complete" in nothing.output
    assert len(_runs(session_factory, seeded.run_id)) == 2

    with session_factory() as session:
        events = [(e.event, e.actor, e.study_instance_uid) for e in session.scalars(
            select(AuditEvent).where(AuditEvent.event.like("study.%")).order_by(AuditEvent.id))]
    assert events == [("study.redeliver", "cli", seeded.study_uid), ("study.rerun", "cli", seeded.study_uid)]
