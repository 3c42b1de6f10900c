"""The node's results in OHIF 3 (the viewer our radiologists open), in a real headless Chromium against a real Orthanc.

Content: :func:`tests.viewer.content.build_phantom_results` (one function, to be swapped for the end-to-end
pipeline fixture). OHIF's published build (``npm pack @ohif/app``, cached in ``.cache/ohif/``) is served by
:class:`tests.viewer.ohif_server.OhifServer`, which proxies DICOMweb to Orthanc. Assertions read the DOM (study list
rows, viewport overlays, the SVG annotation text OHIF draws, the SR text tree); screenshots go to artifacts/viewer/.
"""

from __future__ import annotations

import io
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.browser import chromium, needs_chromium

from tests.services import OrthancServer, start_orthanc
from tests.viewer.content import ViewerContent, build_phantom_results, upload
from tests.viewer.ohif_server import REPO_ROOT, OhifServer, OhifUnavailable, ensure_ohif_dist

ARTIFACTS = REPO_ROOT / "artifacts" / "viewer"
FIRST_LOAD_MS = 90_000  # OHIF's first load on a loaded 2-core machine (measured 8-15 s idle)
STEP_MS = 45_000

pytestmark = [
    pytest.mark.slow,
    needs_chromium,
]


@dataclass
class BrowserLog:
    """Console errors, uncaught page errors and OHIF's error-boundary reports (OHIF logs those at debug level)."""

    errors: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)  # every console line, written out when a step fails

    def on_console(self, message) -> None:
        self.console.append(f"{time.monotonic():.3f} console.{message.type}: {message.text[:2000]}")
        if message.type == "error" or "Error Boundary" in message.text or "Something went wrong" in message.text:
            self.errors.append(f"console.{message.type}: {message.text[:500]}")

    def on_page_error(self, error) -> None:
        self.errors.append(f"pageerror: {str(error)[:500]}")


@pytest.fixture(scope="module")
def ohif_dist() -> Path:
    try:
        return ensure_ohif_dist()
    except OhifUnavailable as error:
        pytest.skip(f"OHIF build not cached and npm cannot fetch it: {error}")


@pytest.fixture(scope="module")
def content(tmp_path_factory: pytest.TempPathFactory) -> ViewerContent:
    return build_phantom_results(tmp_path_factory.mktemp("viewer-content"))


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, content: ViewerContent) -> Iterator[OrthancServer]:
    server = start_orthanc(tmp_path_factory.mktemp("viewer-orthanc"))
    try:
        upload(server, content)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ohif(ohif_dist: Path, pacs: OrthancServer) -> Iterator[OhifServer]:
    with OhifServer(ohif_dist, pacs.url) as server:
        yield server
    assert server.proxy_errors == [], server.proxy_errors


@pytest.fixture(scope="module")
def browser():
    with chromium() as launched:
        yield launched


@pytest.fixture
def page(browser):
    # OHIF registers a service worker in production builds; blocked so each test sees the server, not a cache.
    context = browser.new_context(viewport={"width": 1600, "height": 1000}, service_workers="block")
    page = context.new_page()
    page.set_default_timeout(STEP_MS)
    log = BrowserLog()
    page.on("console", log.on_console)
    page.on("pageerror", log.on_page_error)
    page.browser_log = log
    yield page
    context.close()


@pytest.fixture(scope="module", autouse=True)
def artifacts_dir() -> Path:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def open_viewer(page, ohif: OhifServer, content: ViewerContent) -> None:
    page.goto(f"{ohif.url}/viewer?StudyInstanceUIDs={content.study_instance_uid}")
    dismiss_tour(page)


def dismiss_tour(page) -> None:
    page.wait_for_selector("[data-cy='study-browser-thumbnail']", timeout=FIRST_LOAD_MS)
    skip_tour = page.get_by_text("Skip all")
    try:  # the first-visit onboarding tour covers the viewport
        skip_tour.click(timeout=5_000)
    except Exception:  # noqa: BLE001 - no tour this time
        pass


def series_entry(page, description: str):
    """The study browser's entry of a series (thumbnail or list row), found by its SeriesDescription."""
    return page.locator("[data-cy='study-browser-thumbnail'], [data-cy='study-browser-thumbnail-no-image']").filter(
        has_text=description)


def svg_text(page) -> str:
    """All text OHIF's annotation tools drew (SVG layer over the viewport)."""
    return page.evaluate("Array.from(document.querySelectorAll('svg text')).map(t => t.textContent).join('\\n')")


VIEWER_STATE_JS = """() => {
  // what cornerstone holds when an outline is not drawn: for the failure message (CI keeps no screenshots)
  const tools = window.cornerstoneTools, core = window.cornerstone, state = {};
  try { state.annotations = tools.annotation.state.getAllAnnotations().map(a => [a.metadata.toolName,
          (a.metadata.referencedImageId || '').slice(-12), a.isPreview ? 'preview' : '', a.invalidated ? 'inval' : '']);
  } catch (e) { state.annotations = String(e); }
  try { state.viewports = core.getEnabledElements().map(e => [e.viewportId, e.viewport.type,
          (e.viewport.getCurrentImageId ? e.viewport.getCurrentImageId() : '').slice(-12)]);
  } catch (e) { state.viewports = String(e); }
  try { state.toolGroups = tools.ToolGroupManager.getAllToolGroups().map(g => [g.id, Object.keys(g.viewportsInfo || {})]);
  } catch (e) { state.toolGroups = String(e); }
  state.svgTexts = document.querySelectorAll('svg text').length;
  return JSON.stringify(state);
}"""


