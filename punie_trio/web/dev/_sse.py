"""The ``/__reload__`` Server-Sent Events stream of one client.

Shape: one task per stream writes; a sibling task blocks on ``receive()`` for
``http.disconnect`` and cancels the stream when it comes (Hypercorn's ``send()`` does not raise
once the client has gone, so without it a closed tab would keep a subscriber until the next
keepalive, and a stream with no events would live forever). A second sibling wakes the writer
when a keepalive is due and when the server-wide ``closing`` event is set, so every stream
sends ``event: shutdown`` and ends.

Cost of an event, per stream: when the writer is parked with nothing pending, the offer itself
writes the event to the socket (:meth:`._broadcast.Subscriber._write_now`: no task is woken);
otherwise the writer is rescheduled, takes its pending state, and sends one chunk (status and
reload together when both are pending). Either way the chunk goes straight to punie-trio's
socket writer when Hypercorn's path would frame it the same (:class:`~.._direct.DirectChunks`).
No timer, event object or queue is created per event (see :class:`._broadcast.Subscriber`),
which keeps a broadcast to a thousand streams cheap and leaves the cyclic GC little to do.

Resource handling: the subscriber is registered before the first byte is sent and removed in
``finally``, so no path leaves it behind. The response is always ended with a shielded final
send (see :func:`._asgi.finish`).
"""

from __future__ import annotations

import trio

from .._direct import DirectChunks
from . import _events
from ._asgi import Receive, Send, finish, start
from ._broadcast import Broadcaster, Subscriber

HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


async def _wake_for_keepalive_or_closing(
    closing: trio.Event, subscriber: Subscriber, keepalive: float
) -> None:
    """Wake the writer once ``keepalive`` seconds passed since its last write, and when the
    server closes. The timer lives here, not around each wait of the writer, so an event costs
    the writer no timer of its own; this task runs once per keepalive interval."""
    while not closing.is_set():
        deadline = subscriber.last_sent + keepalive
        if trio.current_time() >= deadline:
            subscriber.wake()
            deadline = trio.current_time() + keepalive
        with trio.move_on_at(deadline):
            await closing.wait()
    subscriber.wake()


async def _finish_unfinished(subscriber: Subscriber, direct: DirectChunks | None) -> bool:
    """Write the rest of a chunk an offer began; whether there was one."""
    if not subscriber.take_unfinished():
        return False
    assert direct is not None
    await direct.finish_sending()
    return True


async def stream_events(
    broadcaster: Broadcaster,
    since: int | None,
    receive: Receive,
    send: Send,
    *,
    closing: trio.Event,
    keepalive: float = 15.0,
    retry_ms: int = _events.RETRY_MS,
    run: str | None = None,
) -> None:
    """Serve one SSE response until the client leaves or ``closing`` is set.

    ``since`` is the generation the client has seen (``Last-Event-ID`` or ``?since=``), of
    server run ``run`` (``None``: not said, taken as this run); what it missed is replayed,
    merged, as the first event (a full reload for another run's client). Keepalive comments go
    out after ``keepalive`` seconds without an event (read from Trio's clock, so MockClock
    drives it).
    """
    subscriber = broadcaster.subscribe(since, run)
    started = False
    final = b""
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            await start(send, 200, HEADERS)
            started = True
            await send(
                {
                    "type": "http.response.body",
                    "body": _events.opening(retry_ms),
                    "more_body": True,
                }
            )
            subscriber.last_sent = trio.current_time()
            nursery.start_soon(_wake_for_keepalive_or_closing, closing, subscriber, keepalive)
            direct = DirectChunks.find(send)
            subscriber.direct = direct  # offers may now write to the socket themselves
            while not closing.is_set():
                await subscriber.wait()  # an event for us, a keepalive due, or closing
                flushed = await _finish_unfinished(subscriber, direct)
                if closing.is_set():
                    break
                events = subscriber.take()
                if not events and flushed:  # woken for the rest of a chunk an offer began
                    subscriber.last_sent = trio.current_time()
                    continue
                chunk = (
                    b"".join([_events.encode(e, broadcaster.run) for e in events])
                    or _events.KEEPALIVE
                )
                if direct is not None and direct.usable():
                    # Past Hypercorn's per-message path: a broadcast pays it per stream.
                    await direct.send_chunk(chunk)
                else:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                subscriber.last_sent = trio.current_time()
            await _finish_unfinished(subscriber, direct)
            final = _events.shutdown(broadcaster.run, broadcaster.generation)
            nursery.cancel_scope.cancel()
    finally:
        broadcaster.unsubscribe(subscriber)
        if started:
            await finish(send, final)
