"""Tiny ASGI response helpers (no framework: the app is a handful of routes)."""

from __future__ import annotations

import json
from typing import Any

import trio

from ._asgi_ws import ASGIReceive, ASGISend


def header(scope: dict[str, Any], name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


async def respond(
    send: ASGISend,
    status: int,
    body: bytes,
    content_type: bytes = b"text/plain; charset=utf-8",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    all_headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    all_headers += headers or []
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    # Shielded: the send that ends a response must complete, or Hypercorn's bookkeeping of
    # the connection is cut off and it hangs until graceful_timeout.
    with trio.CancelScope(shield=True):
        await send({"type": "http.response.body", "body": body})


async def respond_json(send: ASGISend, status: int, obj: Any) -> None:
    body = json.dumps(obj, separators=(",", ":")).encode()
    await respond(send, status, body, b"application/json")


async def respond_text(send: ASGISend, status: int, text: str, **kw: Any) -> None:
    await respond(send, status, (text + "\n").encode(), **kw)


async def read_body(receive: ASGIReceive, limit: int) -> bytes | None:
    """The request body, or None if it exceeds ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            return b"".join(chunks)
        chunk = event.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not event.get("more_body", False):
            return b"".join(chunks)
