"""The WebSocket handshakes Hypercorn refuses before the app sees them: an unsupported
``Sec-WebSocket-Version`` gets 426 Upgrade Required naming the version the server speaks (RFC
6455 section 4.4) and, over HTTP/1.1, the protocol (``Upgrade: websocket``, as RFC 9110
section 15.5.22 asks of every 426); Hypercorn's other 400s (no ``Sec-WebSocket-Key``,
HTTP/1.0, a frame sent before the 101) get their reason in the body (they were bare, and a
client could not tell what was wrong); and every refused handshake ends its TCP connection.

Why: Hypercorn answers any invalid handshake with a bare 400. For a version it does not
speak, the RFC says the server "MUST respond with a |Sec-WebSocket-Version| header field ...
containing all versions it is willing to use", so a client can retry with one of them.
And after that 400 (or the 404 for a host it does not serve) Hypercorn left the connection
open, though its answer says ``connection: close``: its stream never reported itself
closed, so the connection neither closed nor went idle (no keep-alive timeout), and stayed
until the client left. :func:`install` wraps Hypercorn's error response for both.

Resource handling: nothing is owned. :func:`install` patches Hypercorn's ``WSStream`` for
the whole process (idempotent), like ``_fast_send.install``; if Hypercorn's internals ever
stop matching, nothing is patched and Hypercorn answers as before.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from hypercorn.protocol.events import Body, EndBody, Response, StreamClosed
from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
from wsproto.handshake import WEBSOCKET_VERSION

from ._http import body_headers

log = logging.getLogger(__name__)

_REASON = b"Upgrade Required: this server speaks WebSocket version 13"


def _wrong_version(stream: Any) -> bool:
    """Whether the handshake ``stream`` refuses is a WebSocket upgrade that is sound but for
    its version (a missing version header counts as a wrong one)."""
    handshake = getattr(stream, "handshake", None)
    if handshake is None or handshake.version == WEBSOCKET_VERSION:
        return False
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
    """Answer a wrong ``Sec-WebSocket-Version`` with 426 and close every connection whose
    handshake Hypercorn refused (idempotent). Returns False, patching nothing, if
    Hypercorn's internals no longer look as expected."""
    original = WSStream.__dict__.get("_send_error_response")
    if original is None:
        log.warning(
            "Hypercorn internals changed; a wrong WebSocket version gets its 400, and a "
            "refused handshake's connection stays open until the client closes it"
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
    return True


def _why_refused(stream: Any) -> str:
    """Why Hypercorn refused this handshake with 400 (its ``Handshake.is_valid``, or a
    frame that came before the app answered the handshake)."""
    handshake = getattr(stream, "handshake", None)
    version = getattr(handshake, "http_version", "1.1")
    if isinstance(version, str) and version < "1.1":
        return (
            f"a WebSocket handshake needs HTTP/1.1 or later, not {version} (RFC 6455 section 4.1)"
        )
    if version == "1.1" and getattr(handshake, "key", None) is None:
        return "the WebSocket handshake has no Sec-WebSocket-Key (RFC 6455 section 4.1)"
    if handshake is not None and handshake.is_valid():
        return (
            "data came before the handshake was answered (a client sends no frames before the 101)"
        )
    return "invalid WebSocket handshake"


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
