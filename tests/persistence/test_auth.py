"""Who may talk to a real server: the bearer token on ``/acp`` (refused with HTTP 401 before
the upgrade), the browser Origin check (403, even with the right token), ``/metrics``
behind the token unless public, ``/health`` open; and the token ``serve`` generates."""

from __future__ import annotations

import re
import signal
import stat
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from punie_trio.web._auth import bearer_token, host_allowed, request_host

from ..acp_schema import SchemaChecker
from ..client import AcpTestClient
from ..integration import _support
from ..integration._support import (
    RawHttp,
    WsStream,
    acp_ws_client,
    command_process,
    fresh_ids,
    run_punie,
    serve_command,
    server_env,
    server_process,
    settle_loopback,
    ws_url,
)
from ..integration.conftest import StartServer

TOKEN = "T"
GOOD_ORIGIN = "http://localhost:3000"

Headers = list[tuple[bytes, bytes]]


def bearer(token: str) -> tuple[bytes, bytes]:
    return (b"authorization", f"Bearer {token}".encode())


def origin(value: str) -> tuple[bytes, bytes]:
    return (b"origin", value.encode())


async def rejected(url: str, headers: Headers | None = None) -> ConnectionRejected:
    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(url, extra_headers=headers):
            pass  # pragma: no cover - the handshake fails
    return info.value


@asynccontextmanager
async def acp_client(
    url: str, checker: SchemaChecker, headers: Headers
) -> AsyncIterator[AcpTestClient]:
    """A test client over a WebSocket opened with arbitrary handshake headers."""
    async with open_websocket_url(url, extra_headers=headers) as ws, trio.open_nursery() as n:
        client = AcpTestClient(WsStream(ws), checker, ids=fresh_ids())
        await n.start(client.run)
        yield client
        n.cancel_scope.cancel()


async def works(url: str, checker: SchemaChecker, headers: Headers) -> None:
    async with acp_client(url, checker, headers) as client:
        result = await client.initialize()
        assert result["protocolVersion"] == 1


async def test_acp_needs_the_token_and_a_friendly_origin(
    start_server: StartServer, acp_schema: SchemaChecker
) -> None:
    async with start_server(token=TOKEN, allow_origins=(GOOD_ORIGIN,)) as running:
        assert running.url is not None
        url = ws_url(running.url)
        with trio.fail_after(10):
            refusal = await rejected(url)
            assert refusal.status_code == 401
            assert b"Unauthorized" in (refusal.body or b"")
            assert challenges(refusal.headers) == [BARE_CHALLENGE]
            # A wrong token (as opposed to none) is named in the challenge (RFC 6750 3.1).
            for refusal in (
                await rejected(url, [bearer("wrong")]),
                await rejected(url + "?token=wrong"),
            ):
                assert refusal.status_code == 401
                assert challenges(refusal.headers) == [INVALID_TOKEN]
            refusal = await rejected(url, [(b"authorization", b"Basic VA==")])
            assert refusal.status_code == 401
            assert challenges(refusal.headers) == [BARE_CHALLENGE]
            assert running.manager.connections == set()

            await works(url + "?token=T", acp_schema, [])
            await works(url, acp_schema, [bearer(TOKEN)])
            async with acp_ws_client(running.url, acp_schema, token=TOKEN) as (client, _):
                await client.initialize()

            # A foreign page is refused even with the right token, whichever way it is sent.
            evil = origin("http://evil.example")
            refusal = await rejected(url, [evil, bearer(TOKEN)])
            assert refusal.status_code == 403 and b"Origin" in (refusal.body or b"")
            # It names the Origin it saw, as the Host check names the host (it said "this
            # Origin", and one who set --allow-origin could not tell what was sent).
            assert refusal.body == (
                b"Forbidden: Origin 'http://evil.example' may not use /acp (it is not this "
                b"server's own, nor one of --allow-origin)\n"
            )
            refusal = await rejected(url, [origin("http://e\x1b[2J" + "x" * 300), bearer(TOKEN)])
            assert b"\x1b" not in (refusal.body or b"") and len(refusal.body or b"") < 400
            assert (await rejected(url + "?token=T", [evil])).status_code == 403
            assert (await rejected(url, [origin("null"), bearer(TOKEN)])).status_code == 403
            # An allowed origin, and the server's own, work (still with the token).
            await works(url, acp_schema, [origin(GOOD_ORIGIN), bearer(TOKEN)])
            await works(url + "?token=T", acp_schema, [origin(GOOD_ORIGIN + "/")])
            await works(url, acp_schema, [origin(running.url), bearer(TOKEN)])
            assert (await rejected(url, [origin(GOOD_ORIGIN)])).status_code == 401


