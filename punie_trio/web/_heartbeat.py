"""Heartbeats for ``/acp`` WebSockets: a peer that went silent is found and dropped, and a
connection that never sends ``initialize`` does not hold a slot for ever.

Why: nothing else notices a peer that is gone without a word (a laptop put to sleep, a
network that dropped, a frozen IDE): TCP keeps such a connection open for many minutes,
Hypercorn has no pong timeout, and punie-trio sets no read timeout (it would end quiet
connections that are fine). Meanwhile the connection counts against ``--max-connections``.
Dropped, the connection ends like any other: its sessions wait out the grace period for the
client to come back.

One task watches every connection (:meth:`Heartbeat.run`), instead of a task per
connection: an idle connection costs a dictionary entry, not a task. Every
:data:`SWEEP_EVERY` seconds it looks at each one:

- heard from within :data:`PING_AFTER` seconds (any bytes: messages, pongs): nothing;
- silent longer: a ping (the client's pong is bytes heard);
- silent for :data:`DROP_AFTER` seconds: dropped (the TCP connection is closed);
- not initialized :data:`INITIALIZE_WITHIN` seconds after it was accepted: closed with
  1008 and a reason, then dropped.

It also answers, for one connection, whether it is alive right now
(:meth:`Heartbeat.alive`): when a new connection's ``initialize`` names the client id an
open one holds, the manager asks, rather than refuse the client its own sessions until the
sweep finds the old connection dead (60-70 s after a network flap or a laptop's resume
left it half-open). The connection is pinged at once; bytes heard from it within
:data:`PROBE_WITHIN` seconds (a message, the pong), or bytes it takes off a write that
waited for room (it reads: the ping waits behind that write), say it is alive; silent, it
is dropped as a dead peer is.

Resource handling: the watcher owns nothing but its table; each drop runs in the
watcher's nursery (a probe's in the caller's task), bounded by :data:`CLOSE_TIMEOUT`.
"""

from __future__ import annotations

import logging
from typing import Protocol

import attrs
import trio

log = logging.getLogger("punie_trio.web")

#: How often the watcher looks at the connections (seconds).
SWEEP_EVERY = 10.0
#: A connection silent this long gets a ping.
PING_AFTER = 20.0
#: A connection silent this long (no pong either) is dropped.
DROP_AFTER = 60.0
#: A connection not initialized this long after it was accepted is closed (1008).
INITIALIZE_WITHIN = 30.0
#: The longest the close frame of a connection being dropped may take to write.
CLOSE_TIMEOUT = 1.0
#: How long a connection probed by :meth:`Heartbeat.alive` has to be heard from (seconds):
#: a pong comes back in a round trip; a client that neither answers a ping nor sends
#: anything for this long is taken for a dead peer (the sweep waits 60 s for one that
#: has no one waiting for its client id).
PROBE_WITHIN = 5.0


class Watched(Protocol):
    """What the watcher needs of a connection (``_asgi_ws.AsgiWebSocketStream`` over
    punie-trio's socket reader)."""

    def last_heard(self) -> float | None:
        """When bytes last came from the client (``trio.current_time``); None if this
        connection cannot be watched (not punie-trio's socket reader)."""
        ...

    def ping_now(self) -> bool:
        """Send a ping if it can be written at once (else skip it: other writes are in
        flight, and bytes heard will tell). True if part of it waits for
        :meth:`finish_sending`."""
        ...

    async def finish_sending(self) -> None:
        """Write what a :meth:`ping_now` kept."""
        ...

    async def drop(self, code: int | None, reason: str) -> None:
        """Close the connection: with a close frame first if ``code`` is given."""
        ...

    def heard_event(self) -> trio.Event | None:
        """An event set when the client is next heard from (any read after this call, or
        progress of a write that waited for room); None where :meth:`last_heard` is."""
        ...

    def closing(self) -> bool:
        """Whether the connection is closing: a close frame came or went, or it is lost."""
        ...


class Initialized(Protocol):
    initialized: bool


@attrs.define(eq=False)
class _Entry:
    connection: Initialized
    since: float


