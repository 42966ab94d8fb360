"""The dev app: an ASGI app (static site + ``/__reload__``) and its build loop.

The server routes every path it does not own to :meth:`DevApp.__call__` and starts
:meth:`DevApp.run` in its root nursery with ``await nursery.start(dev.run)``.
"""

from __future__ import annotations

import functools
import gzip
import logging
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from ..._mounts import may_hang
from ..._threads import RootNotAnswering
from . import _events, _http, _pages
from ._asgi import Message, Receive, Scope, Send, departed, header, respond
from ._broadcast import Broadcaster
from ._builder import BUILD_START_DELAY, KILL_GRACE, BuildLoop
from ._inject import SCRIPT_BYTES, SCRIPT_ETAG, SCRIPT_PATH, inject
from ._sse import HEADERS as SSE_HEADERS
from ._sse import stream_events
from ._static import StaticSite, Vanished
from ._watch import Backend, IgnoreRules, PendingChanges, watch

access_log = logging.getLogger("punie_trio.access")
log = logging.getLogger("punie_trio.dev")

RELOAD_PATH = "/__reload__"
_PAGE_SUFFIXES = ("", ".html", ".htm")
#: The request headers static serving reads (raw lower-case name -> key in its dict).
_REQUEST_HEADERS = {
    name.encode(): name
    for name in (
        "accept",
        "accept-encoding",
        "if-none-match",
        "if-modified-since",
        "range",
        "if-range",
    )
}


def _is_page_request(path: str, accept: str | None) -> bool:
    """Would a browser show this as a document? (Only those get the rebuilding page.)"""
    if accept and "text/html" in accept:
        return True
    last = path.rsplit("/", 1)[-1]
    return path.endswith("/") or "." not in last or last.lower().endswith(_PAGE_SUFFIXES[1:])