async def test_a_wrong_token_is_told_from_a_missing_one(start_server: StartServer) -> None:
    """Both were refused with "needs the server token": a client holding a stale token (a
    generated one changes at each start) read that it had sent none. The body now says
    which, on /acp and /metrics alike (the challenge already did)."""
    async with (
        start_server(token=TOKEN) as running,
        httpx.AsyncClient(base_url=running.url) as http,
    ):
        assert running.url is not None
        url = ws_url(running.url)
        with trio.fail_after(10):
            missing = [
                (await rejected(url)).body or b"",
                (await rejected(url + "?token=")).body or b"",
                (await http.get("/metrics")).content,
            ]
            wrong = [
                (await rejected(url, [bearer("stale")])).body or b"",
                (await rejected(url + "?token=stale")).body or b"",
                (await http.get("/metrics", params={"token": "stale"})).content,
            ]
        for body in missing:
            assert body.startswith(b"Unauthorized: ") and b"needs the server token" in body
        for body in wrong:
            assert body.startswith(b"Unauthorized: the token sent is not this server's"), body
            assert b"punie-trio token" in body and b"stale" not in body


BARE_CHALLENGE = b'Bearer realm="punie-trio"'
INVALID_TOKEN = b'Bearer realm="punie-trio", error="invalid_token"'


def challenges(headers: Headers | httpx.Headers) -> list[bytes]:
    """The ``WWW-Authenticate`` values of an answer."""
    if isinstance(headers, httpx.Headers):
        return [v.encode() for v in headers.get_list("www-authenticate")]
    return [v for k, v in headers if k.lower() == b"www-authenticate"]


def handshake_request(host: str, *headers: str, path: str = "/acp") -> bytes:
    """The bytes of a WebSocket handshake to ``path`` with ``Host: host``."""
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def raw_handshake(url: str, host: str, *headers: str, path: str = "/acp") -> bytes:
    """A WebSocket handshake to ``path`` sent with ``Host: host`` (what a page whose name
    was rebound to the server's address sends); the answer as it came, once the server
    has closed the connection."""
    address, port = url.removeprefix("http://").rsplit(":", 1)
    async with await trio.open_tcp_stream(address, int(port)) as stream:
        await stream.send_all(handshake_request(host, *headers, path=path))
        answer = b""
        while True:  # the server closes the connection after a refusal
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            answer += chunk
    return answer


async def test_a_host_name_that_could_be_rebound_is_refused_everywhere(
    start_server: StartServer,
) -> None:
    """DNS rebinding: a page at http://evil.example:PORT, its name then pointed at
    127.0.0.1, is same-origin with the server for the browser, and its Origin matched the
    "own origin" (taken from Host). Its Host names it, though: refused with 403 on every
    path, before the token or Origin are looked at."""
    hosts = ("dev.test", ".corp.test")
    async with (
        start_server(token=TOKEN, allow_hosts=hosts) as running,
        httpx.AsyncClient(base_url=running.url) as http,
    ):
        assert running.url is not None
        port = running.url.rsplit(":", 1)[1]
        with trio.fail_after(10):
            for path in ("/health", "/metrics", "/nowhere"):
                response = await http.get(path, headers={"Host": f"evil.example:{port}"})
                assert response.status_code == 403, path
                assert "Host 'evil.example' is not allowed" in response.text
                assert "--allow-host" in response.text
            evil = f"evil.example:{port}"
            answer = await raw_handshake(
                running.url, evil, f"Origin: http://{evil}", f"Authorization: Bearer {TOKEN}"
            )
            assert answer.startswith(b"HTTP/1.1 403 "), answer
            assert b"Host 'evil.example' is not allowed" in answer
            assert running.manager.connections == set()
            # Names that cannot be rebound, and the ones allowed, are served.
            for host in (
                "127.0.0.1", "[::1]", "localhost", "app.localhost", "LocalHost.",
                "dev.test", "corp.test", "a.b.corp.test",
            ):  # fmt: skip
                response = await http.get("/health", headers={"Host": f"{host}:{port}"})
                assert response.status_code == 200, host
            for host in ("notcorp.test", "dev.test.evil.example", "localhost.evil.example"):
                response = await http.get("/health", headers={"Host": f"{host}:{port}"})
                assert response.status_code == 403, host
            # An IPv6 address without brackets is refused, and named whole (it was ':').
            response = await http.get("/health", headers={"Host": "::1"})
            assert response.status_code == 403
            assert "Host '::1' is not allowed" in response.text


