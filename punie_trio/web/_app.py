"""The ASGI app Hypercorn serves: a small router over the ACP WebSocket, health, echo,
metrics, and (with ``--site``) the dev app for every other path.

Error handling: every refusal the app makes carries a status and a reason in the body;
nothing a client sends can take the app down for the others. Some requests never reach the
app: Hypercorn refuses them itself, with an empty body and ``Connection: close``: 400 for
what h11 cannot parse (two ``Host`` or ``Content-Length`` headers, a chunk size that is not
a number), 431 for a request head over 16 KiB (even one that arrives whole: the socket
reader, ``_fast_send``, hands Hypercorn 4 KiB at a time, so it is incomplete past 16 KiB).
Those are left as Hypercorn sends them. A WebSocket handshake Hypercorn refuses (no
``Sec-WebSocket-Key``, HTTP/1.0, a frame before the 101, a ``Connection``,
``Sec-WebSocket-Extensions`` or ``Sec-WebSocket-Protocol`` that is not ASCII: 400; a wrong
version: 426) gets a reason too (``_handshake``).
"""

from __future__ import annotations

import base64
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio
from hypercorn.protocol.ws_stream import WebsocketBuffer
from wsproto.extensions import PerMessageDeflate
from wsproto.handshake import server_extensions_handshake
from wsproto.utilities import split_comma_header

from .. import _json
from .._version import __version__
from ..hub import PROBATION_INITIALIZE_WITHIN, ClientConnection, Manager
from ..rpc import INVALID_REQUEST
from ._asgi_ws import ASGIReceive, ASGISend, AsgiWebSocketStream
from ._auth import (
    challenge,
    host_allowed,
    origin_allowed,
    request_host,
    token_matches,
    unauthorized,
)
from ._fast_send import FINAL_SEND_TIMEOUT, final_send
from ._heartbeat import Heartbeat
from ._http import (
    BodyRefused,
    body_headers,
    closing_headers,
    header,
    origin_form,
    over_http1,
    printable,
    read_body,
    respond,
    respond_json,
    respond_text,
    shown_header,
)
from ._ws_refusals import watch_oversized

log = logging.getLogger("punie_trio.web")

# Loosely typed: sub-apps (the dev app) declare their own ASGI aliases.
ASGIApp = Callable[..., Awaitable[None]]

ACP_PATHS = frozenset({"/acp", "/ws"})
MAX_ECHO_BYTES = 1024 * 1024
#: How long a client gets to answer our close frame before its connection is dropped.
CLOSE_TIMEOUT = 5.0


