"""Studies, findings and result objects through the HTTP API, on SQLite and PostgreSQL; auth; health; metrics."""

from __future__ import annotations

import io

import pydicom
import pytest
from PIL import Image

from db.models import AuditEvent, Delivery, StageRecord
from tests.api.conftest import OPERATOR_TOKEN, RADIOLOGIST_TOKEN, READ_TOKEN, bearer
from tests.api.seed import LIVER_SIZE, NO_EFFUSION, NODULE, PNEUMOTHORAX, seed_processed_study

READ = bearer(READ_TOKEN)


@pytest.fixture
def processed(settings, session_factory, rules):
    with session_factory() as session:
        seeded = seed_processed_study(session, settings, [PNEUMOTHORAX, NODULE, NO_EFFUSION, LIVER_SIZE],
                                      requested_priority="ROUTINE", rules=rules)
        session.commit()
    return seeded


def test_findings_of_a_processed_study_round_trip(client, processed):
    body = client.get(f"/studies/{processed.study_uid}/findings", headers=READ).json()

    assert body["study_instance_uid"] == processed.study_uid
    assert body["run"]["state"] == "delivered"
    by_id = {f["question_id"]: f for f in body["findings"]}
    assert list(by_id) == ["pneumothorax", "lung_nodule", "pleural_effusion", "liver_size"]
    ptx = by_id["pneumothorax"]
    assert ptx["code"] == {"value": "36118008", "scheme": "SCT", "meaning": "Pneumothorax"}
    assert ptx["question"] == PNEUMOTHORAX.question and ptx["answer"] == PNEUMOTHORAX.answer
    assert ptx["positive"] is True and ptx["critical"] is True and ptx["organ"] == "lung_right"
    assert [k["sop_instance_uid"] for k in ptx["key_images"]] == [processed.ct_sop_uids[2], processed.ct_sop_uids[1]]
    assert by_id["pleural_effusion"]["positive"] is False
    assert by_id["liver_size"]["code"] is None and by_id["liver_size"]["positive"] is None
    # Urgency: the critical finding makes it STAT; score = max weight + 0.25 x the other present weight.
    assert body["urgency"]["level"] == "stat" and body["urgency"]["stat"] is True
    assert body["urgency"]["urgency_score"] == pytest.approx(50.0 + 0.25 * 5.0)
    assert {m["organ"]: m["volume_ml"] for m in body["measurements"]} == {"liver": 1503.2, "lung_left": 2410.0}
    assert {k["sop_instance_uid"] for k in body["key_images"]} == {processed.ct_sop_uids[1], processed.ct_sop_uids[2]}
    assert {r["kind"] for r in body["results"]} == {"findings_sr", "kos"}


def test_study_list_and_detail_show_state_stage_timings_and_errors(client, processed, session_factory):
    with session_factory() as session:
        session.add(StageRecord(run_id=processed.run_id, stage="deliver", attempt=2, outcome="retry",
                                error="association rejected by PACS", duration_s=0.1))
        session.add(Delivery(run_id=processed.run_id, destination="PACS@127.0.0.1:104", state="delivered", attempts=2))
        session.commit()
    listed = client.get("/studies", params={"state": "delivered", "limit": 10}, headers=READ).json()
    assert [s["study_instance_uid"] for s in listed] == [processed.study_uid]
    assert client.get("/studies", params={"state": "failed"}, headers=READ).json() == []
    assert client.get("/studies", params={"since": "2999-01-01T00:00:00Z"}, headers=READ).json() == []

    detail = client.get(f"/studies/{processed.study_uid}", headers=READ).json()
    assert detail["state"] == "delivered" and detail["instance_count"] == 3
    stages = detail["runs"][0]["stages"]
    assert [s["stage"] for s in stages][:5] == ["assemble", "segment", "infer", "report", "deliver"]
    assert stages[2]["duration_s"] == 40.0
    assert detail["errors"] == [{"run_number": 1, "stage": "deliver", "attempt": 2,
                                 "error": "association rejected by PACS"}]
    assert detail["runs"][0]["deliveries"][0]["state"] == "delivered"
    assert detail["worklist"]["level"] == "stat"


