"""The web viewer in a real browser (Debian's Chromium driven by Playwright, no browser download), served by the
gateway in front of `medpipe serve`, over a repository filled by the real `medpipe publish` from the session's
trained sample run.

The tests sign in with a local account, upload the sample DICOM, check the class shown equals `medpipe predict`'s,
move the heat-map control, correct a label and find the feedback record (and the partition `medpipe feedback`
builds from it), and refuse bad uploads with a message on the page while the gateway keeps serving. Each page is
saved as a screenshot under test_output/viewer/.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SAMPLE, run_module
from gateway_support import huge_png, start_gateway, stop

pytestmark = pytest.mark.slow
playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed: run scripts/install_system_deps.sh (as root)",
                allow_module_level=True)

from test_serving import MODEL, publish, start_server, stop_server  # noqa: E402

SHOTS = Path(os.environ.get("MEDPIPE_TEST_OUTPUT", ROOT / "test_output")) / "viewer"
DICOM = SAMPLE / "dicom" / "MR2_J2KI.dcm"
USER, PASSWORD = "dr_viewer", "correct horse battery"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def viewer(trained_sample_run, tmp_path_factory):
    base = tmp_path_factory.mktemp("viewer")
    repo = base / "models"
    publish(trained_sample_run, repo, "--label", "stable")
    upstream, upstream_grpc, _ = start_server(repo, base)
    users = base / "users.txt"
    subprocess.run([sys.executable, "-m", "serving.viewer.users", "add", "--file", str(users), "--user", USER,
                    "--scope", f"predict:{MODEL}", "--password-stdin"], input=PASSWORD + "\n", text=True,
                   check=True, cwd=ROOT, capture_output=True)
    feedback = base / "feedback"
    process, grpc_address, rest = start_gateway(
        ["--upstream", upstream_grpc, "--audit-log", str(base / "audit.jsonl"), "--request-log",
         str(base / "requests"), "--model-repository", str(repo), "--viewer-users", str(users),
         "--feedback-dir", str(feedback)], base / "gateway.log")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield {"rest": rest, "grpc": grpc_address, "upstream": upstream_grpc, "base": base, "feedback": feedback, "browser": browser,
               "audit": base / "audit.jsonl", "requests": base / "requests", "process": process}
        browser.close()
    assert stop(process) == 0
    stop_server(upstream)


@pytest.fixture
def page(viewer):
    context = viewer["browser"].new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


def sign_in(page, rest: str) -> None:
    page.goto(f"{rest}/viewer/")
    assert page.url.endswith("/viewer/login"), "an anonymous visitor is sent to the sign-in page"
    page.get_by_label("User name").fill(USER)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{rest}/viewer/")


def upload(page, *files) -> None:
    page.get_by_label("DICOM, PNG, JPEG or TIFF files", exact=False).set_input_files(list(files))
    page.get_by_role("button", name="Classify").click()
    page.wait_for_load_state()


def test_wrong_password_is_refused_and_audited(viewer, page):
    page.goto(f"{viewer['rest']}/viewer/login")
    page.get_by_label("User name").fill(USER)
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Sign in").click()
    assert "wrong password" in page.get_by_role("alert").inner_text()
    page.screenshot(path=str(SHOTS / "login_refused.png"), full_page=True)
    lines = [json.loads(line) for line in viewer["audit"].read_text().splitlines()]
    assert any(l.get("event") == "sign_in" and l.get("outcome") == "UNAUTHENTICATED" for l in lines)
    assert "not the password" not in viewer["audit"].read_text()


def test_upload_a_dicom_read_the_finding_move_the_overlay_and_correct_the_label(viewer, page, upstream_answer):
    sign_in(page, viewer["rest"])
    page.screenshot(path=str(SHOTS / "upload.png"), full_page=True)
    upload(page, DICOM)
    page.screenshot(path=str(SHOTS / "results.png"), full_page=True)
    result = page.locator("section.result").first
    expected = upstream_answer(DICOM)
    if expected.get("in_distribution") is False:
        assert "Outside intended use" in result.inner_text()
    else:
        assert result.locator(".predicted-class").inner_text() == expected["class"]
        shown = float(result.locator(".confidence").inner_text().rstrip("%"))
        assert abs(shown - 100 * expected["confidence"]) < 0.06
    assert "For research use, not a medical device" in page.inner_text("body")
    assert page.locator("table.bars tbody tr").count() == 4

    # The heat map overlay and its control, driven from the keyboard as a reader would.
    overlay = result.locator("img.overlay")
    assert overlay.count() == 1, "the explain signature's Grad-CAM heat map is shown"
    before = float(overlay.evaluate("e => getComputedStyle(e).opacity"))
    slider = result.get_by_label("Heat map opacity")
    slider.focus()
    for _ in range(3):
        page.keyboard.press("ArrowRight")
    after = float(overlay.evaluate("e => getComputedStyle(e).opacity"))
    assert after > before
    slider.fill("10")
    assert float(overlay.evaluate("e => getComputedStyle(e).opacity")) == pytest.approx(0.1)

    # Correct the label: the record `medpipe feedback` reads, then the partition it builds from it. The label box
    # starts on a prompt, never on a class; an image outside intended use can only be marked unusable.
    request_id = result.get_attribute("data-request-id")
    if expected.get("in_distribution") is False:
        assert result.get_by_label("Correct label").count() == 0
        result.get_by_role("button", name="Mark image unusable").click()
        page.wait_for_load_state()
        assert "marked unusable" in page.inner_text("main")
        rows = list(csv.DictReader((viewer["feedback"] / "confirmed.csv").open()))
        assert rows == [{"request_id": request_id, "label": "unusable", "image_path": ""}]
        page.goto(f"{viewer['rest']}/viewer/models/{MODEL}")
        assert f"Model {MODEL}" in page.inner_text("h1")
        return
    labels = result.get_by_label("Correct label")
    assert labels.input_value() == "", "no class is preselected"
    options = [o for o in labels.locator("option:not([disabled])").all_inner_texts()]
    corrected = next(o for o in options if o != expected.get("class"))
    labels.select_option(corrected)
    result.get_by_role("button", name="Save label").click()
    page.wait_for_load_state()
    assert "recorded as " + corrected in page.inner_text("main")
    page.screenshot(path=str(SHOTS / "feedback_saved.png"), full_page=True)
    rows = list(csv.DictReader((viewer["feedback"] / "confirmed.csv").open()))
    assert rows == [{"request_id": request_id, "label": corrected, "image_path": f"images/{request_id}.png"}]
    assert (viewer["feedback"] / "images" / f"{request_id}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    partition = viewer["base"] / "partition"
    run_module("serving.feedback", "--labels", str(viewer["feedback"] / "confirmed.csv"), "--requests",
               str(viewer["requests"]), "--output", str(partition))
    manifest = list(csv.DictReader((partition / "manifest.csv").open()))
    assert manifest == [{"path": f"{corrected}/{request_id}.png", "label": corrected}]
    audit = [json.loads(line) for line in viewer["audit"].read_text().splitlines()]
    feedback_lines = [l for l in audit if l.get("event") == "feedback"]
    assert feedback_lines[-1]["identity"] == USER and feedback_lines[-1]["request_id"] == request_id

    # The model page: card, evaluation, drift.
    page.goto(f"{viewer['rest']}/viewer/models/{MODEL}")
    assert f"Model {MODEL}" in page.inner_text("h1")
    page.screenshot(path=str(SHOTS / "model.png"), full_page=True)


@pytest.mark.parametrize("name,content,message", [
    ("notes.txt", b"this is a text file, not an image\n", "could not be read as a medical image"),
    ("huge.png", None, "could not be read as a medical image"),
    ("empty.png", b"", "the file is empty"),
])
def test_bad_uploads_show_a_clear_message_and_the_gateway_keeps_serving(viewer, page, tmp_path, name, content,
                                                                         message):
    path = tmp_path / name
    path.write_bytes(huge_png(20000, 20000) if content is None else content)
    sign_in(page, viewer["rest"])
    upload(page, path)
    alert = page.get_by_role("alert").inner_text()
    assert message in alert and name not in alert, "a clear message that does not echo the file name"
    page.screenshot(path=str(SHOTS / f"refused_{path.stem}.png"), full_page=True)
    # ... and the next good upload is answered.
    page.goto(f"{viewer['rest']}/viewer/")
    upload(page, DICOM)
    assert page.locator("section.result").count() == 1


def test_the_viewer_is_not_open_without_signing_in(viewer):
    import httpx

    response = httpx.post(f"{viewer['rest']}/viewer/predict", files={"images": ("a.png", b"x")})
    assert response.status_code == 303 and response.headers["location"] == "/viewer/login"
    assert httpx.get(f"{viewer['rest']}/viewer/models/{MODEL}").status_code == 303


@pytest.fixture(scope="module")
def upstream_answer(viewer):
    """`medpipe predict` against the gateway's upstream (TF Serving's API; preprocessing on the client)."""
    cache: dict = {}

    def answer(path: Path) -> dict:
        if path not in cache:
            result = run_module("serving.client", "--server", viewer["upstream"], "--model", MODEL, str(path))
            cache[path] = json.loads(result.stdout.strip().splitlines()[-1])
        return cache[path]

    return answer