@attrs.define(eq=False)
class DevApp:
    """Serves the built site with live reload, and rebuilds it when sources change.

    Resource handling: :meth:`run` owns the watcher and the build loop (both in its nursery;
    cancelling ``run`` stops them and any running build). Each ``/__reload__`` request owns its
    subscriber and its disconnect watcher for the length of that request. ``closing`` ends every
    open stream with a final ``shutdown`` event so the server can drain.
    """

    site_dir: Path
    project_root: Path
    closing: trio.Event
    build_cmd: str | None = None
    watch: Sequence[Path] = ()
    ignore: Sequence[str] = ()
    no_watch: bool = False
    debounce: float = 0.2
    build_start_delay: float = BUILD_START_DELAY
    #: Seconds a stopped build gets between SIGTERM and SIGKILL (``BuildLoop.kill_grace``).
    kill_grace: float = KILL_GRACE
    data_dir: Path | None = None
    access_log: bool = False
    keepalive: float = 15.0
    #: Which watcher: "auto" (inotify on Linux, else watchfiles), "inotify" or "watchfiles".
    watcher: Backend = "auto"
    broadcaster: Broadcaster = attrs.field(init=False, factory=Broadcaster)
    pending: PendingChanges = attrs.field(init=False, factory=PendingChanges)
    loop: BuildLoop = attrs.field(init=False)
    static: StaticSite = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.loop = BuildLoop(
            site_dir=self.site_dir,
            project_root=self.project_root,
            broadcaster=self.broadcaster,
            pending=self.pending,
            build_cmd=self.build_cmd,
            debounce=self.debounce,
            build_start_delay=self.build_start_delay,
            kill_grace=self.kill_grace,
        )
        self.static = StaticSite(self.site_dir)

    # -- watch and build ---------------------------------------------------------------

    def watch_paths(self) -> list[Path]:
        """``watch`` or the project root; without a build command the site must be watched
        too (its own changes are what trigger reloads then), so it is added when outside."""
        paths = list(self.watch) or [self.project_root]
        if not self.watch and self.build_cmd is None:
            site = self.site_dir.resolve()
            if not any(site.is_relative_to(p.resolve()) for p in paths):
                paths.append(self.site_dir)
        return paths

    def ignore_rules(self) -> IgnoreRules:
        """Defaults + ``ignore``; the data dir always, the site dir only with a build command
        (so a build never triggers itself, while without one site changes must get through)."""
        dirs = [self.data_dir] if self.data_dir is not None else []
        if self.build_cmd is not None:
            dirs.append(self.site_dir)
        return IgnoreRules.build(
            self.watch_paths(), self.ignore, dirs, project_root=self.project_root
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch -> debounce -> build -> broadcast, until cancelled.

        Started once the watches are registered and the initial build finished (at once
        without a build command), so no change after ``started`` is missed.
        """
        remote = await self.static.in_thread(may_hang, self.site_dir)
        self.static.remote = self.loop.remote = remote
        if remote:
            log.info(
                "the site directory %s is on a network or FUSE file system: a cached file's "
                "stat and the snapshot after a build run in threads",
                self.site_dir,
            )
        await self.loop.prepare()
        try:
            async with trio.open_nursery() as nursery:
                if not self.no_watch:
                    await nursery.start(
                        functools.partial(
                            watch,
                            self.watch_paths(),
                            self.ignore_rules(),
                            self.pending,
                            backend=self.watcher,
                        )
                    )
                if self.build_cmd is not None:
                    await self.loop.cycle()
                task_status.started()
                await self.loop.run()
        finally:
            # What the last build left running (a `daemon &`) must not outlive the server.
            with trio.CancelScope(shield=True):
                await self.loop.stop_leftovers()

    # -- ASGI ---------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(receive, send)
            return
        if kind != "http":
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 1000})
            return
        method = scope["method"]
        path = scope["path"]
        if path == RELOAD_PATH:
            if method == "HEAD":
                # Allowed wherever GET is (RFC 9110 9.3.2; it was 405): the stream's status
                # and header fields, no body, and no stream registered for it.
                await respond(send, 200, SSE_HEADERS, b"", head=True)
                return
            if method != "GET":
                await _method_not_allowed(send, b"GET, HEAD")
                return
            position = _events.parse_since(header(scope, b"last-event-id"))
            if position is None:
                query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
                position = _events.parse_since(query.get("since", [None])[-1])
            run, since = position if position is not None else (None, None)
            await stream_events(
                self.broadcaster,
                since,
                receive,
                send,
                closing=self.closing,
                keepalive=self.keepalive,
                run=run,
            )
            return
        if method not in ("GET", "HEAD"):
            await _method_not_allowed(send, b"GET, HEAD")
            return
        if path == SCRIPT_PATH:
            await _serve_script(scope, send, head=method == "HEAD")
            return
        gone = departed(send)
        if gone():
            await _refuse_departed(send)
            return
        if not self.access_log:
            await self._serve(scope, send, head=method == "HEAD", gone=gone)
            return
        await self._serve_logged(scope, send, head=method == "HEAD", gone=gone)

    async def _serve_logged(
        self, scope: Scope, send: Send, *, head: bool, gone: Callable[[], bool]
    ) -> None:
        began = time.perf_counter()
        status = 0
        length = 0

        async def logged_send(message: Message) -> None:
            nonlocal status, length
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                length += len(message.get("body", b""))
            await send(message)

        try:
            await self._serve(scope, logged_send, head=head, gone=gone)
        finally:
            client = scope.get("client") or ("-", 0)
            target = scope.get("raw_path") or scope["path"].encode()
            if scope.get("query_string"):
                target += b"?" + scope["query_string"]
            access_log.info(
                '%s "%s %s" %d %d %.1fms',
                client[0],
                scope["method"],
                target.decode("latin-1"),
                status,
                length,
                (time.perf_counter() - began) * 1000,
            )

    async def _serve(
        self, scope: Scope, send: Send, *, head: bool, gone: Callable[[], bool]
    ) -> None:
        """A site file, or the page for a missing one; a 503 naming the site directory when
        its file system does not answer (every one of its threads busy for ``ROOT_WAIT``
        seconds: nothing has been sent then, see ``StaticSite._stream``)."""
        try:
            await self._serve_site(scope, send, head=head, gone=gone)
        except RootNotAnswering as exc:
            log.warning("%s", exc)
            body = f"503 Service Unavailable: {exc}\n".encode()
            headers = [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", b"%d" % len(body)),
                (b"cache-control", b"no-store"),
                (b"retry-after", b"30"),
            ]
            await respond(send, 503, headers, body, head=head)

    async def _serve_site(
        self, scope: Scope, send: Send, *, head: bool, gone: Callable[[], bool]
    ) -> None:
        path: str = scope["path"]
        request: dict[str, str] = {}
        for key, value in scope.get("headers", ()):
            name = _REQUEST_HEADERS.get(bytes(key).lower())
            if name is not None and name not in request:  # the first one counts
                request[name] = bytes(value).decode("latin-1")
        found = await self.static.find(path)
        if found.kind == "redirect":
            location = _http.directory_location(path, scope.get("query_string") or b"")
            await respond(send, 301, [(b"location", location), (b"content-length", b"0")], b"")
            return
        if found.kind == "file":
            state = self.broadcaster.page_state()
            try:
                await self.static.serve_file(
                    found, request, send, head=head, state=state, gone=gone
                )
                return
            except Vanished:
                pass  # deleted since the lookup (a build emptying its output): missing now
        await self._not_found(path, request, send, head=head)

    async def _not_found(
        self, path: str, request: dict[str, str], send: Send, *, head: bool
    ) -> None:
        state: dict[str, Any] = self.broadcaster.page_state()
        ctype = "text/html; charset=utf-8"  # our own pages
        headers = [(b"cache-control", b"no-store")]
        if self.broadcaster.building and _is_page_request(path, request.get("accept")):
            state["pending"] = True
            body = inject(_pages.rebuilding_page(path), state)
            headers.append((b"retry-after", b"1"))
            status = 503
        else:
            page = await self.static.read_html("404.html")
            if page is None:
                body = inject(_pages.not_found_page(path), state)
            else:  # the site's own, in the charset it declares
                ctype = _http.content_type("404.html", page[: _http.SNIFF_BYTES])
                body = inject(page, state, _http.charset(ctype))
            status = 404
        headers.append((b"content-type", ctype.encode()))
        headers.append((b"content-length", b"%d" % len(body)))
        await respond(send, status, headers, body, head=head)


_SCRIPT_GZIP = gzip.compress(SCRIPT_BYTES, compresslevel=9, mtime=0)


async def _serve_script(scope: Scope, send: Send, *, head: bool) -> None:
    """The live-reload script, served rather than inlined so a page's CSP ``script-src
    'self'`` admits it. ``no-cache`` with an ETag: every page load revalidates it (a 304),
    so a tab never runs a script older than the server it talks to."""
    headers: list[tuple[bytes, bytes]] = [
        (b"cache-control", b"no-cache"),
        (b"vary", b"accept-encoding"),
    ]
    gzipped = _http.accepts_gzip(_header_text(scope, b"accept-encoding"))
    etag = SCRIPT_ETAG[:-1] + '-gz"' if gzipped else SCRIPT_ETAG
    headers.append((b"etag", etag.encode()))
    if_none_match = _header_text(scope, b"if-none-match")
    if if_none_match is not None and _http.etag_matches(if_none_match, etag):
        await respond(send, 304, headers, b"")
        return
    body = _SCRIPT_GZIP if gzipped else SCRIPT_BYTES
    headers.append((b"content-type", b"text/javascript; charset=utf-8"))
    if gzipped:
        headers.append((b"content-encoding", b"gzip"))
    headers.append((b"content-length", b"%d" % len(body)))
    await respond(send, 200, headers, body, head=head)


def _header_text(scope: Scope, name: bytes) -> str | None:
    value = header(scope, name)
    return None if value is None else value.decode("latin-1")


async def _refuse_departed(send: Send) -> None:
    """Answer a request whose connection is known to be gone (a write to it failed) with an
    empty ``Connection: close`` response, at once and without touching a file.

    Why: the requests a client pipelined before it left are handed to the app one by one
    after its close (Hypercorn does not read the close while they wait), and each was served
    in full to a closed socket. ``Connection: close`` makes Hypercorn end the connection
    after this response and drop the requests still queued behind it."""
    await respond(send, 503, [(b"connection", b"close"), (b"content-length", b"0")], b"")


async def _method_not_allowed(send: Send, allow: bytes) -> None:
    """405 naming the methods to use, worded as the server's own routes word it (it said
    only "method not allowed")."""
    body = b"Method Not Allowed: use " + allow + b"\n"
    headers = [
        (b"allow", allow),
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"%d" % len(body)),
        (b"x-content-type-options", b"nosniff"),
    ]
    await respond(send, 405, headers, body)


async def _lifespan(receive: Receive, send: Send) -> None:
    """Minimal lifespan support, for when the dev app is served on its own (tests)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
