"""ASGI plumbing shared by the dev app: types, header access, and ending a response.

Hypercorn facts this relies on: ``send()`` does not raise once the client has gone (so long
streams need a disconnect watcher, see :mod:`._sse`), and the ``send()`` that ends a response
must complete even while the handler is being cancelled, or Hypercorn's per-request bookkeeping
is cut off. :func:`finish` therefore shields that last send, with a deadline so a client that
stopped reading cannot hold the task forever.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from hypercorn.protocol.http_stream import HTTPStream

from .._direct import _connection
from .._fast_send import coalesced_writes, final_send

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

#: Longest a shielded final send may take before we give up on the client.
FINAL_SEND_TIMEOUT = 5.0
#: Bodies up to this size leave in the same system call as their headers (see :func:`respond`).
COALESCE_BODY_LIMIT = 32 * 1024


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of request header ``name`` (lower-case), or ``None``."""
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


def never() -> bool:
    """A :func:`departed` check for a ``send`` it cannot follow: the peer is never known gone."""
    return False


def departed(send: Send) -> Callable[[], bool]:
    """A check whether the peer of the request ``send`` answers has gone, cheap enough to
    call before every chunk.

    Why not ``http.disconnect`` alone: while a pipelined request waits behind this one,
    Hypercorn's reader for the connection is paused, so it never reads the peer's close and
    never sends the disconnect; the requests behind it are then served one by one to a
    closed socket (an audit: 500 connections of 50 pipelined requests for a 2.7 MB file kept
    the server busy for 25 s after the clients left). What tells is the socket writer:
    punie-trio's (``FastSendTCPServer``) sets ``write_failed`` and closes the socket when a
    write fails; stock Hypercorn marks the stream closed (its disconnect). Read from the
    ``send`` Hypercorn gave the app (its stream's bound ``app_send``): a ``send`` that is not
    one (a wrapper, another server) gives a check that never says gone.
    """
    stream = getattr(send, "__self__", None)
    if not isinstance(stream, HTTPStream):
        return never
    found = _connection(send, HTTPStream)
    server = found[2] if found is not None else None

    def gone() -> bool:
        return stream.closed or (server is not None and server.write_failed)

    return gone


async def abort(send: Send) -> bool:
    """Close the connection of the response ``send`` answers, mid-body; whether it was.

    For a body that cannot reach its declared length (its file shrank while it was sent):
    the client must see a connection cut short, which it cannot take for the whole file,
    and Hypercorn's h11 raised "Too little data for declared Content-Length" when the
    response was ended short (an ERROR with a traceback). Possible under punie-trio's socket
    writer over HTTP/1.1 (what ``punie-trio serve`` runs); after it the peer counts as gone
    (:func:`departed`), so the rest of the body is made up as for a peer that left.
    Elsewhere (HTTP/2, stock Hypercorn) nothing is done and ``False`` returned."""
    found = _connection(send, HTTPStream)
    if found is None:
        return False
    await found[2].abort()
    return True


async def start(send: Send, status: int, headers: Sequence[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": list(headers)})


async def finish(send: Send, body: bytes = b"") -> None:
    """Send the last body chunk, shielded from cancellation (bounded by a deadline, a
    short one once the server shuts down: :func:`.._fast_send.final_send`)."""
    with final_send(send, FINAL_SEND_TIMEOUT):
        await send({"type": "http.response.body", "body": body, "more_body": False})


async def respond(
    send: Send,
    status: int,
    headers: Sequence[tuple[bytes, bytes]],
    body: bytes,
    *,
    head: bool = False,
) -> None:
    """A complete response in two sends; ``head`` keeps the headers and drops the body.

    Under punie-trio's socket writer, a small response's two sends (and Hypercorn's empty
    end-of-message write after them) leave in one system call instead of three
    (:func:`coalesced_writes`); a larger body is not copied behind its headers, and elsewhere
    the sends go as Hypercorn makes them."""
    if head:
        body = b""
    if len(body) > COALESCE_BODY_LIMIT:
        await start(send, status, headers)
        await finish(send, body)
        return
    async with coalesced_writes():
        await start(send, status, headers)
        await finish(send, body)