def open_measurement_sr(page, description: str, ct_frames: int) -> None:
    """Open the measurement SR and wait until OHIF has drawn an outline's label.

    On a loaded machine OHIF now and then opens the SR viewport on the right slice without drawing its outlines
    (CI: SR badge and arrows shown, no SVG, and a second double-click on the SR, or stepping through its
    measurements, did not draw them either). A radiologist would open another series and the SR again, or reload
    the viewer; so does this, once each, before calling it a failure (with cornerstone's state in the message)."""
    drawn = "Array.from(document.querySelectorAll('svg text')).some(t => t.textContent.includes('Volume'))"
    states = []
    for attempt in range(3):
        if attempt == 1:  # another display set in the viewport, then the SR again: a new SR viewport
            page.locator("[data-cy='study-browser-thumbnail']").first.dblclick()
            wait_for_ct_stack(page, ct_frames)
        elif attempt == 2:
            page.reload()
            dismiss_tour(page)
            wait_for_ct_stack(page, ct_frames)
        series_entry(page, description).dblclick()
        try:
            page.wait_for_function(drawn, timeout=30_000)
            return
        except Exception:  # noqa: BLE001 - recorded, retried, reported below
            page.screenshot(path=str(ARTIFACTS / f"03_measurement_sr_not_shown_{attempt}.png"))
            states.append(page.evaluate(VIEWER_STATE_JS))
    (ARTIFACTS / "03_console.log").write_text("\n".join(page.browser_log.console))
    raise AssertionError("OHIF drew no outline of the measurement SR; cornerstone state per attempt:\n"
                         + "\n".join(states))


def wait_for_ct_stack(page, frames: int) -> None:
    """The overlay's "I:1 (1/48)": the whole CT series is the viewport's stack."""
    page.wait_for_function(
        "n => document.querySelector(\"[data-cy='viewport-overlay-bottom-right']\")?.innerText.includes('/' + n + ')')",
        arg=frames)

def wait_for_canvas_content(page, timeout_s: float = 30.0) -> np.ndarray:
    """Grey levels of the viewport canvas as the page shows it, polled until it is not blank (or the timeout)."""
    from PIL import Image

    deadline = time.monotonic() + timeout_s
    while True:
        png = page.locator("canvas.cornerstone-canvas").first.screenshot()
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
        if (pixels > 40).mean() > 0.05 or time.monotonic() > deadline:
            return pixels
        page.wait_for_timeout(500)


def test_ohif_server_serves_the_app_and_proxies_dicomweb(ohif, content) -> None:
    """Without a browser: SPA fallback, our app-config.js, COOP/COEP, and DICOMweb through the proxy with
    BulkDataURIs that point back at the proxy (Host passed through)."""
    import json
    import urllib.request

    def get(path: str, accept: str = "*/*"):
        request = urllib.request.Request(ohif.url + path, headers={"Accept": accept})
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read()

    status, headers, body = get(f"/viewer?StudyInstanceUIDs={content.study_instance_uid}")
    assert status == 200 and b"<html" in body[:200].lower()
    assert headers["Cross-Origin-Opener-Policy"] == "same-origin"
    assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    assert get("/app-config.js")[2].startswith(b"/** Written by tests/viewer/ohif_server.py")
    _, headers, body = get("/dicom-web/studies", "application/dicom+json")
    studies = json.loads(body)
    assert [s["0020000D"]["Value"][0] for s in studies] == [content.study_instance_uid]
    assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    _, _, body = get(f"/dicom-web/studies/{content.study_instance_uid}/series/{content.ct_series_instance_uid}"
                     "/metadata", "application/dicom+json")
    bulk = [i["7FE00010"]["BulkDataURI"] for i in json.loads(body) if "BulkDataURI" in i.get("7FE00010", {})]
    assert len(bulk) == len(content.ct_files) and all(uri.startswith(ohif.url + "/dicom-web/") for uri in bulk)


def coloured_fraction(page) -> float:
    """Share of viewport pixels with a clear hue: the CT is grey, segment overlays are coloured."""
    from PIL import Image

    png = page.locator("canvas.cornerstone-canvas").first.screenshot()
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    return float(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).mean())


