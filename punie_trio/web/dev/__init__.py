"""The dev app: the project's built site with live reload, rebuilt when sources change.

See ``docs/dev-app.md``. The pieces, bottom-up (pure ones first):

* ``_asgi``: ASGI types, header access, and the shielded send that ends a response;
* ``_events``: reload/status events, merging, and the SSE wire format;
* ``_http``: request path, Range, conditional request and content-type rules;
* ``_inject``: the browser script and where it goes in a page;
* ``_pages``: the plain 404 and "rebuilding" pages;
* ``_snapshot``: output snapshots and the reload decision;
* ``_broadcast``: fan-out to subscribers with bounded, merged pending state;
* ``_sse``: one ``/__reload__`` stream; ``_static``: file responses;
* ``_watch``: ignore rules and the watcher (``_inotify`` on Linux, watchfiles elsewhere);
  ``_builder``: the debounce/build loop;
* ``_app``: :class:`DevApp`, which ties them together.
"""

from __future__ import annotations

import logging
import urllib.parse
import webbrowser
from collections.abc import Callable

import trio

from ._app import RELOAD_PATH, DevApp
from ._broadcast import Broadcaster
from ._events import ReloadEvent, StatusEvent

__all__ = [
    "RELOAD_PATH",
    "Broadcaster",
    "DevApp",
    "ReloadEvent",
    "StatusEvent",
    "open_browser_when_ready",
]

log = logging.getLogger("punie_trio.dev")


async def _answers(host: str, port: int, target: str) -> bool:
    """Whether an HTTP request to the server gets any status line back."""
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError:
        return False
    async with stream:
        request = f"HEAD {target} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
        try:
            await stream.send_all(request.encode())
            return (await stream.receive_some(64)).startswith(b"HTTP/")
        except (OSError, trio.BrokenResourceError):
            return False


async def open_browser_when_ready(
    url: str,
    *,
    interval: float = 0.1,
    give_up_after: float = 60.0,
    opener: Callable[[str], object] = webbrowser.open,
) -> None:
    """Poll ``url`` until the server answers, then open it in the browser, once (``--open``).

    Error handling: a server that never answers within ``give_up_after`` seconds is logged and
    the browser is not opened; ``webbrowser.open`` may block (it can start a process), so it
    runs in a thread, abandoned on cancel: with ``$BROWSER`` set (or a console browser) it
    waits for the browser to exit, and a server told to stop waited for the user to close
    the browser. The browser stays open (the user's, not the server's), its thread left to
    end with it.
    """
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = parts.path or "/"
    with trio.move_on_after(give_up_after):
        while True:
            with trio.move_on_after(max(interval, 1.0)):
                if await _answers(host, port, target):
                    break
            await trio.sleep(interval)
        await trio.to_thread.run_sync(opener, url, abandon_on_cancel=True)
        return
    log.warning("not opening a browser: %s did not answer within %.0fs", url, give_up_after)
