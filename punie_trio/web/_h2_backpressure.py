"""HTTP/2 flow control holds the app back: Hypercorn's stream buffer lets its producer go
on only once the buffer has drained below its low-water mark.

Why: Hypercorn's ``StreamBuffer.pop`` (``hypercorn.protocol.h2``) wakes the producer
waiting on a full buffer whenever it hands its sender *less than* the low-water mark. With
the client's flow-control window closed the sender takes nothing at all, which is less:
every send of the app returned at once and the whole response piled up in the buffer. A
client that reads the first 64 KiB of a response and grants no more window made the server
hold all of it in memory (the dev app sending a 200 MB file: +192 MB of RSS in 8 s, for one
stream; a client may open a hundred per connection); and a WebSocket over HTTP/2 that
stopped granting window emptied the connection's bounded outbox into an unbounded one.

:func:`install` makes the wake-up depend on what is left in the buffer: below the
low-water mark the producer goes on, as before when the sender drained it; a buffer the
window keeps full holds it back until the client grants more (or the stream closes, which
wakes it as before).

Resource handling: nothing is owned; like ``_h2_late_data.install`` it patches Hypercorn
for the whole process (idempotent), and patches nothing if Hypercorn's internals do not
match.
"""

from __future__ import annotations

import logging
from typing import Any

from hypercorn.protocol import h2 as hypercorn_h2

log = logging.getLogger(__name__)


def install() -> bool:
    """Make Hypercorn's HTTP/2 stream buffer hold its producer back while it is full
    (idempotent). Returns False, patching nothing, if its internals changed."""
    buffer_class: Any = getattr(hypercorn_h2, "StreamBuffer", None)
    low_water = getattr(hypercorn_h2, "BUFFER_LOW_WATER", None)
    original = getattr(buffer_class, "pop", None)
    if getattr(original, "punie_trio", False):
        return True
    if original is None or low_water is None:
        log.warning(
            "Hypercorn internals changed; an HTTP/2 client that grants no window "
            "may make the server buffer whole responses"
        )
        return False

    async def pop(self: Any, max_length: int) -> bytes:
        length = min(len(self.buffer), max_length)
        data = bytes(self.buffer[:length])
        del self.buffer[:length]
        if len(self.buffer) < low_water:
            await self._paused.set()
        if not self.buffer:
            await self._is_empty.set()
        return data

    pop.punie_trio = True  # type: ignore[attr-defined]
    buffer_class.pop = pop
    return True
