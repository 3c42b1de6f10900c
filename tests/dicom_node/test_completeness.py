"""Completeness: series and study quiet periods, hard limit, forced completion, exactly once."""

import datetime as dt
import threading

from sqlalchemy import select

from db.ingest import InstanceRecord, register_instances
from db.models import AuditEvent, PipelineRun, RunState
from db.session import session_scope
from dicom_node.completeness import CompletenessSweeper, completion_reason, force_complete
from omnict_node.config import CompletenessSettings

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
RULES = CompletenessSettings(series_quiet_s=60, study_quiet_s=30, hard_limit_s=3600)


def seconds(n: float) -> dt.timedelta:
    return dt.timedelta(seconds=n)


def register(factory, sop: str, at: dt.datetime, series: str = "1.9.1", study: str = "1.9"):
    with session_scope(factory) as session:
        register_instances(session, [InstanceRecord(
            study_instance_uid=study, series_instance_uid=series, sop_instance_uid=sop,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
            path=f"x/{sop}.dcm", size_bytes=1, modality="CT", received_at=at)])


def test_not_complete_while_a_series_is_inside_its_timer():
    # Study quiet (40 s > 30 s) but the series has been quiet only 40 s of its 60: mercure issue #32.
    assert completion_reason(T0 + seconds(40), T0, T0, [T0], RULES) is None
    assert completion_reason(T0 + seconds(61), T0, T0, [T0], RULES) == "quiet"


def test_study_timer_counts_from_the_last_instance_of_any_series():
    rules = CompletenessSettings(series_quiet_s=10, study_quiet_s=30, hard_limit_s=3600)
    late = T0 + seconds(100)
    assert completion_reason(late + seconds(20), T0, late, [T0, late], rules) is None
    assert completion_reason(late + seconds(31), T0, late, [T0, late], rules) == "quiet"


def test_hard_limit_completes_a_study_that_keeps_receiving():
    assert completion_reason(T0 + seconds(3600), T0, T0 + seconds(3599), [T0 + seconds(3599)], RULES) == "hard_limit"


def test_sweeper_completes_and_dispatches_exactly_once(session_factory):
    register(session_factory, "1.9.1.1", T0)
    register(session_factory, "1.9.2.1", T0 + seconds(5), series="1.9.2")
    dispatched: list[int] = []
    sweeper = CompletenessSweeper(RULES, session_factory, dispatched.append)
    assert sweeper.sweep_once(T0 + seconds(50)) == []
    assert dispatched == []
    done = sweeper.sweep_once(T0 + seconds(70))
    assert [c.reason for c in done] == ["quiet"]
    assert len(dispatched) == 1
    # later sweeps (or a second sweeper after a restart) neither complete nor dispatch again
    assert sweeper.sweep_once(T0 + seconds(200)) == []
    assert CompletenessSweeper(RULES, session_factory, dispatched.append).sweep_once(T0 + seconds(300)) == []
    assert len(dispatched) == 1
    with session_scope(session_factory) as session:
        run = session.scalars(select(PipelineRun)).one()
        assert run.state == RunState.COMPLETE and run.dispatched_at is not None


def test_concurrent_sweepers_complete_a_study_once(session_factory):
    register(session_factory, "1.9.1.1", T0)
    dispatched: list[int] = []
    lock = threading.Lock()

    def dispatch(run_id: int) -> None:
        with lock:
            dispatched.append(run_id)

    sweepers = [CompletenessSweeper(RULES, session_factory, dispatch) for _ in range(4)]
    results: list = []
    threads = [threading.Thread(target=lambda s=s: results.append(s._complete_due_runs(T0 + seconds(100)))) for s in sweepers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(len(r) for r in results) == 1


def test_broker_down_keeps_run_undispatched_until_it_is_back(session_factory):
    register(session_factory, "1.9.1.1", T0)
    calls: list[int] = []

    def failing(run_id: int) -> None:
        calls.append(run_id)
        raise ConnectionError("broker down")

    CompletenessSweeper(RULES, session_factory, failing).sweep_once(T0 + seconds(100))
    dispatched: list[int] = []
    CompletenessSweeper(RULES, session_factory, dispatched.append).sweep_once(T0 + seconds(101))
    assert len(calls) == 1 and len(dispatched) == 1


def test_forced_completion_is_audited_and_dispatched(session_factory):
    register(session_factory, "1.9.1.1", T0)
    with session_scope(session_factory) as session:
        run_id = force_complete(session, "1.9", actor="test")
    assert run_id is not None
    with session_scope(session_factory) as session:
        assert force_complete(session, "1.9") is None  # already complete
        assert session.scalars(select(AuditEvent.event)).all() == ["study.complete.forced"]
    dispatched: list[int] = []
    CompletenessSweeper(RULES, session_factory, dispatched.append).sweep_once(T0 + seconds(1))
    assert dispatched == [run_id]
