"""Worklist prioritisation: the formula, its SQL twin, critical findings, aging, claims under concurrency."""

from __future__ import annotations

import datetime as dt
import threading
from types import SimpleNamespace

import pytest
from sqlalchemy import select

from api import worklist
from api.settings import Role, WorklistRules
from db.models import AuditEvent, Finding, PipelineRun, RunState, Study, WorklistItem, utcnow
from tests.api.conftest import READ_TOKEN, bearer
from tests.api.seed import NO_EFFUSION, NODULE, FindingSpec, seed_processed_study

RULES = WorklistRules()
NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.timezone.utc)


def _f(positive, weight=0.0, critical=False):
    return SimpleNamespace(positive=positive, urgency_weight=weight, critical=critical)


def test_urgency_from_findings():
    assert worklist.urgency_from_findings([], RULES) == (0.0, False)
    # Max weight + a quarter of the other present ones; absent and non-judgment answers add nothing.
    assert worklist.urgency_from_findings([_f(True, 8), _f(True, 4), _f(False, 30), _f(None, 30)], RULES) == (9.0, False)
    assert worklist.urgency_from_findings([_f(True, 2, critical=True)], RULES) == (2.0, True)
    assert worklist.urgency_from_findings([_f(False, 50, critical=True)], RULES) == (0.0, False)


def test_priority_score_and_levels():
    fresh = worklist.priority_score(5.0, False, "ROUTINE", NOW, NOW, RULES)
    old_routine = worklist.priority_score(0.0, False, "ROUTINE", NOW - dt.timedelta(hours=24), NOW, RULES)
    ancient = worklist.priority_score(0.0, False, None, NOW - dt.timedelta(days=30), NOW, RULES)
    stat = worklist.priority_score(0.0, True, None, NOW, NOW, RULES)
    assert fresh == 5.0 and old_routine == 24.0 and old_routine > fresh
    assert ancient == RULES.aging_cap < stat  # aging is capped: it never outranks a critical finding
    assert worklist.priority_score(0.0, False, "stat", NOW, NOW, RULES) == RULES.priority_weights["STAT"]
    assert worklist.urgency_level(True, 0.0, None, RULES) == "stat"
    assert worklist.urgency_level(False, 0.0, "STAT", RULES) == "stat"
    assert worklist.urgency_level(False, 12.0, "ROUTINE", RULES) == "urgent"
    assert worklist.urgency_level(False, 0.0, "HIGH", RULES) == "urgent"
    assert worklist.urgency_level(False, 3.0, None, RULES) == "routine"


def _bare_item(session, urgency, stat, priority, ready_at, status="unread") -> str:
    """A worklist item with just its study (no files): for ordering tests."""
    from pydicom.uid import generate_uid

    study = Study(study_instance_uid=generate_uid(), requested_priority=priority, modalities="CT")
    session.add(study)
    session.flush()
    session.add(WorklistItem(study_id=study.id, urgency_score=urgency, stat=stat, requested_priority=priority,
                             ready_at=ready_at, status=status))
    return study.study_instance_uid


def test_sql_order_and_scores_equal_the_python_formula(session_factory):
    cases = [(0.0, False, None, 0), (5.0, False, "ROUTINE", 0), (0.0, False, "ROUTINE", 30), (12.0, False, "HIGH", 2),
             (0.0, True, None, 1), (3.0, False, "LOW", 200), (7.5, False, "MEDIUM", 0.5), (0.0, False, "STAT", 0)]
    expected = {}
    with session_factory() as session:
        for urgency, stat, priority, hours in cases:
            ready = NOW - dt.timedelta(hours=hours)
            uid = _bare_item(session, urgency, stat, priority, ready)
            expected[uid] = worklist.priority_score(urgency, stat, priority, ready, NOW, RULES)
        session.commit()
        entries = worklist.list_worklist(session, RULES, limit=50, now=NOW)
    assert [e.study_instance_uid for e in entries] == sorted(expected, key=lambda u: -expected[u])
    for entry in entries:
        assert entry.priority == pytest.approx(expected[entry.study_instance_uid], abs=1e-6)


