"""Registration of received instances: idempotent, timers move, late instances open new runs."""

import datetime as dt

from sqlalchemy import func, select

from db.ingest import InstanceRecord, register_instances
from db.models import Instance, PipelineRun, RunState, Series, Study
from db.session import session_scope


def record(sop: str, series: str = "1.2.3.1", study: str = "1.2.3", at: dt.datetime | None = None, **extra):
    return InstanceRecord(
        study_instance_uid=study, series_instance_uid=series, sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"{study}/{series}/{sop}.dcm", size_bytes=100, modality="CT",
        received_at=at or dt.datetime.now(dt.timezone.utc), **extra,
    )


def test_register_creates_study_series_instances_and_one_open_run(session_factory):
    with session_scope(session_factory) as session:
        outcomes = register_instances(session, [record("1.2.3.1.1"), record("1.2.3.1.2"), record("1.2.3.2.1", series="1.2.3.2")])
    assert [o.created for o in outcomes] == [True, True, True]
    with session_scope(session_factory) as session:
        study = session.scalars(select(Study)).one()
        assert study.instance_count == 3
        assert session.scalar(select(func.count(Series.id))) == 2
        runs = session.scalars(select(PipelineRun)).all()
        assert [(r.run_number, r.state, r.trigger) for r in runs] == [(1, RunState.RECEIVING, "received")]


def test_identical_resend_is_no_duplicate_and_does_not_move_timers(session_factory):
    early = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    with session_scope(session_factory) as session:
        register_instances(session, [record("1.2.3.1.1", at=early)])
    with session_scope(session_factory) as session:
        outcomes = register_instances(session, [record("1.2.3.1.1", at=early + dt.timedelta(hours=1))])
    assert outcomes[0].created is False
    with session_scope(session_factory) as session:
        assert session.scalar(select(func.count(Instance.id))) == 1
        last = session.scalars(select(Study)).one().last_received_at
        assert last.replace(tzinfo=dt.timezone.utc) == early


def test_replacement_bumps_revision(session_factory):
    with session_scope(session_factory) as session:
        register_instances(session, [record("1.2.3.1.1")])
    with session_scope(session_factory) as session:
        register_instances(session, [record("1.2.3.1.1", replaces_existing=True)])
    with session_scope(session_factory) as session:
        assert session.scalars(select(Instance)).one().revision == 2


def test_late_instance_after_completion_opens_a_new_run(session_factory):
    with session_scope(session_factory) as session:
        register_instances(session, [record("1.2.3.1.1")])
        session.scalars(select(PipelineRun)).one().state = RunState.DELIVERED
    with session_scope(session_factory) as session:
        outcomes = register_instances(session, [record("1.2.3.1.9")])
    assert outcomes[0].opened_run_number == 2
    with session_scope(session_factory) as session:
        runs = session.scalars(select(PipelineRun).order_by(PipelineRun.run_number)).all()
        assert [(r.run_number, r.state, r.trigger) for r in runs] == [
            (1, RunState.DELIVERED, "received"), (2, RunState.RECEIVING, "late_instance")]
        # the resend of an instance already stored does not open a third run
    with session_scope(session_factory) as session:
        register_instances(session, [record("1.2.3.1.1")])
        assert session.scalar(select(func.count(PipelineRun.id))) == 2
