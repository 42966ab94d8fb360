"""Live reload in a real headless Chromium (``nox -s browser``; ``pytest -m browser``).

The server is the real DevApp under real Hypercorn in the test's Trio loop; Playwright's sync
API (asyncio inside) runs the whole browser scenario in one worker thread.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
from devsupport import BuildProject, running, write

from punie_trio.web.dev import DevApp

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
INDEX = (
    '<!doctype html><html><head><link rel="stylesheet" href="/style.css"></head>'
    "<body><h1>{}</h1></body></html>"
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's /usr/bin/chromium"),
]


def _scenario(url: str, project: BuildProject, dev: DevApp) -> None:
    from playwright.sync_api import sync_playwright

    src = project.root / "src"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            page.goto(url + "/")
            assert page.text_content("h1") == "v1"
            page.evaluate("window.__marker = 'still here'")
            deadline = time.monotonic() + 20
            while dev.broadcaster.subscriber_count < 1:  # the page's EventSource is open
                assert time.monotonic() < deadline, "the page never connected"
                time.sleep(0.02)

            # CSS only: the stylesheet is swapped in place, the page is not reloaded.
            write(src / "style.css", "h1 { color: rgb(0, 0, 255); }")
            page.wait_for_function(
                "getComputedStyle(document.querySelector('h1')).color === 'rgb(0, 0, 255)'"
            )
            assert page.evaluate("window.__marker") == "still here"
            assert page.evaluate("document.querySelectorAll('link[rel=stylesheet]').length") == 1

            # HTML: a full reload (the window marker is gone), new content.
            write(src / "index.html", INDEX.format("v2"))
            page.wait_for_function("document.querySelector('h1').textContent === 'v2'")
            assert page.evaluate("window.__marker") is None
            assert page.evaluate("window.__punieReload.generation") >= 3

            # A failing build: the overlay, with the output escaped; the next good build clears it.
            write(src / "fail", "")
            page.wait_for_selector("#__punie_overlay")
            text = page.text_content("#__punie_overlay") or ""
            assert "exit status 3" in text and "<b>boom</b> the build failed" in text
            assert page.query_selector("#__punie_overlay b") is None  # text, not markup
            (src / "fail").unlink()
            page.wait_for_selector("#__punie_overlay", state="detached")
        finally:
            browser.close()


@pytest.mark.browser
async def test_live_reload_in_chromium(tmp_path: Path) -> None:
    project = BuildProject.create(tmp_path)
    write(project.root / "src" / "index.html", INDEX.format("v1"))
    write(project.root / "src" / "style.css", "h1 { color: rgb(255, 0, 0); }")
    dev = DevApp(
        site_dir=project.site,
        project_root=project.root,
        closing=trio.Event(),
        build_cmd=project.command(),
        debounce=0.05,
    )
    with trio.fail_after(120):
        async with running(dev) as url:
            await trio.to_thread.run_sync(_scenario, url, project, dev)