@attrs.define(eq=False)
class App:
    """Route requests. ``fallback`` (the dev app) gets every path not routed here."""

    manager: Manager
    closing: trio.Event
    fallback: ASGIApp | None = None
    token: str | None = None
    allow_origins: tuple[str, ...] = ()
    #: Host names accepted besides IP addresses and localhost (``_auth.host_allowed``).
    allow_hosts: tuple[str, ...] = ()
    metrics_public: bool = False
    started_at: float = attrs.field(factory=time.monotonic)
    #: Finds dead peers and connections that never initialize (start its ``run``).
    heartbeat: Heartbeat = attrs.field(factory=Heartbeat)
    #: How long a connection let in on probation past a full limit has to send its
    #: ``initialize`` (``hub._probation``).
    probation_initialize_within: float = PROBATION_INITIALIZE_WITHIN

    def __attrs_post_init__(self) -> None:
        # The manager asks the heartbeat whether a connection holding a client id that a
        # new connection names is alive (Manager.take_over): only it can ping one.
        self.manager.alive = self.heartbeat.alive

    async def __call__(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        kind = scope["type"]
        if kind in ("http", "websocket"):
            scope = origin_form(scope)
        if kind == "lifespan":
            await _lifespan(receive, send)
        elif not host_allowed(scope, self.allow_hosts):
            # Before anything else, for every path: a DNS-rebinding page (see _auth).
            # (Escaped and cut, as a path is: repr left a bidi override raw.)
            name = printable(request_host(scope) or "")
            reason = (
                f"Forbidden: Host '{name}' is not allowed here (use an IP address or "
                "localhost, or allow the name with --allow-host)"
            )
            if kind == "websocket":
                await self._refuse_upgrade(scope, send, 403, reason, "host")
            elif kind == "http":
                self.manager.metrics.tallies.http_refused[403, "host"] += 1
                await respond_text(send, 403, reason)
        elif kind == "websocket":
            if scope["path"] in ACP_PATHS:
                await self._acp_websocket(scope, receive, send)
            else:
                path = printable(scope["path"])
                reason = f"Not Found: {path} (ACP over WebSocket is at /acp)"
                await self._refuse_upgrade(scope, send, 404, reason, "not_found")
        elif kind == "http":
            await self._http(scope, receive, send)

    async def _http(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        path, method = scope["path"], scope["method"]
        if scope.get("raw_path") == b"*":
            # The asterisk-form: the server in general, for OPTIONS alone (RFC 9112
            # section 3.2.4), where it is a "ping" (RFC 9110 section 9.3.7). Both were a
            # 404, "Not Found: *", as if a resource named * were missing.
            if method == "OPTIONS":
                await respond(send, 200, b"")
            else:
                why = "the request target * is for OPTIONS only (RFC 9112 section 3.2.4)"
                await respond_text(send, 400, f"Bad Request: {why}")
            return
        if method == "HEAD" and path in ACP_PATHS:
            method = "GET"  # (RFC 9110 9.3.2: HEAD is answered as GET, without the body)
        if path == "/health":
            if method not in ("GET", "HEAD"):
                await _not_allowed(send, "GET, HEAD")
                return
            await respond_json(send, 200, self.health())
        elif path == "/echo":
            if method != "POST":
                await _not_allowed(send, "POST")
                return
            await self._echo(scope, receive, send)
        elif path == "/metrics":
            if method not in ("GET", "HEAD"):
                await _not_allowed(send, "GET, HEAD")
                return
            if not self.metrics_public and self.token and not token_matches(scope, self.token):
                self.manager.metrics.tallies.http_refused[401, "token"] += 1
                await respond_text(
                    send,
                    401,
                    unauthorized(scope, "/metrics needs the server token (or --metrics-public)"),
                    headers=[(b"www-authenticate", challenge(scope))],
                )
                return
            body = self.manager.metrics.render()
            await respond(send, 200, body, b"text/plain; version=0.0.4; charset=utf-8")
        elif path in ACP_PATHS:
            if method != "GET":
                # (HEAD is served, as GET: above. Allow lists what the path serves, RFC
                # 9110 15.5.6; it said GET alone.)
                await _not_allowed(send, "GET, HEAD")
                return
            # RFC 9110: a 426 names the protocol in Upgrade (section 15.5.22), and a sender
            # of Upgrade lists "upgrade" in Connection (section 7.8). Over HTTP/1.1 only:
            # both are connection headers, which HTTP/2 has none of.
            headers: list[tuple[bytes, bytes]] = []
            if over_http1(scope):
                headers = [(b"upgrade", b"websocket"), (b"connection", b"upgrade, close")]
            unread = _unread_upgrade(scope)
            how = (
                "Upgrade: websocket"
                if unread is None
                else "one Upgrade: websocket and one Connection: Upgrade; this request "
                f"had {unread}"
            )
            await respond_text(
                send,
                426,
                f"Upgrade Required: /acp speaks ACP over WebSocket only (send GET with {how})",
                headers=headers,
            )
        elif self.fallback is not None:
            await self.fallback(scope, receive, send)
        else:
            await respond_text(send, 404, f"Not Found: {printable(path)}")

    def health(self) -> dict[str, Any]:
        manager = self.manager
        return {
            "status": "closing" if self.closing.is_set() else "ok",
            "version": __version__,
            "uptime": round(time.monotonic() - self.started_at, 3),
            "connections": len(manager.connections),
            "sessions": len(manager.sessions),
            "workers": len(manager.workers),
        }

    async def _echo(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        try:
            body = await read_body(scope, receive, MAX_ECHO_BYTES)
        except BodyRefused as refused:
            # The rest of the body is not read, so the connection cannot carry another
            # request: Hypercorn closes it, and the client is told.
            await respond_text(send, refused.status, refused.reason, headers=closing_headers(scope))
            return
        try:
            obj = _json.loads(body)
        except ValueError as exc:
            await respond_text(send, 400, f"Bad Request: body is not JSON: {exc}")
            return
        await respond_json(send, 200, obj)

    async def _acp_websocket(
        self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend
    ) -> None:
        """One ACP connection per WebSocket (the RFD's WebSocket profile).

        Resource handling: the connection's tasks all live inside ``conn.run``; it returns when
        the client disconnects (``websocket.disconnect``) or, at shutdown, after the
        connection's turns answered ``cancelled``; then we send the close frame (1001 at
        shutdown), shielded, and read on until Hypercorn's ``websocket.disconnect`` (at
        most :data:`CLOSE_TIMEOUT` before the connection is dropped; at shutdown it is
        dropped at once): returning before it could leave Hypercorn waiting for good to
        hand it over (see ``AsgiWebSocketStream.wait_disconnected``).
        """
        event = await receive()
        if event["type"] != "websocket.connect":
            return
        refusal = self._refuse_websocket(scope)
        if refusal is not None:
            await self._refuse_upgrade(scope, send, *refusal)
            return
        admitted = self.manager.admit_upgrade()
        if admitted is None:
            self.manager.metrics.tallies.limits["max_connections"] += 1
            limit = self.manager.limits.max_connections
            reason = f"Service Unavailable: connection limit reached ({limit})"
            retry = [(b"retry-after", str(self._retry_full_after()).encode())]
            await self._refuse_upgrade(scope, send, 503, reason, "full", retry)
            return
        conn_id = str(uuid.uuid4())  # the RFD shows a UUID
        try:
            await send(
                {"type": "websocket.accept", "headers": [(b"acp-connection-id", conn_id.encode())]}
            )
        finally:
            # Counted by the manager until here, and by the connection from its attach
            # (conn.run() attaches before its first checkpoint).
            self.manager.upgraded(admitted)
        # A message over --max-message-bytes is answered -32600 and closed 1009 below the
        # app (_ws_refusals); counted here, where the metrics are.
        watch_oversized(send, self._oversized)
        stream = AsgiWebSocketStream(receive, send)
        probation = admitted == "probation"
        conn = ClientConnection(
            self.manager, transport="websocket", id=conn_id, on_probation=probation
        )
        conn.probeable = self.heartbeat.watch(stream, conn)
        try:
            if probation:
                await self._run_on_probation(conn, stream)
            else:
                await conn.run(stream)
        finally:
            self.heartbeat.unwatch(stream)
            code, reason = conn.close_with or (1001 if self.closing.is_set() else 1000, "")
            await stream.close(code, reason)
            _release_buffers(send)
            # (Also when conn.run failed.) At shutdown the connection is dropped at once, as
            # Hypercorn did when the app returned: a client that does not answer the close
            # frame must not make every shutdown take CLOSE_TIMEOUT (a review: 5 s, not
            # 0.02 s).
            await stream.wait_disconnected(0 if self.closing.is_set() else CLOSE_TIMEOUT)

    def _oversized(self) -> None:
        """A message over the bound was answered -32600 and its connection closed (1009)."""
        metrics = self.manager.metrics
        metrics.limit_hit("max_message_bytes")
        metrics.error_sent(INVALID_REQUEST)

    async def _refuse_upgrade(
        self,
        scope: dict[str, Any],
        send: ASGISend,
        status: int,
        reason: str,
        counted_as: str,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Refuse a WebSocket upgrade (:func:`_reject_websocket`, with ``headers`` too),
        counted in ``punie_upgrades_refused_total`` under ``status`` and ``counted_as``."""
        self.manager.metrics.tallies.upgrades_refused[status, counted_as] += 1
        await _reject_websocket(scope, send, status, reason, headers)

    def _retry_full_after(self) -> int:
        """The ``Retry-After`` (whole seconds) of the 503 refusing an upgrade at a full
        server: when trying again can succeed (RFC 9110 section 10.2.3), told rather than
        guessed (a client without it could only hammer the server, or give up).

        - While a full server lets upgrades in on probation (``hub._probation``), the 503
          means every place on probation is taken; each is free again within a
          probation's length: :attr:`probation_initialize_within` for its
          ``initialize``, then the probe that starts (``Heartbeat.probe_within``), 10 s.
        - Otherwise only a place coming free lets a client in. A client may leave at
          any time, which no one can foretell; what the server frees itself, it frees by
          the heartbeat's ``initialize_within`` (30 s): a connection that never
          initialized is closed then, and a silent one has been pinged (and is dropped
          if it stays silent). Sooner would have a client retry into the same 503."""
        if self.manager.probation_could_admit():
            wait = self.probation_initialize_within + self.heartbeat.probe_within
        else:
            wait = self.heartbeat.initialize_within
        return math.ceil(wait)

    async def _run_on_probation(self, conn: ClientConnection, stream: AsgiWebSocketStream) -> None:
        """Run a connection let in on probation past a full limit (``hub._probation``),
        closing it (1013) if it has not sent ``initialize`` within
        :attr:`probation_initialize_within` (unless a place has come free by then, which
        it takes): a place on probation is held for a round trip, not for the
        heartbeat's 30 s.

        Resource handling: the deadline's task lives in a nursery around ``conn.run``,
        and ends with it (cancelled once the connection does)."""
        async with trio.open_nursery() as nursery:

            async def deadline() -> None:
                await trio.sleep(self.probation_initialize_within)
                conn.end_probation_unless_initializing(
                    f"initialize not received within {self.probation_initialize_within:g} s"
                )

            nursery.start_soon(deadline)
            await conn.run(stream)
            nursery.cancel_scope.cancel()

    def _refuse_websocket(self, scope: dict[str, Any]) -> tuple[int, str, str] | None:
        """Why this upgrade must be refused (status, reason, and the reason it is counted
        under in ``punie_upgrades_refused_total``), or None to accept it (the connection
        limit is the manager's: ``Manager.admit_upgrade``)."""
        bad_key = _bad_key(scope)
        if bad_key is not None:
            return 400, f"Bad Request: {bad_key}", "bad_handshake"
        bad_offer = _bad_extension_offer(scope)
        if bad_offer is not None:
            return (
                400,
                f"Bad Request: invalid Sec-WebSocket-Extensions offer {bad_offer!r}",
                "bad_handshake",
            )
        if not origin_allowed(scope, self.allow_origins):
            # Named (escaped and cut, as a path is), as the Host check names the host: "this
            # Origin" left one who set --allow-origin guessing what the browser sent.
            seen = printable(shown_header(header(scope, b"origin") or b""))
            return (
                403,
                f"Forbidden: Origin '{seen}' may not use /acp (it is not this server's own, "
                "nor one of --allow-origin)",
                "origin",
            )
        if self.token and not token_matches(scope, self.token):
            needs = "/acp needs the server token (Authorization: Bearer, or ?token=)"
            return 401, unauthorized(scope, needs), "token"
        if self.closing.is_set():
            return 503, "Service Unavailable: the server is shutting down", "shutting_down"
        return None


def _release_buffers(send: ASGISend) -> None:
    """Drop a closed WebSocket's large buffers now: its zlib streams
    (``permessage-deflate``) and a message it was reassembling.

    Why: the connection's objects are freed when it ends (its reference cycles are broken:
    ``FastSendTCPServer._release``, ``Peer._close``), but a connection can be held on:
    a turn that runs on for a client with a grace period holds it until the turn ends.
    Each compressor holds a few hundred KB of C memory (an audit once saw RSS climb 45 ->
    331 MB over 14,000 compressed connections, 47 -> 51 MB without compression), and
    Hypercorn's stream buffers the fragments of an unfinished message up to the message
    size bound (16 MiB by default): neither is of use once the app is done.

    Reaches into Hypercorn's stream (the ASGI ``send``'s owner) and wsproto's private
    attributes, as ``_direct`` does; if they are not there, it does nothing.
    """
    stream = getattr(send, "__self__", None)
    buffer = getattr(stream, "buffer", None)
    if isinstance(buffer, WebsocketBuffer):
        buffer.clear()
    protocol = getattr(getattr(stream, "connection", None), "_proto", None)
    for extension in getattr(protocol, "extensions", ()):
        if isinstance(extension, PerMessageDeflate):
            extension._compressor = None
            extension._decompressor = None


def _unread_upgrade(scope: dict[str, Any]) -> str | None:
    """The ``Upgrade`` and ``Connection`` lines, shown, of an HTTP/1.1 request that asked
    for an upgrade (it has an ``Upgrade`` line, or a ``Connection`` listing ``upgrade``)
    but was not taken for a WebSocket handshake; None for one that did not ask.

    Why: Hypercorn takes a request for a handshake only when its last ``Connection`` line
    lists ``upgrade`` and its last ``Upgrade`` line is ``websocket`` alone. A client that
    split ``Connection`` over two lines (RFC 9110 section 5.3 lets it), listed another
    protocol in ``Upgrade`` too, or sent no ``Connection``, got the 426 telling it to send
    the ``Upgrade: websocket`` it had sent. (Reached only by a refused request.)"""
    if not over_http1(scope):
        return None
    lines: dict[bytes, list[bytes]] = {b"upgrade": [], b"connection": []}
    for name, value in scope.get("headers", ()):
        found = lines.get(name.lower())
        if found is not None:
            found.append(bytes(value))
    asked = lines[b"upgrade"] or any(
        token.strip().lower() == b"upgrade"
        for value in lines[b"connection"]
        for token in value.split(b",")
    )
    if not asked:
        return None
    shown = [
        f"{name} " + " ".join(f"'{printable(shown_header(value), 60)}'" for value in values)
        if values
        else f"no {name}"
        for name, values in (("Upgrade", lines[b"upgrade"]), ("Connection", lines[b"connection"]))
    ]
    return " and ".join(shown)


def _bad_key(scope: dict[str, Any]) -> str | None:
    """What is wrong with an HTTP/1.1 handshake's ``Sec-WebSocket-Key``, or None.

    RFC 6455 section 4.2.1: there is one, and it is "a base64-encoded value that, when
    decoded, is 16 bytes in length"; a server that finds otherwise "MUST stop processing
    the client's handshake" and answer 400. Hypercorn checked only that there was one, and
    switched protocols for ``abc``, for an empty key, and for two keys (answering the
    last). (A missing key never gets here: Hypercorn answers it with its 400, to which
    ``_handshake`` adds the reason. An
    HTTP/2 handshake, RFC 8441, has no key.)
    """
    if not over_http1(scope):
        return None
    keys = [
        value for name, value in scope.get("headers", ()) if name.lower() == b"sec-websocket-key"
    ]
    if len(keys) != 1:
        return f"one Sec-WebSocket-Key is required, not {len(keys)}"
    try:
        decoded = base64.b64decode(keys[0].strip(), validate=True)
    except ValueError:
        decoded = b""
    if len(decoded) != 16:
        # (Read as UTF-8, escaped once: Latin-1 and repr named "schlüssel" 'schlÃ¼ssel'.)
        shown = printable(shown_header(bytes(keys[0])), 40)
        return f"Sec-WebSocket-Key '{shown}' is not 16 bytes in base64 (RFC 6455 section 4.1)"
    return None


def _bad_extension_offer(scope: dict[str, Any]) -> str | None:
    """The ``Sec-WebSocket-Extensions`` offer Hypercorn's handshake would fail on, or None.

    Hypercorn hands the offers to wsproto only when the app accepts, and wsproto parses a
    ``permessage-deflate`` window size with ``int()``: ``client_max_window_bits=zz`` raised
    there, after Hypercorn had marked the stream connected, and its clean-up then raised
    again and took the whole server down. So the same parse runs here first (on the header
    Hypercorn reads: the last one), on a throwaway extension object.
    """
    value: bytes | None = None
    for name, raw in scope.get("headers", ()):
        if name.lower() == b"sec-websocket-extensions":
            value = raw
    if value is None:
        return None
    offers = split_comma_header(value)
    try:
        server_extensions_handshake(offers, [PerMessageDeflate()])
    except Exception:
        return value.decode("latin-1")[:200]
    return None


async def _reject_websocket(
    scope: dict[str, Any],
    send: ASGISend,
    status: int,
    reason: str,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Refuse an upgrade with a real HTTP status and reason (and ``extra_headers``) where
    the server supports the ASGI ``websocket.http.response`` extension (Hypercorn does);
    else close (403)."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    body = (reason + "\n").encode()
    # Over HTTP/1.1 Hypercorn closes the connection after a refused handshake.
    headers = body_headers(body) + closing_headers(scope) + (extra_headers or [])
    if status == 401:
        headers.append((b"www-authenticate", challenge(scope)))
    await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
    with final_send(send, FINAL_SEND_TIMEOUT):
        await send({"type": "websocket.http.response.body", "body": body})


async def _not_allowed(send: ASGISend, allow: str) -> None:
    await respond_text(
        send, 405, f"Method Not Allowed: use {allow}", headers=[(b"allow", allow.encode())]
    )


async def _lifespan(receive: ASGIReceive, send: ASGISend) -> None:
    while True:
        event = await receive()
        if event["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif event["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