def test_result_objects_are_listed_and_served_as_dicom(client, processed):
    listed = client.get(f"/studies/{processed.study_uid}/results", headers=READ).json()
    assert {r["kind"]: r["sop_instance_uid"] for r in listed} == processed.result_sop_uids
    sr_uid = processed.result_sop_uids["findings_sr"]
    response = client.get(f"/studies/{processed.study_uid}/results/{sr_uid}", headers=READ)
    assert response.status_code == 200 and response.headers["content-type"] == "application/dicom"
    dataset = pydicom.dcmread(io.BytesIO(response.content))
    assert dataset.SOPInstanceUID == sr_uid and dataset.Modality == "SR"
    assert dataset.StudyInstanceUID == processed.study_uid
    assert client.get(f"/studies/{processed.study_uid}/results/1.2.3.4", headers=READ).status_code == 404
    assert client.get("/studies/1.2.3.4/findings", headers=READ).status_code == 404


def test_key_image_is_a_windowed_png(client, processed):
    url = f"/studies/{processed.study_uid}/key-images/{processed.ct_sop_uids[2]}.png"
    soft = Image.open(io.BytesIO(client.get(url, headers=READ).content))
    lung = Image.open(io.BytesIO(client.get(url, params={"window": "lung"}, headers=READ).content))
    assert soft.format == "PNG" and soft.size == (64, 64) and soft.mode == "L"
    # Soft-tissue window: the -800 HU "lung" is black and 40 HU tissue mid-grey; the lung window shows the lung.
    assert soft.getpixel((64 // 3, 32)) == 0 and 100 < soft.getpixel((50, 20)) < 160
    assert lung.getpixel((64 // 3, 32)) > 40
    assert client.get(url, params={"window": "nonsense"}, headers=READ).status_code == 422
    # An instance of another study is not served under this study.
    assert client.get(f"/studies/1.2.3/key-images/{processed.ct_sop_uids[2]}.png", headers=READ).status_code == 404


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_tokens_and_roles(client, processed):
    uid = processed.study_uid
    assert client.get("/worklist").status_code == 401
    assert client.get("/worklist").headers["www-authenticate"].startswith("Bearer")
    assert client.get("/worklist", headers=bearer("not-a-token")).status_code == 401
    assert client.get("/worklist", headers={"Authorization": f"Basic {READ_TOKEN}"}).status_code == 401
    assert client.get(f"/studies/{uid}/findings").status_code == 401
    assert client.get("/dicomweb/studies").status_code == 401
    assert client.get("/metrics").status_code == 401
    assert client.get("/worklist", headers=READ).status_code == 200
    # A read token cannot change the worklist (403); a radiologist can claim; only an operator may refresh.
    assert client.post(f"/worklist/{uid}/claim", headers=READ).status_code == 403
    assert client.post(f"/worklist/{uid}/refresh", headers=bearer(RADIOLOGIST_TOKEN)).status_code == 403
    assert client.post(f"/worklist/{uid}/claim", headers=bearer(RADIOLOGIST_TOKEN)).status_code == 200
    assert client.post(f"/worklist/{uid}/refresh", headers=bearer(OPERATOR_TOKEN)).status_code == 200
    # The login cookie works for reads; a change through the cookie needs the anti-CSRF header.
    client.cookies.set("omnict_token", OPERATOR_TOKEN)
    try:
        assert client.get("/worklist").status_code == 200
        assert client.post(f"/worklist/{uid}/release").status_code == 403
        assert client.post(f"/worklist/{uid}/release", headers={"X-OmniCT-Request": "1"}).status_code == 200
    finally:
        client.cookies.clear()
    assert client.get("/health").status_code == 200  # open: probes carry no token


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_bad_query_parameters_get_400(client, processed):
    assert client.get("/studies", params={"state": "nonsense"}, headers=READ).status_code == 400
    assert client.get("/worklist", params={"status": "nonsense"}, headers=READ).status_code == 400
    assert client.get("/worklist", params={"state": "nonsense"}, headers=READ).status_code == 400
    assert client.get("/studies", params={"since": "yesterday"}, headers=READ).status_code == 422
    assert client.post("/worklist/1.2.3/claim", headers=bearer(RADIOLOGIST_TOKEN)).status_code == 404


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_health_reports_database_failure(settings, auth):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from db.session import make_engine, make_session_factory
    from tests.services import free_port

    broken = make_session_factory(make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none"))
    with TestClient(create_app(settings, broken, auth=auth)) as client:
        response = client.get("/health")
    assert response.status_code == 503 and response.json()["status"] == "unavailable"


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_metrics_expose_queue_stage_durations_failures_and_deliveries(client, processed, session_factory):
    from db.models import PipelineRun, RunState

    with session_factory() as session:
        run = session.get(PipelineRun, processed.run_id)
        session.add(PipelineRun(study_id=run.study_id, run_number=2, state=RunState.INFERRING, trigger="late_instance"))
        session.add(StageRecord(run_id=run.id, stage="infer", attempt=2, outcome="failed", error="boom", duration_s=3.0))
        session.add(Delivery(run_id=run.id, destination="PACS@127.0.0.1:104", state="failed", attempts=5))
        session.commit()
    client.get("/worklist", headers=READ)
    text = client.get("/metrics", headers=READ).text

    assert 'omnict_queue_depth{state="inferring"} 1.0' in text
    assert 'omnict_runs{state="delivered"} 1.0' in text
    # infer attempts: 40 s (ok) and 3 s (failed) -> 1 at or under 5 s, 2 under 60 s.
    assert 'omnict_stage_duration_seconds_bucket{le="5.0",stage="infer"} 1.0' in text
    assert 'omnict_stage_duration_seconds_bucket{le="60.0",stage="infer"} 2.0' in text
    assert 'omnict_stage_duration_seconds_sum{stage="infer"} 43.0' in text
    assert 'omnict_stage_failures_total{stage="infer"} 1.0' in text
    assert 'omnict_deliveries{state="failed"} 1.0' in text
    assert 'omnict_worklist_items{status="unread"} 1.0' in text
    assert 'omnict_api_requests_total{method="GET",route="/worklist",status="200"} 1.0' in text


def test_claim_release_complete_are_persisted_and_audited(client, processed, session_factory):
    uid = processed.study_uid
    dr_a = bearer(RADIOLOGIST_TOKEN)
    assert client.post(f"/worklist/{uid}/claim", headers=dr_a).json()["claimed_by"] == "dr_a"
    assert client.post(f"/worklist/{uid}/claim", headers=dr_a).status_code == 200  # own claim again: no-op
    from tests.api.conftest import OTHER_RADIOLOGIST_TOKEN

    dr_b = bearer(OTHER_RADIOLOGIST_TOKEN)
    conflict = client.post(f"/worklist/{uid}/claim", headers=dr_b)
    assert conflict.status_code == 409 and "dr_a" in conflict.json()["detail"]
    assert client.post(f"/worklist/{uid}/release", headers=dr_b).status_code == 403
    assert client.post(f"/worklist/{uid}/complete", headers=dr_b).status_code == 403
    done = client.post(f"/worklist/{uid}/complete", headers=dr_a).json()
    assert done["status"] == "completed" and done["completed_at"]
    assert client.post(f"/worklist/{uid}/complete", headers=dr_a).status_code == 409
    # Completed items leave the default (open) list but stay visible with status=completed.
    assert client.get("/worklist", headers=READ).json() == []
    assert [e["study_instance_uid"] for e in client.get("/worklist?status=completed", headers=READ).json()] == [uid]
    with session_factory() as session:
        events = [(e.event, e.actor) for e in session.query(AuditEvent).order_by(AuditEvent.id)]
    assert events == [("worklist.created", "pipeline"), ("worklist.claimed", "dr_a"), ("worklist.completed", "dr_a")]


def test_token_settings_are_validated_and_nest_in_settings():
    import hashlib

    from pydantic import ValidationError

    from api.settings import ApiAuthSettings, Role, auth_settings_from, worklist_rules_from

    auth = ApiAuthSettings(tokens=[{"name": "a", "role": "operator", "token_sha256": hashlib.sha256(b"s").hexdigest().upper()}])
    assert auth.tokens[0].digest == hashlib.sha256(b"s").hexdigest() and auth.tokens[0].role is Role.OPERATOR
    for bad in ({"name": "a"}, {"name": "a", "token": "x", "token_sha256": "0" * 64}, {"name": "a", "token_sha256": "xyz"},
                {"name": "a", "token": "x", "role": "admin"}):
        with pytest.raises(ValidationError):
            ApiAuthSettings(tokens=[bad])
    assert Role.OPERATOR.allows(Role.RADIOLOGIST) and not Role.READ.allows(Role.RADIOLOGIST)
    # Until the lead nests them in ApiSettings, plain settings give the defaults: no tokens (closed), default rules.
    from omnict_node.config import load_settings

    plain = load_settings()
    assert auth_settings_from(plain).tokens == [] and worklist_rules_from(plain).aging_per_hour == 1.0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_openapi_docs_are_served(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/studies/{study_uid}/findings", "/worklist", "/worklist/{study_uid}/claim", "/dicomweb/studies",
            "/health", "/metrics"} <= set(paths)
