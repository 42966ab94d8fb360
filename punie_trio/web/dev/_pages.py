"""The dev app's own pages: a plain 404, and the "rebuilding" page (sans-I/O).

The rebuilding page answers a page that does not exist *yet* while a build runs (the build
may be about to write it). It refreshes itself two ways: the injected script reloads it on
``build_ok`` / ``build_error`` (``pending`` in its state), and a ``<meta http-equiv=refresh>``
covers a browser without EventSource. It never loops: when no build runs, a missing page is a
plain 404, which has no meta refresh.
"""

from __future__ import annotations

import html

REBUILD_REFRESH_SECONDS = 2


def not_found_page(path: str) -> bytes:
    return (
        "<!doctype html>\n<html><head><meta charset=utf-8><title>404 Not Found</title></head>\n"
        "<body><h1>404 Not Found</h1>\n"
        f"<p>No file for <code>{html.escape(path)}</code> in the site.</p>\n</body></html>\n"
    ).encode()


def rebuilding_page(path: str) -> bytes:
    return (
        "<!doctype html>\n<html><head><meta charset=utf-8>"
        f'<meta http-equiv="refresh" content="{REBUILD_REFRESH_SECONDS}">'
        "<title>Rebuilding\u2026</title></head>\n"
        "<body><h1>Rebuilding\u2026</h1>\n"
        f"<p><code>{html.escape(path)}</code> does not exist yet; a build is running. "
        "This page reloads when it finishes.</p>\n</body></html>\n"
    ).encode()