async def test_a_refused_upgrade_says_the_connection_closes(
    start_server: StartServer, mock_clock: trio.testing.MockClock
) -> None:
    """Every refusal of a WebSocket upgrade ends its HTTP/1.1 connection at once, and says
    so with Connection: close (it did not): 400 for a bad extension offer, 401, 403 for
    the Origin and for the Host, 404 for another path. (A MockClock that never moves: the
    5 s keep-alive cannot be what closes it.)"""
    async with start_server(token=TOKEN) as running:
        assert running.url is not None
        own = running.url.removeprefix("http://")
        auth = f"Authorization: Bearer {TOKEN}"
        for status, host, headers, path in [
            (400, own, [auth, "Sec-WebSocket-Extensions: permessage-deflate; "
                              "client_max_window_bits=zz"], "/acp"),
            (401, own, [], "/acp"),
            (403, own, [auth, "Origin: http://evil.example"], "/acp"),
            (403, "evil.example", [auth], "/acp"),
            (404, own, [auth], "/nope"),
        ]:  # fmt: skip
            raw = await RawHttp.connect(running.url)
            await raw.send(handshake_request(host, *headers, path=path))
            answer = await raw.answer()
            assert (answer.status, answer.headers["connection"]) == (status, "close")
            await settle_loopback()
            raw.read_ready()
            assert raw.eof, (status, host, path)
            await raw.aclose()


@pytest.mark.parametrize(
    ("sent", "shown"),
    [
        ("Bücher.example".encode(), "Bücher.example"),
        # Not UTF-8 (a Latin-1 byte): escaped, not read as another character.
        (b"b\xfccher.example", "b\\xfccher.example"),
        # A C1 control (CSI, which terminals obey) and a bidi override, sent as UTF-8
        # (h11 takes bytes over 0x7f): escaped, never raw.
        ("evil\u009b2J.example".encode(), "evil\\x9b2J.example"),
        ("evil\u202e.example".encode(), "evil\\u202e.example"),
    ],
)
async def test_a_refused_host_or_origin_is_named_as_sent_not_as_mojibake(
    start_server: StartServer, sent: bytes, shown: str
) -> None:
    """The 403 of the Host check and of the Origin check named a non-ASCII value read as
    Latin-1: ``Host: bücher.example`` in UTF-8 came back as ``'bã¼cher.example'``, and
    an Origin so too (a C1 control became two characters, one of them raw). Both are
    read as UTF-8 now, anything not printable (or not UTF-8) escaped."""
    async with start_server(token=TOKEN) as running:
        assert running.url is not None
        port = running.url.rsplit(":", 1)[1].encode()
        raw = await RawHttp.connect(running.url)
        await raw.send(b"GET /health HTTP/1.1\r\nHost: " + sent + b":" + port + b"\r\n\r\n")
        answer = await raw.answer()
        await raw.aclose()
        assert answer.status == 403
        assert answer.body.decode() == (  # (a host name is named lowercase)
            f"Forbidden: Host '{shown.lower()}' is not allowed here (use an IP address or "
            "localhost, or allow the name with --allow-host)\n"
        )
        own = running.url.removeprefix("http://")
        raw = await RawHttp.connect(running.url)
        request = handshake_request(own, f"Authorization: Bearer {TOKEN}").removesuffix(b"\r\n")
        await raw.send(request + b"Origin: http://" + sent + b"\r\n\r\n")
        answer = await raw.answer()
        await raw.aclose()
        assert answer.status == 403
        assert answer.body.decode() == (
            f"Forbidden: Origin 'http://{shown}' may not use /acp (it is not this server's "
            "own, nor one of --allow-origin)\n"
        )
        assert running.manager.connections == set()


