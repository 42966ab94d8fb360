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
