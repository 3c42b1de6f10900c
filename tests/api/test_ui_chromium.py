"""The web pages in a real headless Chromium against a real uvicorn server: login, the sorted worklist with
badges, claiming, and the study page with findings and key images. Screenshots go to artifacts/api/."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pytest

from tests.browser import chromium, needs_chromium

from db.models import utcnow
from tests.api.conftest import RADIOLOGIST_TOKEN, READ_TOKEN
from tests.api.seed import NO_EFFUSION, NODULE, PNEUMOTHORAX, FindingSpec, seed_processed_study
from tests.services import free_port, wait_for_port

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "api"

pytestmark = [
    needs_chromium,
    pytest.mark.parametrize("database_url", ["postgresql"], indirect=True),
]


@pytest.fixture
def server(settings, session_factory, auth, rules):
    import uvicorn

    from api.app import create_app

    port = free_port()
    app = create_app(settings, session_factory, auth=auth, worklist_rules=rules)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    wait_for_port(port)
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(10)


@pytest.fixture
def browser():
    with chromium() as launched:
        yield launched


def test_worklist_and_study_pages_in_chromium(server, browser, settings, session_factory):
    lesion = FindingSpec("liver_lesion", "Is there a liver lesion?", "Yes, a 2 cm hypodense lesion.", True,
                         ("300331000", "SCT", "Lesion of liver"), "liver", urgency_weight=12.0, key_slices=[1])
    with session_factory() as session:
        routine = seed_processed_study(session, settings, [NO_EFFUSION], requested_priority="ROUTINE",
                                       ready_at=utcnow() - dt.timedelta(hours=3))
        urgent = seed_processed_study(session, settings, [lesion, NODULE])
        stat = seed_processed_study(session, settings, [PNEUMOTHORAX, NODULE, NO_EFFUSION])
        session.commit()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1400, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    # Without the cookie the page sends the browser to the login form; a wrong token is refused there.
    page.goto(server + "/")
    assert "/login" in page.url
    page.fill("#token", "wrong")
    page.click("button[type=submit]")
    assert page.locator(".error").is_visible()
    errors.clear()  # the refused login is answered 401, which Chromium logs as a failed resource
    page.fill("#token", RADIOLOGIST_TOKEN)
    page.click("button[type=submit]")
    page.wait_for_selector("#worklist-body tr[data-study-uid]")

    rows = page.locator("#worklist-body tr[data-study-uid]")
    assert [rows.nth(i).get_attribute("data-study-uid") for i in range(rows.count())] == [
        stat.study_uid, urgent.study_uid, routine.study_uid]
    assert rows.nth(0).locator(".badge").inner_text() == "STAT"
    assert rows.nth(1).locator(".badge").inner_text() == "urgent"
    assert rows.nth(2).locator(".badge").inner_text() == "routine"
    cookie = next(c for c in context.cookies() if c["name"] == "omnict_token")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    # Claim the STAT study with the button (fetch POST with the anti-CSRF header), the table refreshes itself.
    rows.nth(0).locator("button[data-action=claim]").click()
    page.wait_for_function("document.querySelector('#worklist-body tr').innerText.includes('claimed')")
    page.screenshot(path=str(ARTIFACTS / "worklist.png"), full_page=True)

    # The filter shows only unread items.
    page.select_option("select[name=status]", "unread")
    page.click(".filters button[type=submit]")
    page.wait_for_load_state()
    unread = page.locator("#worklist-body tr[data-study-uid]")
    assert unread.count() == 2 and stat.study_uid not in page.content()

    page.goto(f"{server}/ui/studies/{stat.study_uid}")
    findings = page.locator("#findings tbody tr")
    assert findings.count() == 3
    assert "Pneumothorax" in findings.nth(0).inner_text() and "critical" in findings.nth(0).inner_text()
    assert page.locator("h1 .badge").inner_text() == "STAT"
    page.wait_for_function("Array.from(document.querySelectorAll('.key-images img'))"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    assert page.locator(".key-images img").count() == 2
    assert "Measurements" in page.content() or "measurements" in page.content()
    page.screenshot(path=str(ARTIFACTS / "study.png"), full_page=True)
    assert errors == []
    context.close()

    # A ?token= link sets the cookie and removes the token from the address; a read token sees no claim buttons.
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{server}/?token={READ_TOKEN}&status=all")
    assert "token=" not in page.url and "status=all" in page.url
    assert page.locator("#worklist-body tr[data-study-uid]").count() == 3
    assert page.locator("button.act").count() == 0
    context.close()