async def test_a_refused_host_is_named_lowercased_in_ascii_only(
    start_server: StartServer,
) -> None:
    """The 403 of the Host check lowercases the name it shows as the check does, in ASCII:
    lowercased as Unicode, ``Host: \u212aube.example`` (a KELVIN SIGN, not a K) came back
    as ``'kube.example'``, refused "not allowed here" under ``--allow-host kube.example``,
    which left the user nothing to allow; and ``\u0130`` (I with a dot) as ``i`` and a
    combining dot."""
    async with start_server(allow_hosts=("kube.example",)) as running:
        assert running.url is not None
        for sent, shown in [
            ("\u212aube.example", "\u212aube.example"),
            ("\u0130NFO.Example", "\u0130nfo.example"),
        ]:
            raw = await RawHttp.connect(running.url)
            await raw.send(b"GET /health HTTP/1.1\r\nHost: " + sent.encode() + b"\r\n\r\n")
            answer = await raw.answer()
            await raw.aclose()
            assert answer.status == 403
            assert answer.body.decode() == (
                f"Forbidden: Host '{shown}' is not allowed here (use an IP address or "
                "localhost, or allow the name with --allow-host)\n"
            )


@pytest.mark.parametrize(
    ("value", "name"),
    [
        (None, None),
        (b"127.0.0.1:8765", "127.0.0.1"),
        (b"[::1]:8765", "::1"),
        (b"[::1]", "::1"),
        (b"[::1", "[::1"),  # malformed: kept whole, so it matches nothing
        # An IPv6 address without brackets: malformed, kept whole (it was split at its last
        # colon, and the refusal named the host ':').
        (b"::1", "::1"),
        (b"fe80::1:8765", "fe80::1:8765"),
        (b"Dev.Test.:80", "dev.test"),
        (b"localhost", "localhost"),
        (b"localhost:", "localhost"),
        # Not a port: no host name at all (kept whole, so only `*` admits it).
        (b"127.0.0.1:evil.example", "127.0.0.1:evil.example"),
        (b"[::1]evil.example", "[::1]evil.example"),
    ],
)
def test_the_host_name_of_a_request(value: bytes | None, name: str | None) -> None:
    headers = [] if value is None else [(b"host", value)]
    assert request_host({"headers": headers}) == name


@pytest.mark.parametrize(
    ("value", "allowed"),
    [
        (b"127.0.0.1:evil.example", False),
        (b"[fe80::1%25evil.example]:80", False),  # a zone id: not sent by browsers
        (b"[fe80::1]:80", True),
        (b"::1", False),  # no brackets: malformed
        (b"[::1]", True),
        (b"x.localhost:1", True),
        (b"localhost.evil.example", False),
        (b"corp.test", True),
        (b"a.corp.test", True),
        (b"acorp.test", False),
    ],
)
def test_host_allowed(value: bytes, allowed: bool) -> None:
    assert host_allowed({"headers": [(b"host", value)]}, (".corp.test",)) is allowed


@pytest.mark.parametrize(
    ("headers", "query", "token"),
    [
        ([b"bearer T"], b"", "T"),
        ([b"Bearer   T  "], b"", "T"),
        ([b"Bearer\tT"], b"", None),  # (only spaces separate the scheme, RFC 9110 11.4)
        ([b"Bearer wrong"], b"token=T", "wrong"),  # a Bearer header is used, the query not
        ([b"Basic dTpw"], b"token=T", "T"),  # another scheme is passed over
        ([b"Bearer first", b"Bearer second"], b"", "first"),
        ([], b"token=first&token=second", "first"),
        ([], b"token=&token=T", "T"),
        ([], b"token=", None),
        ([], b"token=a%2Bb", "a+b"),
        ([], b"token=a+b", "a b"),  # form-encoded (RFC 6750 2.3): percent-encode a '+'
    ],
)
def test_which_token_counts(headers: list[bytes], query: bytes, token: str | None) -> None:
    """As security.md says, so a client knows what a request with two tokens sends."""
    scope = {"headers": [(b"authorization", h) for h in headers], "query_string": query}
    assert bearer_token(scope) == token


