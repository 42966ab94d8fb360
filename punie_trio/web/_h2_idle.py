"""An HTTP/2 connection is idle from its start, not only once a stream has ended.

Why: Hypercorn's h11 protocol reads the HTTP/2 preface of a client with prior knowledge
as a request, says "busy" (``Updated(idle=False)``: the keep-alive timer stops), and hands
the connection to its h2 protocol, which says "idle" only when a stream ends. A connection
that sent the preface and no request was therefore never idle: the keep-alive timeout
never closed it (any client could hold connections open for good that way), and at
shutdown, where idle connections are closed at once, it held the server for the whole
graceful timeout (a live ``serve --shutdown-timeout 5``: exit after 5.02 s, 0.02 s
without such a connection).

:func:`install` makes ``H2Protocol.initiate`` end by saying "idle" when the connection has
no stream (prior knowledge; an ``h2c`` upgrade starts with the upgraded request's stream,
which says "idle" as it ends, as before). The keep-alive timer then counts from there,
and a shutdown closes the connection at once, as it does an idle HTTP/1.1 one.

Resource handling: nothing is owned; like ``_h2_late_data.install`` it patches Hypercorn
for the whole process (idempotent), and patches nothing if Hypercorn's internals do not
match.
"""

from __future__ import annotations

import logging
from typing import Any

from hypercorn.events import Updated
from hypercorn.protocol.h2 import H2Protocol

log = logging.getLogger(__name__)


def install() -> bool:
    """Make a new HTTP/2 connection idle (idempotent). Returns False, patching nothing, if
    Hypercorn's ``H2Protocol`` no longer has ``initiate`` and ``idle``."""
    original = getattr(H2Protocol, "initiate", None)
    if getattr(original, "punie_trio", False):
        return True
    if original is None or not isinstance(getattr(H2Protocol, "idle", None), property):
        log.warning(
            "Hypercorn internals changed; an HTTP/2 connection without a request "
            "may hold the shutdown"
        )
        return False

    async def initiate(self: H2Protocol, *args: Any, **kwargs: Any) -> None:
        await original(self, *args, **kwargs)
        if self.idle:
            await self.send(Updated(idle=True))

    initiate.punie_trio = True  # type: ignore[attr-defined]
    H2Protocol.initiate = initiate  # type: ignore[method-assign]
    return True