def test_order_changes_when_a_critical_finding_arrives(client, settings, session_factory):
    weighty = FindingSpec("liver_lesion", "Is there a liver lesion?", "Yes.", True, ("300331000", "SCT", "Lesion of liver"),
                          "liver", urgency_weight=12.0, key_slices=[0])
    with session_factory() as session:
        urgent = seed_processed_study(session, settings, [weighty], write_objects=False)
        calm = seed_processed_study(session, settings, [NODULE, NO_EFFUSION], write_objects=False)
        session.commit()
    before = client.get("/worklist", headers=bearer(READ_TOKEN)).json()
    assert [e["study_instance_uid"] for e in before] == [urgent.study_uid, calm.study_uid]
    assert [e["level"] for e in before] == ["urgent", "routine"]

    # The pipeline re-answers the calm study (e.g. a late series) and finds a pneumothorax: critical.
    with session_factory() as session:
        session.add(Finding(run_id=calm.run_id, question_id="pneumothorax", question="Is there a pneumothorax?",
                            answer="Yes.", code_value="36118008", code_scheme="SCT", code_meaning="Pneumothorax",
                            positive=True, critical=True, urgency_weight=50.0))
        worklist.refresh_worklist_item(session, calm.run_id)
        session.commit()
    after = client.get("/worklist", headers=bearer(READ_TOKEN)).json()
    assert [e["study_instance_uid"] for e in after] == [calm.study_uid, urgent.study_uid]
    assert after[0]["level"] == "stat" and "Pneumothorax" in after[0]["positive_findings"]
    with session_factory() as session:
        events = session.scalars(select(AuditEvent.event).where(AuditEvent.study_instance_uid == calm.study_uid)).all()
    assert events == ["worklist.created", "worklist.updated"]


def test_aging_promotes_an_old_routine_study(settings, session_factory):
    with session_factory() as session:
        old_routine = seed_processed_study(session, settings, [NO_EFFUSION], requested_priority="ROUTINE",
                                           ready_at=utcnow() - dt.timedelta(hours=24), write_objects=False)
        fresh_low = seed_processed_study(session, settings, [NODULE], requested_priority="ROUTINE", write_objects=False)
        session.commit()
        with_aging = worklist.list_worklist(session, RULES)
        without_aging = worklist.list_worklist(session, RULES.model_copy(update={"aging_per_hour": 0.0}))
    assert [e.study_instance_uid for e in with_aging] == [old_routine.study_uid, fresh_low.study_uid]
    assert with_aging[0].hours_waiting == pytest.approx(24.0, abs=0.05)
    assert [e.study_instance_uid for e in without_aging] == [fresh_low.study_uid, old_routine.study_uid]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_new_run_reopens_a_completed_item(settings, session_factory):
    with session_factory() as session:
        seeded = seed_processed_study(session, settings, [NODULE], write_objects=False)
        session.commit()
        worklist.claim(session, seeded.study_uid, "dr_a", Role.RADIOLOGIST)
        worklist.complete(session, seeded.study_uid, "dr_a", Role.RADIOLOGIST)
        run = session.get(PipelineRun, seeded.run_id)
        rerun = PipelineRun(study_id=run.study_id, run_number=2, state=RunState.REPORTING, trigger="rerun")
        session.add(rerun)
        session.flush()
        item = worklist.refresh_worklist_item(session, rerun.id)
        session.commit()
        assert (item.status, item.run_id, item.claimed_by) == ("unread", rerun.id, None)
        # Refreshing the same run again changes nothing but the audit trail (idempotent).
        assert worklist.refresh_worklist_item(session, rerun.id).status == "unread"
        with pytest.raises(worklist.NotOnWorklist):
            worklist.refresh_worklist_item(session, 10**6)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_simultaneous_claims_have_one_winner(settings, session_factory):
    with session_factory() as session:
        seeded = seed_processed_study(session, settings, [NODULE], write_objects=False)
        session.commit()
    barrier, outcomes = threading.Barrier(6), []

    def claimer(name: str) -> None:
        with session_factory() as session:
            barrier.wait()
            try:
                worklist.claim(session, seeded.study_uid, name, Role.RADIOLOGIST)
                session.commit()
                outcomes.append(name)
            except worklist.WorklistError:
                session.rollback()

    threads = [threading.Thread(target=claimer, args=(f"dr_{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(outcomes) == 1
    with session_factory() as session:
        item = session.scalars(select(WorklistItem)).one()
        claims = session.scalars(select(AuditEvent).where(AuditEvent.event == "worklist.claimed")).all()
    assert item.claimed_by == outcomes[0] and [c.actor for c in claims] == outcomes
