"""Screenshot the web viewer's result page for one image, in Debian's Chromium (docs/viewer.png is made this way).

    make demo                     # leaves the server and the gateway running; prints "Web viewer ...: URL"
    .venv/bin/python scripts/viewer_screenshot.py --url URL --model brain_mri_validated \
        --image sample_data/brain_mri/glioma/Tr-gl_0000.jpg --output docs/viewer.png

The demo's gateway admits anonymous callers on loopback; against a gateway with local accounts pass --user and give
the password on standard input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="the viewer's URL, e.g. http://127.0.0.1:PORT/viewer/")
    parser.add_argument("--image", required=True, help="a DICOM, PNG, JPEG or TIFF file to classify")
    parser.add_argument("--model", help="model to choose on the upload page (default: the page's default)")
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.add_argument("--user", help="sign in with this local account (password on standard input)")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 860})
        page.goto(args.url)
        if args.user:
            page.get_by_label("User name").fill(args.user)
            page.get_by_label("Password").fill(sys.stdin.readline().rstrip("\n"))
            page.get_by_role("button", name="Sign in").click()
        if args.model:
            page.get_by_label("Model").select_option(args.model)
        page.get_by_label("DICOM, PNG, JPEG or TIFF files", exact=False).set_input_files([args.image])
        page.get_by_role("button", name="Classify").click()
        page.wait_for_selector("section.result")
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=args.output, full_page=True)
        print(page.locator("section.result").first.inner_text().splitlines()[0:6])
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
