"""``omnict-node findings UID [--json]`` and ``omnict-node worklist`` read the database through the API's queries."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from click.testing import CliRunner

from db.models import utcnow
from omnict_node.cli import main
from tests.api.seed import NO_EFFUSION, NODULE, PNEUMOTHORAX, seed_processed_study

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def _run(settings, *args: str):
    env = {"OMNICT_DATA_DIR": str(settings.data_dir), "OMNICT_DATABASE__URL": settings.database.url}
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def test_findings_and_worklist_commands(settings, session_factory, client):
    with session_factory() as session:
        calm = seed_processed_study(session, settings, [NO_EFFUSION], ready_at=utcnow() - dt.timedelta(hours=2),
                                    write_objects=False)
        critical = seed_processed_study(session, settings, [PNEUMOTHORAX, NODULE], write_objects=False)
        session.commit()

    as_json = _run(settings, "findings", critical.study_uid, "--json")
    assert as_json.exit_code == 0
    # Same JSON as the API.
    from tests.api.conftest import READ_TOKEN, bearer

    api_body = client.get(f"/studies/{critical.study_uid}/findings", headers=bearer(READ_TOKEN)).json()
    cli_body = json.loads(as_json.output)
    cli_body["urgency"].pop("priority"), api_body["urgency"].pop("priority")  # aging moves between the two calls
    assert cli_body == api_body

    text = _run(settings, "findings", critical.study_uid)
    assert text.exit_code == 0 and "urgency STAT" in text.output and "CRITICAL [SCT 36118008 Pneumothorax]" in text.output
    missing = _run(settings, "findings", "1.2.3")
    assert missing.exit_code != 0 and "not known" in missing.output

    listing = _run(settings, "worklist")
    lines = [line for line in listing.output.splitlines()[1:] if line.strip()]
    assert listing.exit_code == 0 and critical.study_uid in lines[0] and "STAT" in lines[0] and calm.study_uid in lines[1]
    entries = json.loads(_run(settings, "worklist", "--json", "--status", "all").output)
    assert [e["study_instance_uid"] for e in entries] == [critical.study_uid, calm.study_uid]
    assert _run(settings, "worklist", "--status", "bogus").exit_code != 0
