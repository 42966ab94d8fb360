"""Tiny ASGI response helpers (no framework: the app is a handful of routes), and the one
request body reader.

Error handling: a body that stops arriving is refused (408) after
:data:`BODY_IDLE_TIMEOUT`. Hypercorn's ``read_timeout`` would do it for every connection,
but it would also end the dev app's quiet SSE streams, so it is not set
(``server._hypercorn_config``), and without this a client that declared more body than it
sent held its connection, and a file descriptor, for good.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from typing import Any

import trio

from ._asgi_ws import ASGIReceive, ASGISend
from ._fast_send import FINAL_SEND_TIMEOUT, final_send

#: Seconds a request body may go without a byte before it is refused with 408 (the
#: connection is closed). Reset by every chunk that carries bytes.
BODY_IDLE_TIMEOUT = 10.0
#: Seconds a whole request body may take (408 past it): one byte every 9 s kept the idle
#: timer from ever firing, and a connection for months. The bodies read here (``/echo``,
#: at most 1 MiB) take milliseconds from any client that is really sending.
BODY_TOTAL_TIMEOUT = 60.0
#: The most characters of a request's own text (its path) an answer echoes.
ECHO_LIMIT = 200


def printable(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` to echo in an answer: every character that is not printable escaped as
    Python writes it (``\\x00``, ``\\r``, ``\\u202e``), and cut after ``limit``
    characters with an ellipsis. A 404 echoed a path's NUL, CR and LF raw, and a path of
    any length whole."""
    pieces: list[str] = []
    size = 0
    for char in text:
        piece = char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        size += len(piece)
        if size > limit:
            return "".join(pieces) + "\u2026"
        pieces.append(piece)
    return "".join(pieces)


def shown_header(value: bytes) -> str:
    """A header's value as an answer names it (before :func:`printable`): read as UTF-8, a
    byte that is not UTF-8 escaped (``\\xfc``).

    Why: the checks read a header as Latin-1 (only its ASCII can match anything), and the
    403s named it so: ``Host: bücher.example`` sent in UTF-8 came back as
    ``'bã¼cher.example'``, a bidi override as ``'â\\x80®'``. A client that sends other
    bytes than ASCII there sends UTF-8, and what is not is shown as bytes, not as
    characters nobody sent."""
    return value.decode("utf-8", "backslashreplace")


#: A request target in absolute-form: an http(s) URI (RFC 9112 section 3.2.2).
_ABSOLUTE_FORM = re.compile(rb"(?i)https?://([^/?#]*)(.*)", re.S)


def origin_form(scope: dict[str, Any]) -> dict[str, Any]:
    """``scope`` with a request target in absolute-form (``GET http://host:port/health``)
    turned into its path, and the target's host as ``Host``; any other scope as it is.

    RFC 9112 section 3.2.2: "A server MUST accept the absolute-form in requests" (what a
    client sends to a proxy), and an origin server then ignores the ``Host`` header and
    uses the target's host, which the Host check therefore sees. Hypercorn hands the whole
    target on as the path, so every route answered 404 (``Not Found: http://...``).
    """
    raw = scope.get("raw_path") or b""
    if raw[:1] == b"/" or (found := _ABSOLUTE_FORM.fullmatch(raw)) is None:
        return scope
    authority, path = found.groups()
    path = path or b"/"  # (an empty path is "/", RFC 9110 section 4.2.3)
    headers = [(k, v) for k, v in scope.get("headers", ()) if k.lower() != b"host"]
    headers.append((b"host", authority.rpartition(b"@")[2]))
    return {
        **scope,
        "raw_path": path,
        "path": urllib.parse.unquote(path.decode("latin-1")),
        "headers": headers,
    }


TEXT = b"text/plain; charset=utf-8"


def body_headers(body: bytes, content_type: bytes = TEXT) -> list[tuple[bytes, bytes]]:
    """The headers of every answer the server writes itself (the app's, and the refusals
    it adds to Hypercorn's handshakes): type and length, and ``nosniff``, so that no
    browser reads a text answer (which may echo the request) as HTML."""
    return [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"x-content-type-options", b"nosniff"),
    ]


def header(scope: dict[str, Any], name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


async def respond(
    send: ASGISend,
    status: int,
    body: bytes,
    content_type: bytes = TEXT,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    all_headers = body_headers(body, content_type) + (headers or [])
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    # Shielded: the send that ends a response must complete, or Hypercorn's bookkeeping of
    # the connection is cut off and it hangs until graceful_timeout. Bounded: over HTTP/2
    # it waits for a drain a client can withhold (see final_send).
    with final_send(send, FINAL_SEND_TIMEOUT):
        await send({"type": "http.response.body", "body": body})


async def respond_json(send: ASGISend, status: int, obj: Any) -> None:
    body = json.dumps(obj, separators=(",", ":")).encode()
    await respond(send, status, body, b"application/json")


async def respond_text(send: ASGISend, status: int, text: str, **kw: Any) -> None:
    await respond(send, status, (text + "\n").encode(), **kw)


def over_http1(scope: dict[str, Any]) -> bool:
    """Whether the request came over HTTP/1.x (``Connection`` and ``Upgrade`` are headers
    of the connection there; HTTP/2 has neither, and h2 strips them)."""
    return scope.get("http_version", "1.1") in ("1.0", "1.1")


def closing_headers(scope: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    """``Connection: close`` for a response after which the server closes an HTTP/1.x
    connection (a request body left unread, a refused WebSocket handshake), so the client
    knows not to send another request on it; none over HTTP/2 (a refusal there ends its
    stream only)."""
    return [(b"connection", b"close")] if over_http1(scope) else []


class BodyRefused(Exception):
    """A request body the app will not read: answer ``status`` with ``reason``, and close."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason


async def read_body(scope: dict[str, Any], receive: ASGIReceive, limit: int) -> bytes:
    """The request body (what arrived of it if the client left).

    Raises :class:`BodyRefused`: 413 past ``limit`` bytes (at once, before reading, for a
    ``Content-Length`` over it), 408 when :data:`BODY_IDLE_TIMEOUT` seconds pass without a
    byte of it (a client that declared more than it sent, or a chunked body with no
    chunks, held its connection for ever) or the whole body takes longer than
    :data:`BODY_TOTAL_TIMEOUT`.
    """
    too_large = BodyRefused(413, f"Payload Too Large: the limit is {limit} bytes")
    declared = header(scope, b"content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    total_at = trio.current_time() + BODY_TOTAL_TIMEOUT
    idle_at = trio.current_time() + BODY_IDLE_TIMEOUT
    while True:
        event: dict[str, Any] | None = None
        with trio.move_on_at(min(idle_at, total_at)):
            event = await receive()
        if event is None:
            why = (
                f"the request body took more than {BODY_TOTAL_TIMEOUT:g} s"
                if trio.current_time() >= total_at
                else f"no byte of the request body arrived for {BODY_IDLE_TIMEOUT:g} s"
            )
            raise BodyRefused(408, f"Request Timeout: {why}")
        if event["type"] == "http.disconnect":
            return b"".join(chunks)
        chunk = event.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large
        if chunk:
            chunks.append(chunk)
            idle_at = trio.current_time() + BODY_IDLE_TIMEOUT
        if not event.get("more_body", False):
            return b"".join(chunks)