@attrs.define(eq=False)
class Heartbeat:
    """Watches every ``/acp`` WebSocket; start :meth:`run` in a nursery that lives as long
    as the server."""

    sweep_every: float = SWEEP_EVERY
    ping_after: float = PING_AFTER
    drop_after: float = DROP_AFTER
    initialize_within: float = INITIALIZE_WITHIN
    probe_within: float = PROBE_WITHIN
    _watched: dict[Watched, _Entry] = attrs.field(factory=dict, init=False)
    _dropping: set[Watched] = attrs.field(factory=set, init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)

    def watch(self, stream: Watched, connection: Initialized) -> bool:
        """Watch ``stream``, if it can be (punie-trio's socket reader: not over HTTP/2);
        whether it is, and so whether :meth:`alive` can ever find it dead."""
        if stream.last_heard() is None:
            return False
        self._watched[stream] = _Entry(connection, trio.current_time())
        return True

    def unwatch(self, stream: Watched) -> None:
        self._watched.pop(stream, None)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sweep every ``sweep_every`` seconds until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                while True:
                    await trio.sleep(self.sweep_every)
                    self.sweep()
            finally:
                self._nursery = None

    def sweep(self) -> None:
        """Ping the silent, drop the dead and the never initialized (see the module).

        Error handling: a connection whose check fails is logged and skipped; the watcher
        (in the server's root nursery) goes on."""
        now = trio.current_time()
        for stream, entry in list(self._watched.items()):
            if stream in self._dropping:
                continue
            try:
                self._check(stream, entry, now)
            except Exception:
                log.exception("heartbeat: checking a WebSocket failed")

    async def alive(self, connection: Initialized) -> bool:
        """Whether ``connection`` is alive: pinged now, heard from (any bytes: a message,
        the pong; or it reads a write that waited for room: ``heard_event``) within
        ``probe_within`` seconds, and not closing (what was heard may be its client's
        close: then False, with no drop, and its end follows). Silent, it is dropped as
        the sweep drops a dead peer (the TCP connection is closed; its disconnect then
        ends it like any other), and False is returned once the drop is done. True at once for a
        connection this watcher cannot tell dead (not watched: stdio, HTTP/2, or not
        punie-trio's socket reader): the caller keeps it as it is.

        Why a probe and not the sweep's verdict: the sweep only finds a peer dead after
        ``drop_after`` seconds of silence, and meanwhile a client coming back under the
        same client id (its old connection left half-open by a network flap or a laptop
        put to sleep) was refused its own sessions (see ``Manager.take_over``)."""
        stream = next((s for s, e in self._watched.items() if e.connection is connection), None)
        heard = None if stream is None else stream.heard_event()
        if stream is None or heard is None:
            return True
        if stream not in self._dropping:
            with trio.move_on_after(self.probe_within):
                if stream.ping_now():
                    await stream.finish_sending()
                await heard.wait()
                # What was heard may be its client's goodbye (a close frame, handled by
                # now: its read goes on to the protocol before this task runs again): a
                # client reconnecting closes its old connection, and the close could come
                # in behind the new connection's initialize. Not alive then: the caller
                # waits for its end (it was refused as alive, the id free a moment later).
                return not stream.closing()
            reason = (
                f"no answer to a ping within {self.probe_within:g} s "
                "(a new connection names its client id)"
            )
            log.info("closing a WebSocket: %s", reason)
            self._dropping.add(stream)
            await self._drop_one(stream, None, reason)
        return False

    def _check(self, stream: Watched, entry: _Entry, now: float) -> None:
        heard = stream.last_heard()
        if heard is None:
            return
        if not entry.connection.initialized and now - entry.since >= self.initialize_within:
            self._drop(stream, 1008, f"initialize not received within {self.initialize_within:g} s")
        elif now - heard >= self.drop_after:
            self._drop(stream, None, f"no answer to pings for {self.drop_after:g} s")
        elif now - heard >= self.ping_after and stream.ping_now():
            assert self._nursery is not None
            self._nursery.start_soon(self._finish, stream)

    async def _finish(self, stream: Watched) -> None:
        with trio.move_on_after(CLOSE_TIMEOUT):
            try:
                await stream.finish_sending()
            except Exception:
                log.exception("heartbeat: finishing a ping failed")

    def _drop(self, stream: Watched, code: int | None, reason: str) -> None:
        log.info("closing a WebSocket: %s", reason)
        assert self._nursery is not None
        self._dropping.add(stream)
        self._nursery.start_soon(self._drop_one, stream, code, reason)

    async def _drop_one(self, stream: Watched, code: int | None, reason: str) -> None:
        try:
            with trio.move_on_after(CLOSE_TIMEOUT):
                await stream.drop(code, reason)
        except Exception:
            log.exception("heartbeat: dropping a WebSocket failed")
        finally:
            self._dropping.discard(stream)
