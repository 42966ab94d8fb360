"""Live reload in a real headless Chromium (``nox -s browser``; ``pytest -m browser``).

The server is the real DevApp under real Hypercorn in the test's Trio loop; Playwright's sync
API (asyncio inside) runs the whole browser scenario in one worker thread.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
    dev = project.dev_app(debounce=0.05)
    with trio.fail_after(120):
        async with running(dev) as url:
            await trio.to_thread.run_sync(_scenario, url, project, dev)


@contextlib.contextmanager
def _page() -> Iterator[Any]:
    """A fresh page in a headless Chromium, closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            yield page
        finally:
            browser.close()


def _wait_for(predicate: Callable[[], bool], what: str) -> None:
    """Poll a server-side fact from the browser's thread (the server runs in the test's loop)."""
    deadline = time.monotonic() + 20
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


FRAMES = 6
GALLERY = (
    '<!doctype html><html><head><link rel="stylesheet" href="/style.css"></head><body>'
    + "".join(f'<iframe src="/ex{i}.html"></iframe>' for i in range(FRAMES))
    + "</body></html>"
)
EXAMPLE = (
    '<!doctype html><html><head><link rel="stylesheet" href="/style.css"></head>'
    "<body><h1>{}</h1></body></html>"
)


def _frames_scenario(url: str, site: Path, dev: DevApp) -> None:
    with _page() as page:
        page.goto(url + "/")  # waits for the frames' load events too
        # The parent and six frames each held a stream: Chromium's six connections per
        # host, and this request never went out (found by a dev app audit).
        loaded = page.evaluate(
            """() => new Promise((resolve, reject) => {
                const img = new Image();
                img.onload = () => resolve(true);
                img.onerror = () => reject(new Error("image failed"));
                img.src = "/pic.svg";
            })"""
        )
        assert loaded is True
        _wait_for(lambda: dev.broadcaster.subscriber_count == 1, "one stream for the tab")
        frame = page.frame_locator("iframe").first
        page.frames[1].evaluate("window.__marker = 'frame kept'")
        # CSS only: swapped in the frames too, which are not reloaded.
        write(site / "style.css", "h1 { color: rgb(0, 0, 255); }")
        page.frames[1].wait_for_function(
            "getComputedStyle(document.querySelector('h1')).color === 'rgb(0, 0, 255)'"
        )
        assert page.frames[1].evaluate("window.__marker") == "frame kept"
        # A frame's page changed: the connected window reloads, and the frames with it.
        write(site / "ex0.html", EXAMPLE.format("frame v2"))
        frame.locator("h1", has_text="frame v2").wait_for()
        assert dev.broadcaster.subscriber_count >= 1


async def _in_browser(
    site: Path, root: Path, scenario: Callable[[str, Path, DevApp], None]
) -> None:
    """Serve ``site`` (no build, no debounce) and run the synchronous browser
    ``scenario(url, site, dev)`` in a thread."""
    dev = DevApp(site_dir=site, project_root=root, closing=trio.Event(), debounce=0)
    with trio.fail_after(120):
        async with running(dev) as url:
            await trio.to_thread.run_sync(scenario, url, site, dev)


@pytest.mark.browser
async def test_same_origin_frames_share_the_tabs_one_stream(tmp_path: Path) -> None:
    site = tmp_path / "site"
    write(site / "index.html", GALLERY)
    for i in range(FRAMES):
        write(site / f"ex{i}.html", EXAMPLE.format(f"frame {i}"))
    write(site / "style.css", "h1 { color: rgb(255, 0, 0); }")
    write(site / "pic.svg", '<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>')
    await _in_browser(site, tmp_path, _frames_scenario)


def _cross_origin_scenario(url: str, site: Path, dev: DevApp) -> None:
    port = url.rsplit(":", 1)[1]
    write(
        site / "outer.html",
        f'<!doctype html><body><iframe src="http://localhost:{port}/inner.html"></iframe></body>',
    )
    with _page() as page:
        page.goto(url + "/outer.html")
        # The outer page (127.0.0.1) and the preview in it (localhost): two origins, so
        # the inner one cannot see the outer one's script and connects itself.
        _wait_for(lambda: dev.broadcaster.subscriber_count == 2, "both windows connect")


@pytest.mark.browser
async def test_a_page_in_a_cross_origin_frame_still_connects(tmp_path: Path) -> None:
    site = tmp_path / "site"
    write(site / "inner.html", EXAMPLE.format("inner"))
    await _in_browser(site, tmp_path, _cross_origin_scenario)


CSP_PAGE = (
    "<!doctype html><html><head>"
    '<meta http-equiv="Content-Security-Policy" content="script-src \'self\'">'
    "</head><body><h1>{}</h1></body></html>"
)


def _csp_scenario(url: str, site: Path, dev: DevApp) -> None:
    with _page() as page:
        page.goto(url + "/")
        # The inline script was refused by the policy: the page never connected.
        _wait_for(lambda: dev.broadcaster.subscriber_count == 1, "the page connects")
        write(site / "index.html", CSP_PAGE.format("v2"))
        page.locator("h1", has_text="v2").wait_for()  # (the policy forbids eval)


@pytest.mark.browser
async def test_live_reload_under_a_content_security_policy(tmp_path: Path) -> None:
    site = tmp_path / "site"
    write(site / "index.html", CSP_PAGE.format("v1"))
    await _in_browser(site, tmp_path, _csp_scenario)
