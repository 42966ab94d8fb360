"""The plain HTTP routes of a real in-process server, through httpx and raw sockets (for
what httpx will not send: a body that stops short, a path as it is on the wire)."""

from __future__ import annotations

import contextlib
import errno
import gc
import itertools
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import httpx
import prometheus_client
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionRejected, open_websocket_url

from punie_trio import __version__
from punie_trio.hub import Limits
from punie_trio.server import GC_THRESHOLDS, Running, ServeConfig, serve
from punie_trio.web._accept_log import ACCEPT_ERROR_LOG_EVERY, LOGGER_NAME, AcceptErrorFilter
from punie_trio.web._app import MAX_ECHO_BYTES
from punie_trio.web._http import BODY_IDLE_TIMEOUT, BODY_TOTAL_TIMEOUT, ECHO_LIMIT
from punie_trio.worker import EchoModel

from ..acp_schema import SchemaChecker
from ._support import (
    HttpAnswer,
    RawHttp,
    acp_ws_client,
    settle_loopback,
    settle_until,
    task_tree,
    ws_url,
)
from .conftest import StartServer


async def test_health(server: Running, tmp_path: Path, acp_schema: SchemaChecker) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        response = await http.get("/health")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/json")
        body = response.json()
        assert body["status"] == "ok"
        assert body["version"] == __version__
        assert isinstance(body["uptime"], int | float) and body["uptime"] >= 0
        assert (body["connections"], body["sessions"], body["workers"]) == (0, 0, 0)
        with trio.fail_after(10):
            async with acp_ws_client(server.url, acp_schema) as (client, _):
                await client.initialize()
                await client.new_session(str(tmp_path))
                await client.new_session(str(tmp_path))
                body = (await http.get("/health")).json()
                assert (body["connections"], body["sessions"], body["workers"]) == (1, 2, 1)


