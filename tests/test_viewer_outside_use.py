"""The viewer abstains on an image outside intended use (issue 28), in a real browser (Debian's Chromium through
Playwright) against the gateway in front of `medpipe serve` with the SHIPPED brain MRI model: a chest X-ray, which
that model's OOD guard flags, is shown with "Outside intended use" and no class bars, no heat map, no confidence and
no preselected label; a brain MRI slice in the same upload keeps all of them."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from gateway_support import start_gateway, stop

pytestmark = pytest.mark.slow
playwright_api = pytest.importorskip("playwright.sync_api")

from test_viewer import CHROMIUM, CHROMIUM_ARGS, PASSWORD, SHOTS, USER, sign_in, upload  # noqa: E402
from test_serving import MODEL, start_server, stop_server  # noqa: E402

CHEST = sorted((ROOT / "sample_data" / "chest_xray" / "NORMAL").iterdir())[0]
GLIOMA = ROOT / "sample_data" / "brain_mri" / "glioma" / "Tr-gl_0960.jpg"


@pytest.fixture(scope="module")
def shipped_viewer(tmp_path_factory):
    base = tmp_path_factory.mktemp("viewer_outside")
    repo = base / "models"
    shutil.copytree(ROOT / "models" / "shipped", repo)
    config = repo / "models.config"  # its base_path is the compose mount point: here, the copy
    config.write_text(config.read_text().replace('"/models/brain_mri"', f'"{repo / MODEL}"'))
    upstream, upstream_grpc, _ = start_server(repo, base)
    users = base / "users.txt"
    subprocess.run([sys.executable, "-m", "serving.viewer.users", "add", "--file", str(users), "--user", USER,
                    "--scope", f"predict:{MODEL}", "--password-stdin"], input=PASSWORD + "\n", text=True,
                   check=True, cwd=ROOT, capture_output=True)
    process, _, rest = start_gateway(
        ["--upstream", upstream_grpc, "--audit-log", str(base / "audit.jsonl"), "--model-repository", str(repo),
         "--viewer-users", str(users), "--feedback-dir", str(base / "feedback")], base / "gateway.log")
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        with playwright_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            yield {"rest": rest, "browser": browser}
            browser.close()
    finally:
        stop(process)
        stop_server(upstream)


def test_an_image_outside_intended_use_shows_no_class_bars_heat_map_or_preselected_label(shipped_viewer):
    context = shipped_viewer["browser"].new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        sign_in(page, shipped_viewer["rest"])
        upload(page, CHEST, GLIOMA)
        page.screenshot(path=str(SHOTS / "outside_intended_use.png"), full_page=True)
        chest, brain = page.locator("section.result").all()
        assert "Outside intended use" in chest.inner_text()
        assert chest.locator("table.bars").count() == 0 and chest.locator("progress").count() == 0
        assert chest.locator("img.overlay").count() == 0 and chest.get_by_label("Heat map opacity").count() == 0
        assert chest.locator(".predicted-class").count() == 0 and chest.locator(".confidence").count() == 0
        # outside intended use it can only be marked unusable: no class to choose (issue 34: feedback cannot poison
        # retraining), and the in-scope slice's label box has nothing preselected: the reader chooses
        assert chest.get_by_label("Correct label").count() == 0
        assert chest.get_by_role("button", name="Mark image unusable").count() == 1
        assert brain.get_by_label("Correct label").evaluate("select => select.value") == ""
        # the brain slice beside it keeps its finding, bars and heat map
        assert brain.locator(".predicted-class").count() == 1 and brain.locator("table.bars tbody tr").count() == 4
        assert brain.locator("img.overlay").count() == 1
    finally:
        context.close()
