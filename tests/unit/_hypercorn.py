"""Test support: a tiny ASGI app's plumbing and a real Hypercorn (trio worker) on port 0."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import hypercorn.config
import hypercorn.trio
import trio


async def lifespan(scope: dict[str, Any], receive: Any, send: Any) -> bool:
    """Answer Hypercorn's lifespan protocol; True if ``scope`` was the lifespan (handled)."""
    if scope["type"] != "lifespan":
        return False
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})
    return True


@asynccontextmanager
async def serving(
    app: Any, closing: trio.Event | None = None, **config_values: Any
) -> AsyncIterator[tuple[str, int]]:
    """Serve ``app`` on 127.0.0.1, a free port; yield (host, port). ``config_values`` set
    Hypercorn config attributes (e.g. ``keep_alive_timeout``)."""
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    for name, value in config_values.items():
        setattr(config, name, value)
    if closing is None:
        closing = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            functools.partial(hypercorn.trio.serve, app, config, shutdown_trigger=closing.wait)
        )
        host, port = binds[0].removeprefix("http://").rsplit(":", 1)
        try:
            yield host, int(port)
        finally:
            closing.set()


#: HTTP/2's initial flow-control window (RFC 9113 section 6.9.2).
INITIAL_WINDOW = 65535


async def h2_get(sock: trio.SocketStream, authority: str, path: bytes = b"/") -> Any:
    """An HTTP/2 client (prior knowledge, ``h2.connection.H2Connection``) on ``sock`` that
    has sent ``GET path`` on stream 1."""
    import h2.config
    import h2.connection

    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    client.initiate_connection()
    client.send_headers(
        1,
        [
            (b":method", b"GET"), (b":scheme", b"http"), (b":path", path),
            (b":authority", authority.encode()),
        ],
        end_stream=True,
    )  # fmt: skip
    await sock.send_all(client.data_to_send())
    return client


async def read_initial_window(sock: trio.SocketStream, client: Any) -> None:
    """Read the body data the initial window lets out, granting not a byte more."""
    import h2.events

    received = 0
    while received < INITIAL_WINDOW:
        data = await sock.receive_some(65536)
        assert data
        for event in client.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                received += len(event.data)
        await sock.send_all(client.data_to_send())