async def test_echo(server: Running) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        payload = {"a": [1, 2, {"b": None}], "ü": "✓"}
        response = await http.post("/echo", json=payload)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/json")
        assert response.json() == payload

        response = await http.get("/echo")
        assert response.status_code == 405
        assert response.headers["allow"] == "POST"

        response = await http.post(
            "/echo", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert response.status_code == 400
        assert "JSON" in response.text

        # What json.loads would take but JSON cannot carry back out.
        for body, why in [
            (b"[NaN, Infinity]", "NaN"),
            (b'{"x": 1e400}', "out of range"),
            (b"[" * 100_000, "nested too deeply"),
        ]:
            response = await http.post("/echo", content=body)
            assert response.status_code == 400, body[:20]
            assert why in response.text


async def test_a_body_that_stops_coming_gets_408_and_a_slow_one_is_read(
    start_server: StartServer, mock_clock: trio.testing.MockClock
) -> None:
    """A request body with no byte for BODY_IDLE_TIMEOUT is refused with 408 and its
    connection closed: a POST that declared 10 bytes and sent 3, or a chunked one with no
    chunk, held its connection (and a file descriptor) for good, since Hypercorn's
    read_timeout is unset (it would end quiet SSE streams). A body that keeps coming, if
    slowly, is read to its end within BODY_TOTAL_TIMEOUT. (A MockClock moved by hand.)"""
    idle = BODY_IDLE_TIMEOUT
    head = b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    async with start_server() as server:
        assert server.url is not None
        slow, short, chunked = [await RawHttp.connect(server.url) for _ in range(3)]
        await slow.send(head + b'Content-Length: 10\r\n\r\n{"a')
        await short.send(head + b'Content-Length: 10\r\n\r\n{"a')
        await chunked.send(head + b"Transfer-Encoding: chunked\r\n\r\n")
        await settle_loopback()
        mock_clock.jump(0.75 * idle)
        await slow.send(b'": ')
        await settle_loopback()
        assert [c.read_ready() for c in (slow, short, chunked)] == [[], [], []]

        mock_clock.jump(0.25 * idle)  # `idle` since the last byte of short and chunked
        await settle_loopback()
        for client in (short, chunked):
            [answer] = client.read_ready()
            assert answer.status == 408
            assert answer.headers["connection"] == "close"
            assert f"no byte of the request body arrived for {idle:g} s" in answer.body.decode()
            assert client.eof  # closed by the server
        assert slow.read_ready() == []

        mock_clock.jump(0.5 * idle)  # longer than `idle` since the first byte, in all
        await slow.send(b"123}")
        await settle_loopback()
        [answer] = slow.read_ready()
        assert (answer.status, answer.body) == (200, b'{"a":123}')
        for client in (slow, short, chunked):
            await client.aclose()

        # A byte just inside every idle window kept the connection for months: the
        # whole body has BODY_TOTAL_TIMEOUT.
        drip = await RawHttp.connect(server.url)
        await drip.send(head + b"Content-Length: 1000\r\n\r\n")
        await settle_loopback()
        dripped = 0.0
        while dripped + 0.9 * idle < BODY_TOTAL_TIMEOUT:
            mock_clock.jump(0.9 * idle)
            dripped += 0.9 * idle
            await drip.send(b" ")
            await settle_loopback()
            assert drip.read_ready() == []
        mock_clock.jump(BODY_TOTAL_TIMEOUT - dripped)
        await settle_loopback()
        [answer] = drip.read_ready()
        assert answer.status == 408 and drip.eof
        assert f"the request body took more than {BODY_TOTAL_TIMEOUT:g} s" in answer.body.decode()
        await drip.aclose()


async def test_an_oversized_body_gets_413_before_it_is_read(
    start_server: StartServer, mock_clock: trio.testing.MockClock
) -> None:
    """A Content-Length over the limit is refused before a byte of the body is read (it
    was read up to the limit first), with Connection: close: the rest of the body is not
    read, so the connection carries nothing more. Also with Expect: 100-continue.
    (Hypercorn itself sends its 100 Continue as soon as it has read the request's head,
    before the app runs: the 413 follows it. See docs/security.md.) A MockClock that never
    moves: an answer that waited for the body would never come."""
    head = "POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n{}\r\n"
    async with start_server() as server:
        assert server.url is not None
        for expect in ("", "Expect: 100-continue\r\n"):
            client = await RawHttp.connect(server.url)
            await client.send(head.format(MAX_ECHO_BYTES + 1, expect).encode())
            await settle_loopback()
            *_, answer = client.read_ready()
            assert answer.status == 413, expect
            assert answer.headers["connection"] == "close"
            assert f"the limit is {MAX_ECHO_BYTES} bytes" in answer.body.decode()
            assert client.eof
            await client.aclose()
        # Within the limit, the body is read as before.
        client = await RawHttp.connect(server.url)
        await client.send(head.format(2, "").encode() + b"[]")
        await settle_loopback()
        [answer] = client.read_ready()
        assert (answer.status, answer.body) == (200, b"[]")
        await client.aclose()


class _OutOfDescriptors(trio.abc.Listener[trio.SocketStream]):
    """A listener whose every accept fails as when the process has no descriptor left;
    ``logged[i]``: how many records ``count()`` gave before try ``i``."""

    def __init__(self, count: Callable[[], int]) -> None:
        self.count = count
        self.logged: list[int] = []

    async def accept(self) -> trio.SocketStream:
        self.logged.append(self.count())
        await trio.lowlevel.checkpoint()
        raise OSError(errno.EMFILE, "Too many open files")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_failed_accepts_are_logged_once_per_interval_with_a_count(
    start_server: StartServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Out of file descriptors, trio.serve_listeners logs "accept returned EMFILE ...
    retrying" with a traceback and retries every 0.1 s: ten tracebacks a second. The server
    lets one through per ACCEPT_ERROR_LOG_EVERY, and the next one says how many it left
    out (trio's own retry loop, on a MockClock)."""
    logger = logging.getLogger(LOGGER_NAME)
    monkeypatch.setattr(logger, "filters", [])
    async with start_server():
        assert any(isinstance(f, AcceptErrorFilter) for f in logger.filters)

    def records() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == LOGGER_NAME]

    listener = _OutOfDescriptors(lambda: len(records()))
    with trio.move_on_after(2.5 * ACCEPT_ERROR_LOG_EVERY):
        await trio.serve_listeners(trio.aclose_forcefully, [listener])
    logged = [*listener.logged, len(records())]
    logged_tries = [i for i in range(len(logged) - 1) if logged[i + 1] > logged[i]]
    assert len(logged_tries) == len(records()) == 3  # at 0, 10 and 20 s
    assert len(logged) > 200  # trio tried all along
    first, *later = records()
    assert "accept returned EMFILE" in first.getMessage()
    assert first.exc_info is not None
    for (before, at), record in zip(itertools.pairwise(logged_tries), later, strict=True):
        assert f"({at - before - 1} more like it since the last one logged)" in (
            record.getMessage()
        )


async def test_metrics(server: Running, tmp_path: Path, acp_schema: SchemaChecker) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        with trio.fail_after(10):
            async with acp_ws_client(server.url, acp_schema) as (client, _):
                await client.initialize()
                session = await client.new_session(str(tmp_path))
                assert await client.prompt(session, "count me") == "end_turn"
                assert (await client.request_raw("nope/nope"))["error"]["code"] == -32601
                response = await http.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        text = response.text
        for name in (
            "punie_connections",
            "punie_prompts",
            "punie_prompt_latency_seconds",
            "punie_messages_in",
            "punie_errors",
        ):
            assert re.search(rf"^# TYPE {name}(_total)? ", text, re.M), name

        def sample(pattern: str) -> float:
            match = re.search(rf"^{pattern} (\S+)$", text, re.M)
            assert match, pattern
            return float(match.group(1))

        assert sample("punie_connections") == 1
        assert sample(r'punie_prompts_total\{stop_reason="end_turn"\}') == 1
        assert sample("punie_prompt_latency_seconds_count") == 1
        assert sample("punie_messages_in_total") >= 4
        assert sample(r'punie_errors_total\{code="-32601",name="method_not_found"\}') == 1
        # No `_created` series (prometheus_client adds one per counter and histogram), and
        # without switching them off for other users of prometheus_client in the process.
        assert "_created" not in text
        other = prometheus_client.CollectorRegistry()
        prometheus_client.Counter("other", "another user's counter", registry=other)
        assert b"other_created" in prometheus_client.generate_latest(other)


async def test_unknown_path_and_plain_http_on_acp(server: Running) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        response = await http.get("/no/such/page")
        assert response.status_code == 404
        assert "/no/such/page" in response.text
        for path in ("/acp", "/ws"):
            response = await http.get(path)
            assert response.status_code == 426, path
            assert response.headers["upgrade"].lower() == "websocket"
            # RFC 9110 section 7.8: a sender of Upgrade lists it in Connection (it was
            # missing, and the connection was kept alive).
            assert response.headers["connection"].lower() == "upgrade, close", path
            assert "WebSocket" in response.text
            raw = await RawHttp.connect(server.url)
            await raw.send(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            assert (await raw.answer()).status == 426
            await settle_loopback()
            raw.read_ready()
            assert raw.eof  # closed at once, not kept alive
            await raw.aclose()
            # Other methods: 405 naming GET (they got the 426 too); HEAD is answered as
            # GET is (RFC 9110 9.3.2), without the body, so Allow names it too (RFC 9110
            # 15.5.6: the methods the resource supports; it said GET alone).
            for method in ("POST", "PUT", "DELETE", "OPTIONS"):
                response = await http.request(method, path)
                assert response.status_code == 405, (path, method)
                assert response.headers["allow"] == "GET, HEAD"
            response = await http.head(path)
            assert (response.status_code, response.content) == (426, b"")
    # A WebSocket upgrade anywhere but /acp and /ws: 404 with the reason (it was a bare 403).
    for path in ("/health", "/nope"):
        with pytest.raises(ConnectionRejected) as info:
            async with open_websocket_url(ws_url(server.url, path)):
                pass  # pragma: no cover - the handshake fails
        assert info.value.status_code == 404
        assert b"/acp" in (info.value.body or b"")


@pytest.mark.parametrize(
    ("lines", "had"),
    [
        (
            [b"Upgrade: websocket", b"Connection: Upgrade", b"Connection: keep-alive"],
            "Upgrade 'websocket' and Connection 'Upgrade' 'keep-alive'",
        ),
        (
            [b"Upgrade: websocket, foo/1", b"Connection: Upgrade"],
            "Upgrade 'websocket, foo/1' and Connection 'Upgrade'",
        ),
        ([b"Upgrade: websocket"], "Upgrade 'websocket' and no Connection"),
        ([b"Connection: keep-alive, Upgrade"], "no Upgrade and Connection 'keep-alive, Upgrade'"),
        ("Upgrade: websocket\u00fc".encode(), "Upgrade 'websocket\u00fc' and no Connection"),
    ],
)
async def test_an_upgrade_not_read_as_a_websocket_handshake_is_told_what_was_read(
    server: Running, lines: list[bytes] | bytes, had: str
) -> None:
    """Hypercorn takes a request for a WebSocket handshake only when its last
    ``Connection`` line lists ``upgrade`` and its last ``Upgrade`` line is ``websocket``
    alone. A client that asked otherwise (``Connection`` over two lines, as RFC 9110
    section 5.3 allows; another protocol listed in ``Upgrade``; no ``Connection``) got the
    426 telling it to "send GET with Upgrade: websocket", which it had sent. The 426 says
    what this request had now (escaped as other answers name what was sent)."""
    assert server.url is not None
    if isinstance(lines, bytes):
        lines = [lines]
    request = [
        b"GET /acp HTTP/1.1",
        b"Host: 127.0.0.1",
        b"Sec-WebSocket-Version: 13",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        *lines,
    ]
    with trio.fail_after(10):
        answer = await RawHttp.exchange(server.url, b"\r\n".join(request) + b"\r\n\r\n")
    assert answer.status == 426, answer
    assert answer.headers["upgrade"] == "websocket"
    assert answer.body.decode() == (
        "Upgrade Required: /acp speaks ACP over WebSocket only (send GET with one "
        f"Upgrade: websocket and one Connection: Upgrade; this request had {had})\n"
    )


async def test_the_asterisk_form_is_a_ping_for_options_and_a_400_for_the_rest(
    server: Running,
) -> None:
    """``OPTIONS *`` (RFC 9110 section 9.3.7: the server in general, a "ping") is answered
    200, and ``*`` with any other method is 400 naming why (RFC 9112 section 3.2.4: the
    asterisk-form is for a server-wide OPTIONS only): both were a 404 ``Not Found: *``,
    as if a resource named ``*`` were missing. The connection serves on after each."""
    assert server.url is not None
    client = await RawHttp.connect(server.url)
    with trio.fail_after(10):
        for method, status, body in [
            ("OPTIONS", 200, b""),
            ("GET", 400, b"Bad Request: the request target * is for OPTIONS only"),
            ("POST", 400, b"Bad Request: the request target * is for OPTIONS only"),
        ]:
            await client.send(f"{method} * HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            answer = await client.answer()
            assert (answer.status, answer.body[: len(body)]) == (status, body), method
        await client.send(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert (await client.answer()).status == 200
    await client.aclose()


async def test_a_request_in_absolute_form_is_served_by_its_path(
    start_server: StartServer,
) -> None:
    """RFC 9112 section 3.2.2: "A server MUST accept the absolute-form in requests" (what
    a client talking to a proxy sends, ``GET http://host:port/health``), and an origin
    server then uses the target's host, not the ``Host`` header. Hypercorn hands the whole
    target on as the path: every route was a 404 (``Not Found: http://...``), and an
    upgrade to ``http://host/acp`` was told ACP is at /acp."""
    async with start_server(token="T") as server:  # /acp refuses a client without it
        assert server.url is not None
        host, port = server.url.removeprefix("http://").rsplit(":", 1)

        async def answer(target: str, host_header: str, *extra: str) -> HttpAnswer:
            client = await RawHttp.connect(server.url)
            lines = [
                f"GET {target} HTTP/1.1",
                f"Host: {host_header}",
                *(extra or ["Connection: close"]),
            ]
            await client.send(("\r\n".join(lines) + "\r\n\r\n").encode())
            try:
                return await client.answer()
            finally:
                await client.aclose()

        with trio.fail_after(10):
            health = await answer(f"http://{host}:{port}/health", f"{host}:{port}")
            assert health.status == 200 and b'"status":"ok"' in health.body
            assert (await answer(f"HTTP://{host}:{port}/health?x=1", "x")).status == 200
            bare = await answer(f"http://{host}:{port}", f"{host}:{port}")  # no path: "/"
            assert bare.status == 404 and bare.body == b"Not Found: /\n"
            # The target's host is the one checked (a rebinding name there is refused).
            refused = await answer("http://evil.example/health", f"{host}:{port}")
            assert refused.status == 403 and b"evil.example" in refused.body
            upgrade = await answer(
                f"http://{host}:{port}/acp",
                f"{host}:{port}",
                "Upgrade: websocket",
                "Connection: Upgrade",
                "Sec-WebSocket-Version: 13",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            )
            assert upgrade.status == 401, upgrade  # /acp itself: the token is what is missing


async def test_a_refusal_keeps_the_connection_when_the_body_has_arrived(
    server: Running,
) -> None:
    """A 405 for a request whose body has all arrived (unread by the app: Hypercorn has
    taken it) leaves the connection open for the next request, with or without a body.
    (A wrapper that said Connection: close to every early answer cost these their
    keep-alive: reverted, in review.)"""
    assert server.url is not None
    raw = await RawHttp.connect(server.url)
    for body in (b"Content-Length: 2\r\n\r\n{}", b"Content-Length: 0\r\n\r\n"):
        await raw.send(b"POST /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + body)
        answer = await raw.answer()
        assert answer.status == 405 and "connection" not in answer.headers
        await raw.send(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert (await raw.answer()).status == 200  # (the same connection)
    await raw.aclose()


async def test_a_404_escapes_and_cuts_the_path_it_echoes(server: Running) -> None:
    """The 404's reason echoed the decoded path raw (NUL, CR, LF) and whole, however long;
    now its control characters are escaped and it is cut at ECHO_LIMIT characters. Text
    answers carry X-Content-Type-Options: nosniff, so no browser reads one as HTML."""
    assert server.url is not None
    long_path = "/" + "x" * 10_000
    for path, echoed in [
        ("/nope%00%0d%0a%1b[2J<script>", "/nope\\x00\\r\\n\\x1b[2J<script>"),
        ("/%E2%80%AEevil", "/\\u202eevil"),
        (long_path, long_path[:ECHO_LIMIT] + "\u2026"),
    ]:
        client = await RawHttp.connect(server.url)
        await client.send(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        answer = await client.answer()
        await client.aclose()
        assert answer.status == 404
        assert answer.body.decode() == f"Not Found: {echoed}\n"
        assert answer.headers["x-content-type-options"] == "nosniff"
    # The same for a WebSocket upgrade on such a path.
    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(ws_url(server.url, "/nope%00%0a")):
            pass  # pragma: no cover - the handshake fails
    assert info.value.status_code == 404
    assert (info.value.body or b"").startswith(b"Not Found: /nope\\x00\\n (ACP")
    assert (b"x-content-type-options", b"nosniff") in [
        (k.lower(), v) for k, v in info.value.headers
    ]
    async with httpx.AsyncClient(base_url=server.url) as http:
        for path in ("/health", "/acp", "/nowhere"):
            response = await http.get(path)
            assert response.headers["x-content-type-options"] == "nosniff", path


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1\r\n"
         b"Content-Length: 2\r\n\r\n", 400),
        (b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"zz\r\n", 400),
        (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 70_000, 431),
        # Whole, in one write, but over 16 KiB: the server's reader hands Hypercorn 4 KiB
        # at a time, so it is never seen whole (the docs said such a head was served up to
        # 64 KiB, as Hypercorn's own reader would).
        (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 32_000
         + b"\r\n\r\n", 431),
    ],
)  # fmt: skip
async def test_hypercorn_refuses_what_it_cannot_parse_with_an_empty_body(
    server: Running, request_bytes: bytes, status: int
) -> None:
    """What docs/security.md and the web/_app.py docstring say of the refusals that never
    reach the app: Hypercorn's own, with an empty body, and the connection closed."""
    assert server.url is not None
    answer = await RawHttp.exchange(server.url, request_bytes)
    assert (answer.status, answer.body, answer.headers["connection"]) == (status, b"", "close")


async def test_a_wrong_websocket_version_gets_426_naming_the_version(server: Running) -> None:
    """RFC 6455 section 4.4: the server "MUST respond with a |Sec-WebSocket-Version| header
    field" listing the versions it speaks; Hypercorn sent a bare 400. Other invalid
    handshakes keep their 400. After each the server closes the connection (it stayed
    open until the client left)."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)

    async def handshake(*headers: str, then: bytes = b"") -> bytes:
        request = "\r\n".join(["GET /acp HTTP/1.1", f"Host: {host}:{port}", *headers, "", ""])
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            await stream.send_all(request.encode() + then)
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += await stream.receive_some(65536)
            head, _, body = answer.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: (\d+)", head)
            while length is not None and len(body) < int(length.group(1)):
                body += await stream.receive_some(65536)
            assert await stream.receive_some(65536) == b""  # closed by the server
            return head + b"\r\n\r\n" + body

    upgrade = [
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    ]
    with trio.fail_after(10):
        for version in (["Sec-WebSocket-Version: 8"], []):
            answer = await handshake(*upgrade, *version)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 426 "), answer
            assert b"\r\nsec-websocket-version: 13" in head.lower()
            # RFC 9110 section 15.5.22: a 426 MUST send Upgrade (it had none).
            assert b"\r\nupgrade: websocket\r\n" in head.lower()
            assert b"\r\nconnection: upgrade, close\r\n" in head.lower()
            assert b"\r\nx-content-type-options: nosniff\r\n" in head.lower()
            assert b"version 13" in body
        no_key = await handshake(
            "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 8"
        )
        assert no_key.startswith(b"HTTP/1.1 400 ")
        # A frame sent before the 101 (RFC 6455 forbids it): Hypercorn's 400, with the app
        # already started; it is told the client left.
        early = await handshake(
            *upgrade, "Sec-WebSocket-Version: 13", then=b"\x81\x85abcd" + b"hello"
        )
        assert early.startswith(b"HTTP/1.1 400 ")
        await trio.testing.wait_all_tasks_blocked()
        assert not server.manager.connections


async def test_a_websocket_handshake_hypercorn_refuses_gets_its_400_with_a_reason(
    server: Running,
) -> None:
    """The handshakes Hypercorn itself refuses with 400 (no ``Sec-WebSocket-Key``,
    HTTP/1.0, a frame sent before the 101, a request body) get a reason in the body, as
    the app's own refusals do: the 400 was bare, and a client could not tell what was wrong. The
    connection is closed after each, and the server serves on."""
    assert server.url is not None
    upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    cases = [
        (f"GET /acp HTTP/1.1\r\nHost: 127.0.0.1\r\n{upgrade}\r\n".encode(), b"Sec-WebSocket-Key"),
        (f"GET /acp HTTP/1.0\r\nHost: 127.0.0.1\r\n{upgrade}{key}\r\n".encode(), b"HTTP/1.1"),
        (
            f"GET /acp HTTP/1.1\r\nHost: 127.0.0.1\r\n{upgrade}{key}\r\n".encode()
            + b"\x81\x85abcd"
            + b"hello",
            b"before",
        ),
        # Frames after an empty body are frames still.
        (
            f"GET /acp HTTP/1.1\r\nHost: 127.0.0.1\r\n{upgrade}{key}Content-Length: 0\r\n\r\n"
            "\x81\x85abcdhello".encode("latin-1"),
            b"before",
        ),
        # A request body: no frames, and the reason said "a client sends no frames".
        (
            f"GET /acp HTTP/1.1\r\nHost: 127.0.0.1\r\n{upgrade}{key}Content-Length: 5\r\n\r\n"
            "hello".encode(),
            b"has no body (this one came with Content-Length: 5)",
        ),
        (
            f"GET /acp HTTP/1.1\r\nHost: 127.0.0.1\r\n{upgrade}{key}"
            "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".encode(),
            b"has no body (this one came with Transfer-Encoding: chunked)",
        ),
    ]
    with trio.fail_after(10):
        for request, named in cases:
            answer = await RawHttp.exchange(server.url, request)
            assert answer.status == 400, (request, answer)
            assert answer.body.startswith(b"Bad Request: ") and named in answer.body, answer
            assert answer.headers["content-type"].startswith("text/plain")
        await trio.testing.wait_all_tasks_blocked()
        assert not server.manager.connections
        async with httpx.AsyncClient(base_url=server.url) as http:
            assert (await http.get("/health")).status_code == 200


class _H2:
    """A bare HTTP/2 client (prior knowledge, as ``curl --http2-prior-knowledge``) on a
    real connection: send frames, read until a stream has ended."""

    @classmethod
    async def open(cls, url: str | None) -> _H2:
        """A connection to the server at ``url`` (``http://HOST:PORT``)."""
        assert url is not None
        host, port = url.removeprefix("http://").rsplit(":", 1)
        return cls(await trio.open_tcp_stream(host, int(port)), f"{host}:{port}".encode())

    def __init__(self, stream: trio.SocketStream, authority: bytes) -> None:
        import h2.config
        import h2.connection

        self.stream = stream
        self.authority = authority
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
        self.conn.initiate_connection()
        #: The body of each stream, as far as read.
        self.bodies: dict[int, bytes] = {}

    def websocket(self, stream_id: int, version: bytes) -> None:
        self.conn.send_headers(
            stream_id,
            [
                (b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"http"),
                (b":path", b"/acp"), (b":authority", self.authority),
                (b"sec-websocket-version", version),
            ],
        )  # fmt: skip

    def get(self, stream_id: int, path: bytes) -> None:
        self.conn.send_headers(
            stream_id,
            [
                (b":method", b"GET"), (b":scheme", b"http"), (b":path", path),
                (b":authority", self.authority),
            ],
            end_stream=True,
        )  # fmt: skip

    async def flush(self) -> None:
        await self.stream.send_all(self.conn.data_to_send())

    async def status(self, stream_id: int) -> bytes:
        """Read until ``stream_id`` has ended; its response's ``:status``."""
        import h2.events

        status: bytes | None = None
        while True:
            data = await self.stream.receive_some(65536)
            assert data, "the server closed the connection"
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    self.bodies[event.stream_id] = (
                        self.bodies.get(event.stream_id, b"") + event.data
                    )
                if isinstance(event, h2.events.ResponseReceived):
                    if event.stream_id == stream_id:
                        status = dict(event.headers)[b":status"]
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                    assert status is not None
                    await self.flush()
                    return status
            await self.flush()


@pytest.mark.parametrize(
    "keys",
    [
        ["abc"],  # not 16 bytes
        [""],
        ["!!!!!!!!!!!!!!!!!!!!!!=="],  # not base64
        ["dGhlIHNhbXBsZSBub25jZQ"],  # unpadded
        ["dGhlIHNhbXBsZSBub25jZQ==", "AAAAAAAAAAAAAAAAAAAAAA=="],  # two
    ],
)
async def test_a_malformed_websocket_key_gets_400_naming_it(
    server: Running, keys: list[str]
) -> None:
    """RFC 6455 section 4.2.1: the handshake has one ``Sec-WebSocket-Key`` that "when
    decoded, is 16 bytes in length", and a server that finds otherwise "MUST stop
    processing the client's handshake and return an HTTP response with an appropriate
    error code (such as 400 Bad Request)". Hypercorn switched protocols (101) for any key,
    and for two keys answered the last."""
    assert server.url is not None
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    client = await RawHttp.connect(server.url)
    lines = [
        "GET /acp HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Version: 13",
        *[f"Sec-WebSocket-Key: {key}" for key in keys],
    ]
    with trio.fail_after(10):
        await client.send(("\r\n".join(lines) + "\r\n\r\n").encode())
        answer = await client.answer()
        assert answer.status == 400, answer
        assert b"Sec-WebSocket-Key" in answer.body
        assert answer.headers["connection"] == "close"
        await client.wait_closed()
    await client.aclose()
    assert not server.manager.connections


@pytest.mark.parametrize(
    ("key", "named"),
    [
        ("schlüssel".encode(), "'schlüssel'"),
        (b"\xfc\xe9", "'\\xfc\\xe9'"),
        ("a\u009bb".encode(), "'a\\x9bb'"),
    ],
)
async def test_a_bad_websocket_key_is_named_as_sent_not_as_mojibake(
    server: Running, key: bytes, named: str
) -> None:
    """The 400 of a malformed ``Sec-WebSocket-Key`` named a non-ASCII key read as Latin-1
    (``'schlÃ¼ssel'``), and a C1 control as mojibake with its escape doubled by ``repr``
    (``'aÂ\\\\x9bb'``): it is read as UTF-8 now, a byte that is not UTF-8 and what is not
    printable escaped once, as the Host and Origin checks' 403s name theirs."""
    assert server.url is not None
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    lines = [
        b"GET /acp HTTP/1.1",
        f"Host: {host}:{port}".encode(),
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Version: 13",
        b"Sec-WebSocket-Key: " + key,
    ]
    client = await RawHttp.connect(server.url)
    with trio.fail_after(10):
        await client.send(b"\r\n".join(lines) + b"\r\n\r\n")
        answer = await client.answer()
    await client.aclose()
    assert answer.status == 400, answer
    assert answer.body.decode() == (
        f"Bad Request: Sec-WebSocket-Key {named} is not 16 bytes in base64 (RFC 6455 section 4.1)\n"
    )
    assert not server.manager.connections


@pytest.mark.parametrize(
    ("name", "value", "named"),
    [
        (
            b"Sec-WebSocket-Extensions",
            "permessage-deflate; client_max_window_bits=ü".encode(),
            "'permessage-deflate; client_max_window_bits=ü'",
        ),
        (b"Sec-WebSocket-Extensions", b"permessage-deflate\xff", "'permessage-deflate\\xff'"),
        (b"Sec-WebSocket-Protocol", "acp, ü".encode(), "'acp, ü'"),
        (b"Sec-WebSocket-Protocol", "a\u009bb".encode(), "'a\\x9bb'"),
        (b"Connection", "Upgrade, ü".encode(), "'Upgrade, ü'"),
        # A long one is cut, as other answers cut what they echo.
        (b"Sec-WebSocket-Protocol", "ü".encode() * 5000, "'" + "ü" * 80 + "\u2026'"),
    ],
)
async def test_a_non_ascii_handshake_header_gets_400_naming_it(
    server: Running, caplog: pytest.LogCaptureFixture, name: bytes, value: bytes, named: str
) -> None:
    """Hypercorn reads ``Connection``, ``Sec-WebSocket-Extensions`` and
    ``Sec-WebSocket-Protocol`` as comma lists of ASCII (wsproto's ``split_comma_header``),
    and a non-ASCII byte in one raised ``UnicodeDecodeError`` before the app ran: no answer
    at all, the connection just closed, and an ERROR with a traceback. It gets 400 naming
    the header and its value (read as UTF-8, escaped once) now, before the version is
    looked at (it comes after the bad header here, and was never read), and the server
    serves on."""
    assert server.url is not None
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    upgrade = [b"Upgrade: websocket", b"Connection: Upgrade"]
    if name == b"Connection":
        upgrade = [b"Upgrade: websocket"]
    lines = [
        b"GET /acp HTTP/1.1",
        f"Host: {host}:{port}".encode(),
        *upgrade,
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        name + b": " + value,
        b"Sec-WebSocket-Version: 13",
    ]
    with trio.fail_after(10):
        answer = await RawHttp.exchange(server.url, b"\r\n".join(lines) + b"\r\n\r\n")
    assert answer.status == 400, answer
    assert answer.headers["connection"] == "close"
    assert answer.body.decode() == (
        f"Bad Request: {name.decode()} {named} is not ASCII "
        "(a handshake header lists tokens, RFC 9110 section 5.6.2)\n"
    )
    assert "Traceback" not in caplog.text and "UnicodeDecodeError" not in caplog.text
    assert not server.manager.connections
    async with open_websocket_url(ws_url(server.url)) as ws:
        assert not ws.closed


async def test_a_non_ascii_handshake_header_over_http2_gets_400_and_the_connection_goes_on(
    server: Running, caplog: pytest.LogCaptureFixture
) -> None:
    """The same header over HTTP/2 (RFC 8441, extended CONNECT) raised in the same place,
    and took the whole connection down with "connection failed" and a traceback; its own
    stream gets the 400 now, and the connection goes on serving the others."""
    assert server.url is not None
    with trio.fail_after(10):
        client = await _H2.open(server.url)
        stream = client.stream
        async with stream:
            client.conn.send_headers(
                1,
                [
                    (b":method", b"CONNECT"), (b":protocol", b"websocket"),
                    (b":scheme", b"http"), (b":path", b"/acp"),
                    (b":authority", client.authority), (b"sec-websocket-version", b"13"),
                    (b"sec-websocket-protocol", "ü".encode()),
                ],
            )  # fmt: skip
            await client.flush()
            assert await client.status(1) == b"400"
            assert client.bodies[1].decode() == (
                "Bad Request: Sec-WebSocket-Protocol 'ü' is not ASCII "
                "(a handshake header lists tokens, RFC 9110 section 5.6.2)\n"
            )
            client.get(3, b"/health")
            await client.flush()
            assert await client.status(3) == b"200"
    assert "connection failed" not in caplog.text and "Traceback" not in caplog.text


@pytest.mark.parametrize(
    ("method", "path"),
    [(b"GET", b"/\xc3\xbcber.html"), (b"GET", b"/x\xff?q=1"), (b"G\xc3\x89T", b"/health")],
)
async def test_a_non_ascii_request_over_http2_gets_400_and_the_connection_goes_on(
    server: Running, caplog: pytest.LogCaptureFixture, method: bytes, path: bytes
) -> None:
    """HTTP/2 carries ``:path`` and ``:method`` as bytes, and a raw non-ASCII one (a
    clumsy client's ``/\u00fcber.html`` unescaped) made Hypercorn's ``decode("ascii")``
    raise: "connection failed" with a traceback, and every other stream of the connection
    died with it. Over HTTP/1.1 h11 answers such a request 400; over HTTP/2 the request's
    own stream gets 400 with the reason now, and the connection goes on."""
    assert server.url is not None
    with trio.fail_after(10):
        client = await _H2.open(server.url)
        stream = client.stream
        async with stream:
            client.conn.send_headers(
                1,
                [
                    (b":method", method), (b":scheme", b"http"), (b":path", path),
                    (b":authority", client.authority),
                ],
                end_stream=True,
            )  # fmt: skip
            await client.flush()
            assert await client.status(1) == b"400"
            assert b"not ASCII" in client.bodies[1]
            client.get(3, b"/health")
            await client.flush()
            assert await client.status(3) == b"200"
    assert "connection failed" not in caplog.text


@pytest.mark.parametrize("path", [b"/big.bin", b"/__reload__"])
async def test_an_http2_client_that_leaves_mid_response_ends_its_connection(
    start_server: StartServer, tmp_path: Path, path: bytes
) -> None:
    """An HTTP/2 client that leaves while a response is still being written to it (a
    download it gave no flow-control window, an open live-reload stream): Hypercorn closed
    its streams but not their send buffers, so the response's writer waited for good for
    room that its ended send task would never make. The connection's task never ended and
    its socket stayed in CLOSE-WAIT: a descriptor leaked per such client (a loop of them
    takes them all), and every shutdown waited its force-exit out."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "big.bin").write_bytes(bytes(2 * 1024 * 1024))
    async with start_server(site=site, dev_options={"no_watch": True}) as server:
        assert server.url is not None
        with trio.fail_after(10):
            client = await _H2.open(server.url)
            stream = client.stream
            client.get(1, path)
            await client.flush()
            import h2.events

            answered = False
            while not answered:
                data = await stream.receive_some(65536)
                assert data
                answered = any(
                    isinstance(event, h2.events.ResponseReceived)
                    for event in client.conn.receive_data(data)
                )
            assert any(name.endswith("_run_handler") for name in task_tree())
            await stream.aclose()  # gone, without a window for the rest
            # Until the connection's task has ended (it never did: fail_after fails the test).
            while any(name.endswith("_run_handler") for name in task_tree()):
                await trio.testing.wait_all_tasks_blocked()


async def test_an_http2_client_that_reads_nothing_holds_a_bounded_buffer(
    start_server: StartServer, tmp_path: Path
) -> None:
    """A stream whose client gives no flow-control window (a stalled tab, or a client doing
    it on purpose) must hold the writer once its buffer is full. Hypercorn's buffer let the
    writer go on every attempt of its send task to take nothing (``pop(0)`` counted as
    draining), so the whole body was buffered: 90 such streams for a 4 MB file took the
    server from 59 to 550 MB, where HTTP/1.1 holds about 256 KiB per stalled response."""
    import gc

    import h2.events
    import h2.settings
    from hypercorn.protocol.h2 import BUFFER_HIGH_WATER, StreamBuffer

    site = tmp_path / "site"
    site.mkdir()
    (site / "page.bin").write_bytes(bytes(1024 * 1024))  # in memory: sent in 64 KiB pieces
    async with start_server(site=site, dev_options={"no_watch": True}) as server:
        assert server.url is not None
        with trio.fail_after(10):
            client = await _H2.open(server.url)
            stream = client.stream
            async with stream:
                client.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
                for stream_id in (1, 3, 5):
                    client.get(stream_id, b"/page.bin")
                await client.flush()
                answered: set[int] = set()
                while len(answered) < 3:
                    data = await stream.receive_some(65536)
                    assert data
                    answered |= {
                        event.stream_id
                        for event in client.conn.receive_data(data)
                        if isinstance(event, h2.events.ResponseReceived)
                    }
                    await client.flush()
                await trio.testing.wait_all_tasks_blocked()
                # (Not isinstance: a dead weak proxy raises ReferenceError.)
                buffers = [o for o in gc.get_objects() if type(o) is StreamBuffer]
                assert len(buffers) == 3
                # Each holds what the writer had pushed when it passed the high-water mark.
                assert all(len(b.buffer) <= BUFFER_HIGH_WATER + 64 * 1024 for b in buffers)


async def test_a_connect_tunnel_over_http2_gets_400_and_the_connection_goes_on(
    server: Running, caplog: pytest.LogCaptureFixture
) -> None:
    """A plain HTTP/2 CONNECT (RFC 9113 section 8.5: ``:method`` and ``:authority``, no
    ``:path``; a tunnel through a proxy, which this server is not) made Hypercorn's stream
    set-up read a ``raw_path`` it never set: ``UnboundLocalError``, "connection failed"
    with a traceback, and every other stream of the connection died with it."""
    assert server.url is not None
    with trio.fail_after(10):
        client = await _H2.open(server.url)
        stream = client.stream
        async with stream:
            client.conn.send_headers(
                1, [(b":method", b"CONNECT"), (b":authority", b"example.com:443")]
            )
            await client.flush()
            assert await client.status(1) == b"400"
            assert b"CONNECT" in client.bodies[1]
            client.get(3, b"/health")
            await client.flush()
            assert await client.status(3) == b"200"
    assert "connection failed" not in caplog.text


@pytest.mark.parametrize(
    ("protocol", "named"),
    [(b"h2c", "'h2c'"), (b"webtransport", "'webtransport'"), (b"\xff", "'\\xff'")],
)
async def test_an_extended_connect_for_another_protocol_than_websocket_gets_400(
    server: Running, caplog: pytest.LogCaptureFixture, protocol: bytes, named: str
) -> None:
    """RFC 8441: an extended CONNECT names the protocol it wants in ``:protocol``, and
    this server speaks only ``websocket``. Hypercorn opened a WebSocket for any extended
    CONNECT, whatever it named, and answered 200: a client asking for another protocol
    was told it had it. Its stream gets 400 naming what it asked for now, and the
    connection goes on serving the others (a WebSocket among them)."""
    assert server.url is not None
    with trio.fail_after(10):
        client = await _H2.open(server.url)
        stream = client.stream
        async with stream:
            client.conn.send_headers(
                1,
                [
                    (b":method", b"CONNECT"), (b":protocol", protocol), (b":scheme", b"http"),
                    (b":path", b"/acp"), (b":authority", client.authority),
                    (b"sec-websocket-version", b"13"),
                ],
            )  # fmt: skip
            await client.flush()
            assert await client.status(1) == b"400"
            assert client.bodies[1].decode() == (
                f"Bad Request: the extended CONNECT's :protocol {named} is not served here "
                "(only websocket, RFC 8441)\n"
            )
            client.websocket(3, b"13")
            await client.flush()
            assert await _h2_response_status(client, 3) == b"200"
            client.get(5, b"/health")
            await client.flush()
            assert await client.status(5) == b"200"
    assert "connection failed" not in caplog.text


async def test_a_non_ascii_request_over_http2_with_no_window_is_reset_alone(
    server: Running, caplog: pytest.LogCaptureFixture
) -> None:
    """The 400's reason needs room in the client's flow-control window; a client that
    gives none (``INITIAL_WINDOW_SIZE`` 0, or a window it never reopens) gets the stream
    reset (RFC 9113 8.1.1: a malformed request is a stream error of type PROTOCOL_ERROR)
    rather than a send that would fail the connection, which goes on."""
    import h2.errors
    import h2.events
    import h2.settings

    assert server.url is not None
    window = h2.settings.SettingCodes.INITIAL_WINDOW_SIZE
    with trio.fail_after(10):
        client = await _H2.open(server.url)
        stream = client.stream
        async with stream:
            client.conn.update_settings({window: 0})
            client.conn.send_headers(
                1,
                [
                    (b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/\xff"),
                    (b":authority", client.authority),
                ],
                end_stream=True,
            )  # fmt: skip
            await client.flush()
            reset = None
            while reset is None:
                data = await stream.receive_some(65536)
                assert data, "the server closed the connection"
                for event in client.conn.receive_data(data):
                    if isinstance(event, h2.events.StreamReset):
                        reset = event
                await client.flush()
            assert (reset.stream_id, reset.error_code) == (1, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            client.conn.update_settings({window: 65535})
            client.get(3, b"/health")
            await client.flush()
            assert await client.status(3) == b"200"
    assert "connection failed" not in caplog.text


@pytest.mark.parametrize("early_frames", [0, 2])
async def test_a_refused_websocket_over_http2_leaves_the_connection_serving(
    start_server: StartServer, early_frames: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Over HTTP/2 (prior knowledge, extended CONNECT) a refused handshake ends its stream
    only: the connection goes on serving others, also after the client sent frames on
    the refused stream (before and after reading the refusal). Each of those once made
    Hypercorn fail the whole connection with ``KeyError``: after our 426 closed the stream
    (fixed in _handshake), and after its own 400 for frames sent too early (_h2_late_data)."""
    frame = b"\x81\x85abcdhello"
    async with start_server(token="T") as server:  # the app refuses the handshake too (401)
        assert server.url is not None
        with trio.fail_after(10):
            client = await _H2.open(server.url)
            stream = client.stream
            async with stream:
                client.websocket(1, b"13" if early_frames else b"8")
                for _ in range(early_frames):
                    client.conn.send_data(1, frame)  # sent before the handshake's answer
                await client.flush()
                assert await client.status(1) == (b"400" if early_frames else b"426")
                client.conn.send_data(1, frame)  # the client had not read the answer yet
                client.get(3, b"/health")
                await client.flush()
                assert await client.status(3) == b"200"
    assert "connection failed" not in caplog.text


async def test_serving_as_the_cli_does_freezes_startup_and_raises_gc_thresholds(
    tmp_path: Path,
) -> None:
    """With the process to itself (``handle_signals``: the CLI), the server freezes what
    start-up allocated and collects the young generation every 20,000 allocations, not
    700 (performance.md, fifth pass). Restored afterwards for the other tests."""
    before = gc.get_threshold()
    frozen = gc.get_freeze_count()  # (3.12.1 starts with some frozen)
    assert before != GC_THRESHOLDS  # (no test left them)
    (tmp_path / "data").mkdir()
    config = ServeConfig(
        projects=(tmp_path,), model=EchoModel(), port=0, data_dir=tmp_path / "data"
    )
    assert config.handle_signals
    try:
        async with trio.open_nursery() as nursery:
            running: Running = await nursery.start(serve, config)
            assert gc.get_threshold() == GC_THRESHOLDS
            assert gc.get_freeze_count() > frozen
            running.closing.set()
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


@pytest.mark.parametrize("where", ["lookup", "read", "chunk", "gzip"])
async def test_a_site_read_that_hangs_does_not_hold_the_shutdown(
    tmp_path: Path, start_server: StartServer, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The dev app reads the site in threads. On a site that stopped answering (a network
    mount) a request's lookup or read was not left to its thread on cancel, so the
    server's shutdown waited past ``shutdown_timeout`` until the file system answered
    (under the CLI the watchdog then ended the process with status 1). A read changes
    nothing: the shutdown leaves it now, and its thread ends when the mount answers. A
    chunk of a file over 1 MiB too: it was read through ``trio.open_file``, whose reads
    cannot be abandoned. The compression of a file over 1 MiB too: it was not abandoned,
    so that the requests waiting for it got its result (they start their own now)."""
    import threading

    from punie_trio.web.dev import _static

    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<html><body>x</body></html>")
    (site / "big.bin").write_bytes(b"b" * (_static.CACHE_FILE_LIMIT + 1))
    (site / "big.txt").write_bytes(b"t" * (_static.CACHE_FILE_LIMIT + 1))
    entered, release = threading.Event(), threading.Event()
    ended = threading.Semaphore(0)
    timed_out: list[bool] = []
    owner: object = _static._Chunks if where == "chunk" else _static
    name = {"lookup": "lookup", "read": "_read", "chunk": "read", "gzip": "_gzip_file"}[where]
    real = getattr(owner, name)

    def hung(*args: object) -> object:
        try:
            entered.set()
            timed_out.append(not release.wait(timeout=10))
            return real(*args)
        finally:
            ended.release()

    monkeypatch.setattr(owner, name, hung)
    # A lookup reads a small file itself; a range of a large one is read apart, the whole
    # of it in chunks.
    path, headers = {
        "lookup": ("/index.html", {}),
        "read": ("/big.bin", {"Range": "bytes=0-99"}),
        "chunk": ("/big.bin", {"accept-encoding": "identity"}),
        "gzip": ("/big.txt", {"accept-encoding": "gzip"}),
    }[where]
    async with trio.open_nursery() as nursery:
        config = {"site": site, "dev_options": {"no_watch": True}, "shutdown_timeout": 0.5}
        async with start_server(**config) as server:

            async def get() -> None:
                async with httpx.AsyncClient(base_url=server.url) as http:
                    with contextlib.suppress(httpx.HTTPError):
                        await http.get(path, headers=headers)

            nursery.start_soon(get)
            await trio.to_thread.run_sync(entered.wait)
        assert timed_out == []  # (the server stopped while the read still hung)
        release.set()
        await trio.to_thread.run_sync(ended.acquire)
    assert timed_out == [False]


async def test_a_full_server_held_by_an_http2_websocket_client_refuses_upgrades_with_503(
    start_server: StartServer,
) -> None:
    """At a full server (``max_connections`` 1) whose one connection is a WebSocket over
    HTTP/2 under a client id, an upgrade gets the 503 at once, as before probation: the
    heartbeat cannot watch an HTTP/2 WebSocket, so no probe could free its place. (It was
    let in on probation, to be refused with -32600 and closed with 1013 whatever its
    initialize.)"""
    import h2.events

    async with start_server(limits=Limits(max_connections=1)) as server:
        assert server.url is not None
        manager = server.manager
        with trio.fail_after(10):
            client = await _H2.open(server.url)
            async with client.stream:
                client.websocket(1, b"13")
                await client.flush()
                status = None
                while status is None:
                    data = await client.stream.receive_some(65536)
                    assert data
                    for event in client.conn.receive_data(data):
                        if isinstance(event, h2.events.ResponseReceived):
                            status = dict(event.headers)[b":status"]
                    await client.flush()
                assert status == b"200"
                text = json.dumps(
                    {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                     "params": {"protocolVersion": 1, "_meta": {"punie-trio/clientId": "ide"}}},
                    separators=(",", ":"),
                ).encode()  # fmt: skip
                assert len(text) < 126
                mask = os.urandom(4)
                masked = bytes(b ^ mask[i % 4] for i, b in enumerate(text))
                client.conn.send_data(1, bytes([0x81, 0x80 | len(text)]) + mask + masked)
                await client.flush()
                await settle_until(lambda: any(c.initialized for c in manager.connections))
                with pytest.raises(ConnectionRejected) as refused:
                    async with open_websocket_url(ws_url(server.url)):
                        pass
                assert refused.value.status_code == 503
                assert b"connection limit reached (1)" in (refused.value.body or b"")
                assert len(manager.connections) == 1


async def test_a_message_over_the_bound_on_an_http2_websocket_is_answered_and_counted(
    start_server: StartServer,
) -> None:
    """Over HTTP/2 (RFC 8441) Hypercorn's own bound refuses a message over
    ``--max-message-bytes``: it gets the -32600 (id null, naming the limit) before the
    1009, as over HTTP/1.1, and counts in ``punie_limits_hit_total``; the connection's
    other streams go on."""
    import h2.events

    async with start_server(max_message_bytes=4096) as server:
        registry = server.manager.metrics.registry
        with trio.fail_after(10):
            client = await _H2.open(server.url)
            async with client.stream:
                client.websocket(1, b"13")
                await client.flush()
                assert await _h2_response_status(client, 1) == b"200"
                text = b'"' + b"a" * 5000 + b'"'
                mask = os.urandom(4)
                masked = bytes(b ^ mask[i % 4] for i, b in enumerate(text))
                header = bytes([0x81, 0x80 | 126]) + len(text).to_bytes(2, "big")
                client.conn.send_data(1, header + mask + masked)
                await client.flush()
                frames: list[tuple[int, bytes]] = []
                while not any(opcode == 0x8 for opcode, _ in frames):
                    data = await client.stream.receive_some(65536)
                    assert data, "the server closed the connection"
                    for event in client.conn.receive_data(data):
                        if isinstance(event, h2.events.DataReceived):
                            client.bodies[1] = client.bodies.get(1, b"") + event.data
                            client.conn.acknowledge_received_data(
                                event.flow_controlled_length, event.stream_id
                            )
                    await client.flush()
                    frames = _server_frames(client.bodies.get(1, b""))
                (kind, error), (close, payload) = frames
                assert (kind, close) == (0x1, 0x8)
                answer = json.loads(error)
                assert answer["id"] is None and answer["error"]["code"] == -32600
                assert "4096-byte limit" in answer["error"]["message"]
                assert int.from_bytes(payload[:2], "big") == 1009
                assert payload[2:].decode() == "message over the 4096-byte limit"
                assert (
                    registry.get_sample_value(
                        "punie_limits_hit_total", {"limit": "max_message_bytes"}
                    )
                    == 1
                )
                client.get(3, b"/health")
                await client.flush()
                assert await client.status(3) == b"200"


async def _h2_response_status(client: _H2, stream_id: int) -> bytes:
    """Read until ``stream_id``'s response head has come; its ``:status``."""
    import h2.events

    while True:
        data = await client.stream.receive_some(65536)
        assert data, "the server closed the connection"
        for event in client.conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                await client.flush()
                return bytes(dict(event.headers)[b":status"])
        await client.flush()


def _server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """The whole (unmasked, unfragmented) WebSocket frames at the start of ``data``, as
    (opcode, payload)."""
    frames: list[tuple[int, bytes]] = []
    while len(data) >= 2:
        length, start = data[1] & 0x7F, 2
        if length == 126:
            length, start = int.from_bytes(data[2:4], "big"), 4
        elif length == 127:
            length, start = int.from_bytes(data[2:10], "big"), 10
        if len(data) < start + length:
            break
        frames.append((data[0] & 0x0F, data[start : start + length]))
        data = data[start + length :]
    return frames
