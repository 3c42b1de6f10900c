"""Fixtures of the API tests: tokens for each role, and an app bound to the parametrized test database."""

from __future__ import annotations

import pytest

from api.settings import ApiAuthSettings, WorklistRules

READ_TOKEN = "read-token-0123456789"
RADIOLOGIST_TOKEN = "radiologist-token-0123456789"
OTHER_RADIOLOGIST_TOKEN = "radiologist-two-token-0123456789"
OPERATOR_TOKEN = "operator-token-0123456789"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def auth() -> ApiAuthSettings:
    import hashlib

    return ApiAuthSettings(tokens=[
        {"name": "viewer", "role": "read", "token": READ_TOKEN},
        # One token given only as its digest, as production configs should.
        {"name": "dr_a", "role": "radiologist", "token_sha256": hashlib.sha256(RADIOLOGIST_TOKEN.encode()).hexdigest()},
        {"name": "dr_b", "role": "radiologist", "token": OTHER_RADIOLOGIST_TOKEN},
        {"name": "ops", "role": "operator", "token": OPERATOR_TOKEN},
    ])


@pytest.fixture
def rules() -> WorklistRules:
    return WorklistRules()


@pytest.fixture
def client(settings, session_factory, auth, rules):
    from fastapi.testclient import TestClient

    from api.app import create_app

    with TestClient(create_app(settings, session_factory, auth=auth, worklist_rules=rules)) as test_client:
        yield test_client