# OHIF sometimes never hydrates the measurement SR when it is opened right after the CT (seen in about half of the
# full-suite runs here, never when the page is fresh): the whole flow runs again in a new page, at most twice.
@pytest.mark.flaky(reruns=2)
def test_ohif_shows_the_study_ct_measurements_narrative_and_seg(page, ohif, content) -> None:
    # 1. The study list (QIDO-RS through the proxy) lists the study; selecting it lists every series, results included.
    page.goto(ohif.url + "/", timeout=FIRST_LOAD_MS)
    row = page.locator("tr").filter(has_text=content.patient_id).first
    row.wait_for(timeout=FIRST_LOAD_MS)
    row_text = row.inner_text()
    assert all(modality in row_text for modality in ("CT", "SEG", "SR")), row_text
    assert str(len(content.all_files())) in row_text.split()  # instance count: CT slices + result objects
    row.click()
    for description in content.series_descriptions.values():
        page.get_by_text(description, exact=True).first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "01_study_list.png"))

    # 2. Opening it ("Basic Viewer"): every series is in the study browser and the CT is drawn (WADO-RS pixels).
    page.get_by_role("button", name="Basic Viewer").click()
    page.wait_for_url(re.compile(r"/viewer\?StudyInstanceUIDs=" + re.escape(content.study_instance_uid)))
    dismiss_tour(page)
    for description in content.series_descriptions.values():
        assert series_entry(page, description).count() == 1, description
    wait_for_ct_stack(page, len(content.ct_files))
    pixels = wait_for_canvas_content(page)
    assert (pixels > 40).mean() > 0.05 and pixels.std() > 20, "the CT viewport stayed blank"
    page.screenshot(path=str(ARTIFACTS / "02_ct.png"))

    # 3. The measurement SR opens in OHIF's SR viewport: each organ's outline is drawn, labelled with its finding
    # site and values; the viewport's arrows step through the organs (each on its own largest slice).
    open_measurement_sr(page, content.series_descriptions["measurement_sr"], len(content.ct_files))
    page.screenshot(path=str(ARTIFACTS / "03_measurement_sr.png"))
    shown: dict[str, str] = {}
    for step in range(2 * len(content.organs)):
        if step:
            page.locator("[data-cy='viewport-action-arrows-right']").click()
            page.wait_for_timeout(800)
        drawn = svg_text(page)
        for organ in content.organs:
            if f"Volume: {organ.volume_ml:.2f} cm3" in drawn:
                shown[organ.name] = drawn
        if len(shown) == len(content.organs):
            break
    assert set(shown) == {o.name for o in content.organs}, shown
    for organ in content.organs:
        assert f"Attenuation Coefficient: {organ.mean_hu:.2f} [hnsf'U]" in shown[organ.name], shown[organ.name]
        assert f": {organ.site}" in shown[organ.name], shown[organ.name]  # finding site "363698007: Liver"
    page.screenshot(path=str(ARTIFACTS / "04_measurement_sr_last_organ.png"))

    # 4. The narrative SR opens as a text tree with the model's questions and answers and the organ values.
    series_entry(page, content.series_descriptions["narrative_sr"]).dblclick()
    page.get_by_text("Impressions").first.wait_for()
    body = page.inner_text("body")
    for question, answer in zip(content.questions, content.answers):
        assert question in body and answer in body
    liver = next(o for o in content.organs if o.name == "liver")
    assert f"Liver: volume {liver.volume_ml:.1f} ml" in body, body
    page.screenshot(path=str(ARTIFACTS / "05_narrative_sr.png"))

    # 5. The SEG opens as a labelmap over the CT (after OHIF asks); its panel lists the organs by segment label.
    series_entry(page, content.series_descriptions["seg"]).dblclick()
    page.get_by_role("button", name="Yes").click()
    page.locator("[data-cy='panelSegmentation-btn']").click()
    for organ in content.organs:
        page.get_by_text(organ.name, exact=True).first.wait_for()
    page.wait_for_timeout(1_000)
    assert coloured_fraction(page) > 0.002, "no segment drawn over the CT"
    page.screenshot(path=str(ARTIFACTS / "06_seg.png"))

    assert page.browser_log.errors == []


def test_ohif_shows_the_findings_sr_questions_and_answers(page, ohif, content) -> None:
    """The findings SR (TID 2000, root Diagnostic Imaging Report) opens as OHIF's SR text tree: every question and
    its verbatim answer, labelled by concept name (SEPARATE continuity), and the coded finding with its presence.
    The key image references sit one level below the answers, where OHIF does not try to draw them."""
    open_viewer(page, ohif, content)
    series_entry(page, content.series_descriptions["findings_sr"]).dblclick()
    page.get_by_text(content.answers[-1]).first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "07_findings_sr.png"))
    body = page.inner_text("body")
    assert "Diagnostic Imaging Report" in body and "Findings" in body, body
    position = 0
    for question, answer in zip(content.questions, content.answers, strict=True):
        # in question order, each answer right after its question (OHIF puts a Finding's value in a <pre>)
        match = re.compile(re.escape(f"Question: {question}") + r"\s*Finding:\s*" + re.escape(answer)).search(
            body, position)
        assert match, body
        position = match.end()
    # the coded findings, each with its presence on the same line (OHIF never shows a content item's children)
    assert "Pleural effusion: Present" in body and "Nodule of lung: Present" in body, body
    assert "is not supported]" not in body, body  # no IMAGE item at a level OHIF renders
    assert page.browser_log.errors == []
