"""Hypercorn's HTTP/2 send buffers: bounded while the client takes nothing, and released
when the connection closes.

Hypercorn's ``H2Protocol`` buffers each stream's outgoing data (``StreamBuffer``) for its
send task, which writes it as the client's flow-control window allows. A writer waits in
the buffer, for room (past the high-water mark) or for it to drain (the body's end). Two
faults, each patched here:

- **A stalled client made the server buffer whole bodies.** The buffer let a waiting writer
  go whenever a pop took less than the low-water mark, counting what was *taken*, not what
  was *left*: with no window the send task takes nothing (``pop(0)``), and each such try
  let the writer push again. So a stream whose client gave no window (a stalled tab, or a
  client doing it on purpose) buffered the whole body: 90 such streams for a 4 MB file
  took the server from 59 to 550 MB, where HTTP/1.1 holds about 256 KiB per stalled
  response. :func:`install` lets the writer go only once the buffer is below the mark.
- **A closed connection left its writers waiting for good.** When the connection closes
  (the client left, or a write to it failed), Hypercorn closes the streams and its send
  task stops, but it left their buffers open: a writer waiting in one waited for ever. The
  connection's task (which waits for every stream's) never ended, and its socket stayed in
  CLOSE-WAIT: an HTTP/2 client that left in the middle of a download it gave no window for
  leaked a descriptor and a task each time, and every shutdown waited its force-exit out.
  (A stream the client resets alone is released: Hypercorn closes its buffer when the next
  write to it fails.) :func:`install` closes every buffer left once ``H2Protocol`` has
  handled ``Closed``: waits in them return, later writes to them are dropped (Hypercorn's
  ``BufferCompleteError``, which it already ignores), and the app learns from the closed
  stream that its peer has gone (``http.disconnect``, and ``stream.closed`` for the dev
  app's ``departed`` check).

The patched ``pop`` also tells the stream's final send, if one waits on it, that the
client took data (``punie_progress``, set by ``_fast_send.final_send``): that send's bound
counts from the client's last progress, not from its start.

Resource handling: nothing is owned; like ``_h2_late_data.install`` it patches Hypercorn for
the whole process (idempotent), and patches nothing if Hypercorn's internals do not match.
"""

from __future__ import annotations

import logging

from hypercorn.events import Closed, Event
from hypercorn.protocol import h2 as hypercorn_h2
from hypercorn.protocol.h2 import H2Protocol, StreamBuffer

log = logging.getLogger(__name__)


async def _pop(self: StreamBuffer, max_length: int) -> bytes:
    """``StreamBuffer.pop``, letting a waiting writer go once what is *left* is below the
    low-water mark (it counted what was taken: ``pop(0)``, all a send task with no window
    can do, let the writer go every time)."""
    length = min(len(self.buffer), max_length)
    data = bytes(self.buffer[:length])
    del self.buffer[:length]
    if len(self.buffer) < hypercorn_h2.BUFFER_LOW_WATER:
        await self._paused.set()
    if len(self.buffer) == 0:
        await self._is_empty.set()
    if data:
        progress = getattr(self, "punie_progress", None)
        if progress is not None:
            progress()  # (a final send waiting on this stream: see _fast_send.final_send)
    return data


def install() -> bool:
    """Bound HTTP/2 send buffers, and close them with their connection (idempotent).
    Returns False, patching nothing, if Hypercorn's ``H2Protocol`` changed."""
    original = H2Protocol.__dict__.get("handle")
    pop = StreamBuffer.__dict__.get("pop")
    if (
        original is None
        or pop is None
        or not hasattr(hypercorn_h2, "BUFFER_LOW_WATER")
        or not hasattr(H2Protocol, "send_task")
    ):
        log.warning("Hypercorn internals changed; HTTP/2 send buffers are as Hypercorn has them")
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
    StreamBuffer.pop = _pop  # type: ignore[method-assign]
    return True