async def test_allow_host_star_admits_every_name(start_server: StartServer) -> None:
    async with (
        start_server(allow_hosts=("*",)) as running,
        httpx.AsyncClient(base_url=running.url) as http,
    ):
        response = await http.get("/health", headers={"Host": "anything.example"})
        assert response.status_code == 200


async def test_metrics_need_the_token_health_is_open(start_server: StartServer) -> None:
    async with (
        start_server(token=TOKEN) as running,
        httpx.AsyncClient(base_url=running.url) as http,
    ):
        response = await http.get("/metrics")
        assert response.status_code == 401
        assert "token" in response.text
        assert challenges(response.headers) == [BARE_CHALLENGE]
        for wrong in (
            await http.get("/metrics", headers={"Authorization": "Bearer no"}),
            await http.get("/metrics", params={"token": "no"}),
        ):
            assert wrong.status_code == 401
            assert challenges(wrong.headers) == [INVALID_TOKEN]
        response = await http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200 and "punie" in response.text
        assert (await http.get("/metrics", params={"token": TOKEN})).status_code == 200
        health = await http.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"


async def test_public_metrics(start_server: StartServer, acp_schema: SchemaChecker) -> None:
    async with (
        start_server(token=TOKEN, metrics_public=True) as running,
        httpx.AsyncClient(base_url=running.url) as http,
    ):
        assert (await http.get("/metrics")).status_code == 200
        # /acp still needs the token.
        assert (await rejected(ws_url(running.url))).status_code == 401
        await works(ws_url(running.url), acp_schema, [bearer(TOKEN)])


async def test_serve_without_a_token_generates_one(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    data_dir = tmp_path / "fresh" / "data"
    command = serve_command(tmp_path, data_dir=data_dir, token=None)
    with trio.fail_after(30):
        env = server_env()
        async with command_process(command, env, stdin=subprocess.DEVNULL) as server:
            url = server.url

            token_file = data_dir / "token"
            assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
            assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
            token = token_file.read_text().strip()
            assert len(token) >= 32

            shown = await run_punie("token", "--data-dir", str(data_dir))
            assert shown.returncode == 0, shown.stderr
            assert re.search(rf"^token: {re.escape(token)}$", shown.stdout.decode(), re.M)

            assert (await rejected(ws_url(url))).status_code == 401
            await works(ws_url(url), acp_schema, [bearer(token)])


async def test_the_token_is_not_logged_at_debug_level_over_http2(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """With ``--log-level debug`` the HTTP/2 header decoder (hpack) logged every header it
    decoded, ``authorization: Bearer TOKEN`` and ``:path /acp?token=TOKEN`` with them (and
    the raw header block), to stderr and to the log file: 7 copies of the token for one
    audit's few requests. Our own debug lines are still written."""
    async with server_process(tmp_path, "--log-level", "debug") as server:
        with trio.fail_after(30):
            async with httpx.AsyncClient(base_url=server.url, http1=False, http2=True) as http:
                auth = {"Authorization": f"Bearer {_support.TOKEN}"}
                response = await http.get("/metrics", headers=auth)
                assert (response.http_version, response.status_code) == ("HTTP/2", 200)
                response = await http.get("/metrics", params={"token": _support.TOKEN})
                assert response.status_code == 200
            async with acp_ws_client(server.url, acp_schema, token=_support.TOKEN) as (client, _):
                await client.initialize()
                await client.notify("debug/marker")
                await client.request("session/list", {})
            server.process.send_signal(signal.SIGTERM)
            assert await server.process.wait() == 0
            await server.stderr_done.wait()
    log_file = (tmp_path / "data" / "punie-trio.log").read_text()
    for text in (server.stderr, log_file):
        assert "ignored notification debug/marker" in text  # debug lines are written
        assert _support.TOKEN not in text
        assert "hpack" not in text
