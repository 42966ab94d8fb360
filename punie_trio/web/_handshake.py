"""The WebSocket handshakes Hypercorn refuses before the app sees them: an unsupported
``Sec-WebSocket-Version`` gets 426 Upgrade Required naming the version the server speaks
(RFC 6455 section 4.4) and, over HTTP/1.1, the protocol (``Upgrade: websocket``, as RFC
9110 section 15.5.22 asks of every 426); Hypercorn's other 400s (no ``Sec-WebSocket-Key``,
HTTP/1.0, a frame or a request body sent before the 101) get their reason in the body (they
were bare, and a client could not tell what was wrong); a handshake header Hypercorn cannot
read (a non-ASCII byte in ``Connection``, ``Sec-WebSocket-Extensions`` or
``Sec-WebSocket-Protocol``) gets 400 naming it; and every refused handshake ends its TCP
connection.

Why: Hypercorn answers any invalid handshake with a bare 400. For a version it does not
speak, the RFC says the server "MUST respond with a |Sec-WebSocket-Version| header field ...
containing all versions it is willing to use", so a client can retry with one of them.
And after that 400 (or the 404 for a host it does not serve) Hypercorn left the connection
open, though its answer says ``connection: close``: its stream never reported itself
closed, so the connection neither closed nor went idle (no keep-alive timeout), and stayed
until the client left. :func:`install` wraps Hypercorn's error response for both. Hypercorn
reads those three headers as comma lists of ASCII (wsproto's ``split_comma_header``), and
a byte that is not ASCII raised ``UnicodeDecodeError`` as it parsed the handshake, before
any answer: over HTTP/1.1 the connection was closed with no answer at all, over HTTP/2
every stream of the connection died with it, and each logged an ERROR with a traceback.
:class:`_Handshake` makes such a handshake invalid instead, so it gets Hypercorn's 400,
which names the header here.

Resource handling: nothing is owned. :func:`install` patches Hypercorn's ``WSStream`` for
the whole process (idempotent), like ``_fast_send.install``; if Hypercorn's internals ever
stop matching, nothing is patched and Hypercorn answers as before.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import hypercorn.protocol.ws_stream as _ws_stream
from hypercorn.protocol.events import Body, EndBody, Response, StreamClosed
from hypercorn.protocol.ws_stream import ASGIWebsocketState, Handshake, WSStream
from wsproto.handshake import WEBSOCKET_VERSION

from ._http import body_headers, printable, shown_header

log = logging.getLogger(__name__)

_REASON = b"Upgrade Required: this server speaks WebSocket version 13"

#: The headers Hypercorn's ``Handshake`` reads as comma lists of ASCII, as a 400 names them.
_TOKEN_LISTS = {
    b"connection": "Connection",
    b"sec-websocket-extensions": "Sec-WebSocket-Extensions",
    b"sec-websocket-protocol": "Sec-WebSocket-Protocol",
}
#: The headers that give a request a body, as a 400 names them.
_BODY_HEADERS = {b"content-length": "Content-Length", b"transfer-encoding": "Transfer-Encoding"}


class _Handshake(Handshake):
    """Hypercorn's handshake, made invalid (not raised) by a header it cannot read.

    A sound handshake pays one call for this (measured: about 70 ns of 2.5 us for
    Hypercorn's parse and check): the ``try`` costs nothing until it raises, and only a
    handshake that raised gets an :meth:`is_valid` of its own."""

    #: The first header Hypercorn could not read as ASCII (its name as a 400 names it, and
    #: its value), or None. The headers after it were not read.
    undecodable: tuple[str, bytes] | None = None

    def __init__(self, headers: list[tuple[bytes, bytes]], http_version: str) -> None:
        try:
            Handshake.__init__(self, headers, http_version)
        except UnicodeDecodeError:
            self.undecodable = _first_undecodable(headers)
            if self.undecodable is None:
                raise  # not one of ours: Hypercorn's failure, as before
            self.is_valid = _invalid  # type: ignore[method-assign]


def _invalid() -> bool:
    return False


def _first_undecodable(headers: list[tuple[bytes, bytes]]) -> tuple[str, bytes] | None:
    """The first of ``headers`` (in the order Hypercorn reads them) in :data:`_TOKEN_LISTS`
    whose value is not ASCII: its name as shown, and its value."""
    for name, value in headers:
        shown = _TOKEN_LISTS.get(name.lower())
        if shown is not None and not value.isascii():
            return shown, value
    return None


def _wrong_version(stream: Any) -> bool:
    """Whether the handshake ``stream`` refuses is a WebSocket upgrade that is sound but for
    its version (a missing version header counts as a wrong one)."""
    handshake = getattr(stream, "handshake", None)
    if handshake is None or handshake.version == WEBSOCKET_VERSION:
        return False
    if getattr(handshake, "undecodable", None) is not None:
        return False  # (its version, if after the bad header, was never read)
    if handshake.http_version == "1.1":
        tokens = handshake.connection_tokens or []
        return (
            handshake.key is not None
            and any(token.lower() == "upgrade" for token in tokens)
            and (handshake.upgrade or b"").lower() == b"websocket"
        )
    return bool(handshake.http_version > "1.1")


def _over_http1(stream: Any) -> bool:
    """Whether the handshake came over HTTP/1.x, where the TCP connection is the stream's.
    (Over HTTP/2 the refused stream has ended and the connection goes on serving the
    others; reporting it closed there made Hypercorn forget it, and a frame the client
    still sent on it raised ``KeyError`` and took the whole connection down.)"""
    version = getattr(getattr(stream, "handshake", None), "http_version", None)
    return isinstance(version, str) and version < "2"


def install() -> bool:
    """Answer a wrong ``Sec-WebSocket-Version`` with 426, a handshake header Hypercorn
    cannot read with 400, and close every connection whose handshake Hypercorn refused
    (idempotent). Returns False, patching nothing, if Hypercorn's internals no longer look
    as expected."""
    original = WSStream.__dict__.get("_send_error_response")
    if original is None or getattr(_ws_stream, "Handshake", None) not in (Handshake, _Handshake):
        log.warning(
            "Hypercorn internals changed; a wrong WebSocket version gets its 400, a non-ASCII "
            "handshake header no answer, and a refused handshake's connection stays open "
            "until the client closes it"
        )
        return False
    if getattr(original, "punie_trio", False):
        return True

    async def _send_error_response(self: WSStream, status_code: int) -> None:
        if status_code not in (400, 404):
            # 403 and 500 come from the app's side, whose end reports the stream closed.
            await original(self, status_code)
            return
        # Refused by Hypercorn itself. Closed first: the app's own answer to the handshake
        # (its accept or refusal, racing this one from its task) is then dropped by
        # Hypercorn. Two answers on one stream made h11 raise and h2 corrupt the
        # connection's header compression (it encodes the headers before refusing them).
        answered = getattr(self, "state", None) is not ASGIWebsocketState.HANDSHAKE
        self.closed = True
        if answered:
            pass  # the app answered first (a client sent frames without reading that)
        elif status_code == 400 and _wrong_version(self):
            await _send_426(self)
        elif status_code == 400:
            await _send_400(self, _why_refused(self))
        else:
            await original(self, status_code)
        if self.app_put is not None:
            # The app, if started, hears that the client is gone (Hypercorn's own notice
            # skips a stream already closed).
            await self.app_put({"type": "websocket.disconnect", "code": 1006})
        if _over_http1(self):
            # Nothing else reports the stream closed: the TCP connection stayed open until
            # the client left.
            await self.send(StreamClosed(stream_id=self.stream_id))

    _send_error_response.punie_trio = True  # type: ignore[attr-defined]
    WSStream._send_error_response = _send_error_response  # type: ignore[method-assign]
    _ws_stream.Handshake = _Handshake  # type: ignore[misc]
    return True


def _why_refused(stream: Any) -> str:
    """Why Hypercorn refused this handshake with 400 (its ``Handshake.is_valid``, a header
    it could not read, or a frame or request body that came before the app answered the
    handshake)."""
    handshake = getattr(stream, "handshake", None)
    undecodable = getattr(handshake, "undecodable", None)
    if undecodable is not None:
        # Before the others: the headers after this one were not read (a key among them
        # would be missing). Shown as the key's 400 shows it (UTF-8, escaped once).
        name, value = undecodable
        shown = printable(shown_header(value), 80)
        return (
            f"{name} '{shown}' is not ASCII "
            "(a handshake header lists tokens, RFC 9110 section 5.6.2)"
        )
    version = getattr(handshake, "http_version", "1.1")
    if isinstance(version, str) and version < "1.1":
        return (
            f"a WebSocket handshake needs HTTP/1.1 or later, not {version} (RFC 6455 section 4.1)"
        )
    if version == "1.1" and getattr(handshake, "key", None) is None:
        return "the WebSocket handshake has no Sec-WebSocket-Key (RFC 6455 section 4.1)"
    if handshake is not None and handshake.is_valid():
        framing = _body_framing(stream)
        if framing is not None:
            # (It said "a client sends no frames": this client had sent a request body.)
            return f"a WebSocket handshake has no body (this one came with {framing})"
        return (
            "data came before the handshake was answered (a client sends no frames before the 101)"
        )
    return "invalid WebSocket handshake"


def _body_framing(stream: Any) -> str | None:
    """The header that gave the handshake request a body (``Content-Length: 5``,
    ``Transfer-Encoding: chunked``), shown, or None."""
    scope = getattr(stream, "scope", None) or {}
    for name, value in scope.get("headers", ()):
        shown = _BODY_HEADERS.get(name.lower())
        if shown is not None and value.strip() != b"0":  # (0: the data was frames)
            return f"{shown}: {printable(shown_header(value), 40)}"
    return None


async def _send_400(stream: WSStream, why: str) -> None:
    """Hypercorn's 400, with ``why`` in the body (it sent none) and ``Connection: close``
    over HTTP/1.x (the connection is closed after it)."""
    body = f"Bad Request: {why}\n".encode()
    headers = body_headers(body)
    if _over_http1(stream):
        headers.append((b"connection", b"close"))
    await stream.send(Response(stream_id=stream.stream_id, status_code=400, headers=headers))
    await stream.send(Body(stream_id=stream.stream_id, data=body))
    await stream.send(EndBody(stream_id=stream.stream_id))
    await stream.config.log.access(
        stream.scope, {"status": 400, "headers": []}, time.time() - stream.start_time
    )


async def _send_426(stream: WSStream) -> None:
    headers = [(b"sec-websocket-version", WEBSOCKET_VERSION), *body_headers(_REASON)]
    if _over_http1(stream):
        # RFC 9110: a 426 MUST name the protocol in Upgrade (section 15.5.22), and a sender
        # of Upgrade lists "upgrade" in Connection (section 7.8). HTTP/2 has neither header.
        headers += [(b"upgrade", b"websocket"), (b"connection", b"upgrade, close")]
    await stream.send(Response(stream_id=stream.stream_id, status_code=426, headers=headers))
    await stream.send(Body(stream_id=stream.stream_id, data=_REASON))
    await stream.send(EndBody(stream_id=stream.stream_id))
    await stream.config.log.access(
        stream.scope, {"status": 426, "headers": []}, time.time() - stream.start_time
    )
