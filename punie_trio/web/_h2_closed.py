"""When an HTTP/2 connection closes, every stream's send buffer is closed too, so a response
still being written to it ends instead of waiting for good.

Why: Hypercorn's ``H2Protocol`` buffers each stream's outgoing data (``StreamBuffer``) for
its send task, which writes it as the client's flow-control window allows. A writer waits
in the buffer, for room (past the high-water mark) or for it to drain (the body's end).
When the connection closes (the client left, or a write to it failed), Hypercorn closes the
streams and its send task stops, but it leaves their buffers open: a writer waiting in one
waited for ever. The connection's task (which waits for every stream's) never ended, and
its socket stayed in CLOSE-WAIT: an HTTP/2 client that left in the middle of a download it
gave no window for leaked a descriptor and a task each time (a loop of them takes every
descriptor), and every shutdown waited its force-exit out. (A stream the client resets
alone is released: Hypercorn closes its buffer when the next write to it fails.)

:func:`install` closes every buffer left once ``H2Protocol`` has handled ``Closed``: waits in
them return, later writes to them are dropped (Hypercorn's ``BufferCompleteError``, which it
already ignores), and the app learns from the closed stream that its peer has gone
(``http.disconnect``, and ``stream.closed`` for the dev app's ``departed`` check).

Resource handling: nothing is owned; like ``_h2_late_data.install`` it patches Hypercorn for
the whole process (idempotent), and patches nothing if Hypercorn's internals do not match.
"""

from __future__ import annotations

import logging

from hypercorn.events import Closed, Event
from hypercorn.protocol.h2 import H2Protocol

log = logging.getLogger(__name__)


def install() -> bool:
    """Close an HTTP/2 connection's stream buffers when it closes (idempotent). Returns
    False, patching nothing, if Hypercorn's ``H2Protocol`` changed."""
    original = H2Protocol.__dict__.get("handle")
    if original is None or not hasattr(H2Protocol, "send_task"):
        log.warning("Hypercorn internals changed; a closed HTTP/2 connection may keep a writer")
        return False
    if getattr(original, "punie_trio", False):
        return True

    async def handle(self: H2Protocol, event: Event) -> None:
        await original(self, event)
        if isinstance(event, Closed):
            for buffer in list(getattr(self, "stream_buffers", {}).values()):
                await buffer.close()

    handle.punie_trio = True  # type: ignore[attr-defined]
    H2Protocol.handle = handle  # type: ignore[method-assign]
    return True
