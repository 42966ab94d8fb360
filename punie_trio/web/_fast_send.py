"""Faster socket writes for Hypercorn's trio worker: no checkpoint when the kernel takes the
bytes at once, and one system call for a batch of frames.

Why: every WebSocket frame (one ACP message) ends in Hypercorn's
``TCPServer.protocol_send``, which takes a lock, opens a shielded scope and awaits
``SocketStream.send_all``: two checkpoints, each a trip through trio's scheduler with an
``epoll_wait``, and one ``send()`` system call per frame. Measured on loopback, that path
caps raw Hypercorn-trio at 14,000-34,000 frames/s.

:class:`FastSendTCPServer` (installed by :func:`install`) changes only how bytes reach the
socket:

- When no other write is in flight (the send lock is free, so nothing is queued ahead and
  byte order is kept) it calls the stdlib socket's non-blocking ``send`` directly. If the
  kernel takes everything, it returns without a checkpoint; the rest, if any, goes through
  Hypercorn's own path (lock, shielded ``send_all``), which waits for the socket to drain.
- Inside :func:`coalesced_writes` (the peer's writer wraps a batch of queued messages in
  it) the frames' bytes are gathered and leave together at the end of the block.

A failed write closes the socket and reports ``Closed`` to the protocol from a task of its
own (see :meth:`FastSendTCPServer._write_lost` for why not from the writer).

Reading is Hypercorn's loop too (but for an accepted WebSocket's messages, which
:class:`~._direct.DirectReader` decodes past wsproto), minus the ``fail_after`` scope it
opens around every ``receive_some`` when no ``read_timeout`` is configured (punie-trio
never sets one: it would end quiet SSE streams): a cancel scope per received frame, for an
infinite deadline. A read is handed to Hypercorn :data:`HANDLE_STEP` bytes at a time, with
a checkpoint between, so one connection's read of many tiny frames lets others run.

The keep-alive timeout is :class:`~._keepalive.KeepAliveTimer`: one watcher task per
connection whose deadline moves, instead of a timer task started anew after every response.

Resource handling: nothing new is owned per connection (an idle connection carries no
buffer; the keep-alive watcher replaces Hypercorn's timer task and ends with the
connection). :func:`install` (idempotent) swaps the class Hypercorn's ``worker_serve``
instantiates per connection, for the whole process. If Hypercorn's internals ever stop
matching (checked at install), nothing is patched and Hypercorn runs unchanged, only slower.
"""

from __future__ import annotations

import contextvars
import logging
import math
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import hypercorn.trio.run as _hypercorn_run
import trio
from hypercorn.events import Closed, Event, RawData
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer

from ._keepalive import KeepAliveTimer
from ._swap import swap_class

log = logging.getLogger(__name__)

#: A coalesced block writes out early once it has gathered this much for one connection.
COALESCE_LIMIT = 256 * 1024
#: The most bytes of one read handed to Hypercorn's protocol at once, a checkpoint between
#: pieces (where the direct reader does not read: HTTP, compressed WebSockets).
HANDLE_STEP = 4096
#: How often a write waiting for a full socket checks whether the server is terminating.
STALL_CHECK = 0.25

_gathering: contextvars.ContextVar[list[FastSendTCPServer] | None] = contextvars.ContextVar(
    "punie_trio_coalesced_writes", default=None
)


#: The longest a final send (:func:`final_send`) may take, as a rule...
FINAL_SEND_TIMEOUT = 5.0
#: ...and how long it may still wait once the server shuts down:
#: what is left of a shutdown may be no more than the watchdog's grace
#: (``server.FORCE_EXIT_GRACE``, 2 s), shared with everything else still ending.
SHUTDOWN_FINAL_SEND = 0.25
#: The scopes of the final sends under way in this Trio run, and whether its server shuts
#: down (see :func:`cut_final_sends`).
_final_sends: trio.lowlevel.RunVar[set[trio.CancelScope]] = trio.lowlevel.RunVar(
    "punie_trio_final_sends"
)
_shutting_down: trio.lowlevel.RunVar[bool] = trio.lowlevel.RunVar(
    "punie_trio_final_sends_cut", default=False
)


def _final_scopes() -> set[trio.CancelScope]:
    try:
        return _final_sends.get()
    except LookupError:
        scopes: set[trio.CancelScope] = set()
        _final_sends.set(scopes)
        return scopes


@contextmanager
def final_send(send: Any, timeout: float) -> Iterator[None]:
    """A shielded scope for the send that ends a response or a WebSocket (``send`` is the
    ASGI send it calls): it must complete even while the handler is cancelled, or
    Hypercorn's bookkeeping of the stream is cut off. Bounded by ``timeout`` seconds, and by
    :data:`SHUTDOWN_FINAL_SEND` once the server shuts down (Hypercorn's ``terminated``, or
    :func:`cut_final_sends` for one already waiting) or when the caller is cancelled.
    Over HTTP/2 (Hypercorn's own ``send``), ``timeout`` counts from the client's last
    progress: each time its stream's buffer gives data to the connection
    (``_h2_buffers``), the send gets ``timeout`` more, until the server shuts down.

    Why the shutdown's bound: over HTTP/2 such a send waits for Hypercorn to drain the
    stream, which a client that grants no more flow-control window never lets happen (a
    wait that may have begun before the shutdown: a small response's only send, or the
    last of one Hypercorn buffered whole before ``_h2_buffers``). Shielded for its
    ``timeout`` (5 s) or for good, it held the
    process past its shutdown until the watchdog ended it, status 1. Over HTTP/1.1 the
    socket write inside is shielded on its own (:meth:`FastSendTCPServer._write`) and
    stops only as a stalled write does: the bound there cuts only a wait for a write in
    flight (the send lock).

    Why from the last progress over HTTP/2: that wait lasts as long as the client takes
    to read the whole body the send carries (a response sent in one piece, up to 1 MiB
    for ``/echo``; a dev page's or file's last piece and what is buffered before it).
    Counted in all, a client that read steadily but slowly (64 KiB a second) had its
    response cut at 5 s, in a normal run: the app returned before the body's end was
    queued, and the stream never ended."""
    stream = getattr(send, "__self__", None)
    context = getattr(stream, "context", None)
    terminated = getattr(context, "terminated", None)
    if (
        _shutting_down.get()
        or (terminated is not None and terminated.is_set())
        or trio.current_effective_deadline() == -math.inf  # (cancelled)
    ):
        timeout = min(timeout, SHUTDOWN_FINAL_SEND)
        buffer = None
    else:
        buffer = _h2_stream_buffer(stream)
    scopes = _final_scopes()
    with trio.CancelScope(shield=True, deadline=trio.current_time() + timeout) as scope:

        def progress() -> None:
            if not _shutting_down.get() and not (terminated is not None and terminated.is_set()):
                scope.deadline = max(scope.deadline, trio.current_time() + timeout)

        scopes.add(scope)
        if buffer is not None:
            buffer.punie_progress = progress
        try:
            yield
        finally:
            scopes.discard(scope)
            if buffer is not None and getattr(buffer, "punie_progress", None) is progress:
                buffer.punie_progress = None


def _h2_stream_buffer(stream: Any) -> Any:
    """The HTTP/2 send buffer (Hypercorn's ``StreamBuffer``) of ``stream`` (the
    ``HTTPStream`` or ``WSStream`` whose ``app_send`` the app was given), or None: another
    protocol, or a ``send`` the app wrapped."""
    protocol = getattr(getattr(stream, "send", None), "__self__", None)
    buffers = getattr(protocol, "stream_buffers", None)
    if not isinstance(buffers, dict):
        return None
    return buffers.get(getattr(stream, "stream_id", None))


def cut_final_sends() -> None:
    """The server shuts down: every final send still waiting (:func:`final_send`) gets
    :data:`SHUTDOWN_FINAL_SEND` more at most, and so does every later one in this run (a
    ``send`` wrapped by the app does not tell Hypercorn's ``terminated``)."""
    _shutting_down.set(True)
    limit = trio.current_time() + SHUTDOWN_FINAL_SEND
    for scope in _final_scopes():
        scope.deadline = min(scope.deadline, limit)


@asynccontextmanager
async def coalesced_writes() -> AsyncIterator[None]:
    """Gather the socket writes this task makes inside the block; write them at its end.

    Hypercorn writes each WebSocket frame with its own ``send()`` system call. A writer
    with a backlog (a streamed turn, a ``session/load`` replay) sends its frames inside this
    block, and each connection's bytes leave in one system call (or one per
    :data:`COALESCE_LIMIT`). The frames, and their order, are unchanged. Outside a
    :class:`FastSendTCPServer` (TLS, or Hypercorn internals changed) it changes nothing.

    Resource handling: the gathered bytes are written even if the block raises or is
    cancelled (shielded, as Hypercorn shields its own socket writes): the application
    already considers them sent.
    """
    gathering: list[FastSendTCPServer] = []
    token = _gathering.set(gathering)
    try:
        yield
    finally:
        _gathering.reset(token)
        if gathering:
            with trio.CancelScope(shield=True):
                for server in gathering:
                    await server.flush_gathered()


class FastSendTCPServer(TCPServer):
    """Hypercorn's per-connection ``TCPServer``, writing without a checkpoint when it can,
    gathering writes made inside :func:`coalesced_writes`, and timing keep-alive with a
    :class:`~._keepalive.KeepAliveTimer`."""

    # Class-level defaults: an idle connection carries no list of its own.
    _gathered: list[bytes] | None = None
    _gathered_bytes = 0
    #: An accepted WebSocket's :class:`~._direct.DirectReader`: it gets every chunk read
    #: (but EOF) instead of Hypercorn's protocol, and hands on what it does not decode.
    frame_reader: Any = None
    #: A socket write failed (the peer reset the connection, or stopped reading during
    #: shutdown): Hypercorn is told ``Closed``, and later writes are dropped by it
    #: silently, so a writer that must know what did not go out checks this.
    write_failed = False
    #: The read loop's scope, cancelled once the protocol has closed the connection.
    _reading: trio.CancelScope | None = None
    #: Set (and forgotten) when the peer is next heard from; made by whoever waits for
    #: that (:meth:`heard_event`). Class-level None: an idle connection carries none.
    _heard: trio.Event | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.idle_task = KeepAliveTimer(self)  # type: ignore[assignment]
        #: When bytes last came from the peer (``trio.current_time``; see ``_heartbeat``).
        self.last_read = trio.current_time()

    async def run(self) -> None:
        """Serve the connection; an error escaping it ends this connection only.

        Error handling: Hypercorn lets an exception out of a connection's task (for one, an
        app that failed inside ``websocket.accept``: its clean-up then fails again), and
        ``serve_listeners`` would take the whole server down with it. By the time it gets
        here the connection's task group has finished and Hypercorn has closed the socket,
        so it is logged and dropped. Cancellation (a ``BaseException``) passes.
        """
        try:
            await super().run()
        except Exception:
            log.exception("connection failed and was closed; the server goes on")
        finally:
            self._release()

    def _release(self) -> None:
        """Break the reference cycles a finished connection would leave to the collector.

        Why: this object holds Hypercorn's protocol, whose ``send`` is this object's bound
        ``protocol_send``, and the keep-alive timer and direct reader hold this object: a
        cycle through everything the connection had (wsproto, h11, the WebSocket stream with
        a message being reassembled, up to the message size bound). The server's collector
        runs rarely (``server.GC_THRESHOLDS``), so a closed connection's memory came back
        late: an audit saw RSS reach 3 GB over rounds of 40 connections that each left a
        16 MiB message unfinished. Once ``run`` is over every task of the connection (the
        app's too: it runs in the connection's task group) has ended, so nothing needs
        these links any more; the connection is freed as soon as nothing else holds it.
        Later calls find a protocol and a timer that do nothing.
        """
        self.frame_reader = None
        self.protocol = _ENDED  # type: ignore[assignment]
        self.idle_task = _ENDED  # type: ignore[assignment]

    def heard_event(self) -> trio.Event:
        """An event set when the peer is next heard from: bytes come from it (a message,
        a pong: any read after this call), or it takes bytes off a write that waited for
        room. Never set if neither happens (the connection may end first).

        Why a write's progress too: a write that waits for room holds the socket, so no
        ping can go out meanwhile, and a client reading a long write (a turn streaming
        megabytes, a load's replay) while sending nothing was taken for dead by a probe
        (``Heartbeat.alive``), dropped, and its sessions taken over by the connection
        that named its client id. Room comes back only as the peer's TCP acknowledges
        what its application read: a peer that is gone, or has stopped reading, makes
        none."""
        if self._heard is None:
            self._heard = trio.Event()
        return self._heard

    def _heard_from(self) -> None:
        heard = self._heard
        if heard is not None:
            self._heard = None
            heard.set()

    async def _read_data(self) -> None:
        try:
            # The scope ends with the HTTP phase: an accepted WebSocket's frames go to its
            # frame reader, not into the protocol, so nothing can wait there for good. An
            # idle WebSocket then holds no scope (a CancelScope and its CancelStatus, about
            # 0.65 KiB a connection: 30.6 -> 31.3 KiB at 5,000 in `connections`).
            with trio.CancelScope() as reading:
                self._reading = reading
                upgraded = await self._read_until_closed(until_upgraded=True)
            self._reading = None
            if reading.cancelled_caught:
                await self.protocol.handle(Closed())  # (as the loop's own end does)
            elif upgraded:
                await self._read_until_closed(until_upgraded=False)
        finally:
            # The connection is closing: its keep-alive watcher has nothing left to watch,
            # and it must not hold the connection's task group open until its deadline.
            self.idle_task.close()  # type: ignore[attr-defined]

    async def _read_until_closed(self, *, until_upgraded: bool) -> bool:
        """Read until the peer or the server closes the connection (False), or, with
        ``until_upgraded``, until the first read handed to an accepted WebSocket's frame
        reader (True: the caller reads on). Ended from outside too, when the protocol says
        the connection is over (see :meth:`protocol_send`)."""
        if self.config.read_timeout is not None:
            await super()._read_data()
            return False
        stream, handle = self.stream, self.protocol.handle
        sock = _stdlib_socket(stream)
        drained = False
        while True:
            try:
                if sock is None:
                    data = await stream.receive_some(MAX_RECV)
                else:
                    data = await _receive(sock, drained)
                    drained = len(data) < MAX_RECV
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                break
            self.last_read = trio.current_time()
            self._heard_from()
            reader = self.frame_reader
            if reader is not None and data:
                await reader.feed(bytes(data))
                if until_upgraded:
                    return True
                continue
            if len(data) > HANDLE_STEP:
                # Hypercorn handles what it is given in one go: a read of 9,000 tiny frames
                # (a ping flood on a compressed WebSocket) held every other client up.
                view = memoryview(data)
                for start in range(0, len(data) - HANDLE_STEP, HANDLE_STEP):
                    await handle(RawData(bytes(view[start : start + HANDLE_STEP])))
                    await trio.lowlevel.checkpoint()
                data = bytes(view[start + HANDLE_STEP :])
            await handle(RawData(bytes(data)))
            if data == b"":
                break
        await handle(Closed())
        return False

    async def protocol_send(self, event: Event) -> None:
        if type(event) is RawData:
            gathering = _gathering.get()
            if gathering is not None:
                if not self._gathered:
                    gathering.append(self)
                    if self._gathered is None:
                        self._gathered = []
                elif self not in gathering:  # the kept rest of a write_now: flushed with it
                    gathering.append(self)
                self._gathered.append(event.data)
                self._gathered_bytes += len(event.data)
                if self._gathered_bytes >= COALESCE_LIMIT:
                    await self.flush_gathered()
            elif self._gathered:
                # Bytes gathered by another task (a coalescing writer) go out first.
                self._gathered.append(event.data)
                await self.flush_gathered()
            else:
                await self._write(event.data)
            return
        if self._gathered:  # e.g. Closed: what was "sent" before it leaves before it
            await self.flush_gathered()
        await super().protocol_send(event)
        if type(event) is Closed and self._reading is not None:
            # The protocol ended the connection (the socket is closed now): the read loop
            # has nothing left to read, but it may be waiting inside the protocol. A
            # response that ends while the server terminates, with a request pipelined
            # behind it, leaves h11 paused on that request, and Hypercorn's protocol, which
            # does not start the next cycle once terminating, never wakes it: the
            # connection, and the shutdown with it, then waited for graceful_timeout.
            self._reading.cancel()

    async def flush_gathered(self) -> None:
        """Write the gathered bytes now (a no-op when there are none)."""
        if not self._gathered:
            return
        data = b"".join(self._gathered)
        self._gathered.clear()
        self._gathered_bytes = 0
        await self._write(data)

    def send_now(self, data: bytes) -> int | None:
        """Write what the kernel takes of ``data`` at once, from synchronous code; return
        how many bytes that was (the caller must write the rest, in order, before anything
        else), or ``None`` if nothing may be written now: a write is in flight or gathered,
        the socket is not a plain one, or it failed (the caller's ordinary write will meet
        the failure and report it as Hypercorn does)."""
        if self._gathered or self.send_lock.locked():
            return None
        sock = _stdlib_socket(self.stream)
        if sock is None:
            return None
        try:
            return sock.send(data)
        except BlockingIOError:
            return 0
        except OSError:
            return None

    def write_now(self, data: bytes) -> bool | None:
        """:meth:`send_now`, keeping what the kernel did not take: ``None`` if nothing may
        be written now (nothing was), ``False`` if all of ``data`` was written, ``True`` if
        the rest is kept as gathered bytes. Kept there, it goes out ahead of every later
        write (``protocol_send`` appends after it and flushes, ``Closed`` flushes it
        first, ``send_now`` refuses), so no other bytes (Hypercorn's pong, say) can land
        inside the frame it cuts; the caller has :meth:`flush_gathered` called soon."""
        sent = self.send_now(data)
        if sent is None:
            return None
        if sent == len(data):
            return False
        self._gathered = [data[sent:]]
        self._gathered_bytes = len(data) - sent
        return True

    async def _write(self, data: bytes) -> None:
        sock = _stdlib_socket(self.stream)
        if sock is None:  # TLS or unknown: Hypercorn's own path
            await super().protocol_send(RawData(data=data))
            return
        if not self.send_lock.locked():
            # No write in flight (it would hold the lock), so nothing is queued ahead of us.
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:  # reset, broken pipe, or closed under us
                await self._write_lost()
                return
            if sent == len(data):
                return
            data = data[sent:]
        # The kernel's buffer is full: wait for room, in order, holding the send lock.
        async with self.send_lock:
            with trio.CancelScope(shield=True):
                outcome = await self._write_when_writable(sock, memoryview(data))
        if outcome == "abandoned":
            # A peer that stops reading must not hold the server's shutdown past its
            # timeout (Hypercorn's own shielded write would, forever).
            log.info("closing a connection whose peer stopped reading during shutdown")
        if outcome != "sent":
            await self._write_lost()

    async def _write_lost(self) -> None:
        """A write failed: the connection is over. The socket is closed, and the protocol is
        told ``Closed`` from a task of its own (the app's disconnect follows).

        Why not tell the protocol here, in the writer, as Hypercorn does: its WebSocket
        stream then puts ``websocket.disconnect`` into the app's bounded channel, and waits
        while it is full. A client that stopped reading fills that channel too, once the
        app's reader waits on the full outbox, which only this writer drains: writer and
        reader each waited for the other for good (an audit: the connection stayed counted
        and its client id "in use" until a restart). Returning lets the writer report the
        failure (``write_failed``) and the app end its side; the app then reads on to its
        disconnect (``AsgiWebSocketStream.wait_disconnected``). Why not leave it to the
        read loop, which the closed socket wakes: with a pipelined request waiting, h11 is
        paused and the read loop waits on the protocol, not the socket (a review: an SSE
        stream whose client pipelined a request and reset was never let go)."""
        if self.write_failed:
            return
        self.write_failed = True
        await self.stream.aclose()
        task_group = getattr(self, "_task_group", None)
        if task_group is not None:
            task_group.spawn(self.protocol.handle, Closed())

    async def _write_when_writable(self, sock: socket.socket, view: memoryview) -> str:
        """Write all of ``view``, waiting for the socket to drain. Shielded by the caller
        (a frame must not be cut short), so it watches the shutdown itself: once the server
        is terminating, a socket that takes nothing for :meth:`_stall_limit` is abandoned.
        Returns "sent", "closed" (the peer is gone) or "abandoned"."""
        stalled_since: float | None = None
        waited = False
        while view:
            try:
                sent = sock.send(view)
            except BlockingIOError:
                sent = 0
            except OSError:
                return "closed"
            if sent:
                view = view[sent:]
                stalled_since = None
                if waited:
                    self._heard_from()  # (it read: see heard_event)
                continue
            if self.context.terminated.is_set():
                now = trio.current_time()
                if stalled_since is None:
                    stalled_since = now
                elif now - stalled_since >= self._stall_limit():
                    return "abandoned"
            with trio.move_on_after(STALL_CHECK):
                try:
                    await trio.lowlevel.wait_writable(sock)
                except trio.ClosedResourceError:  # closed under us (see drop)
                    return "closed"
            waited = True
        return "sent"

    async def abort(self) -> None:
        """End the connection now, as a failed write does (``write_failed``, the socket
        closed, ``Closed`` told to the protocol from a task of its own): for a response the
        app cannot complete (a file that shrank while it was sent), so that the client sees
        the body cut short rather than a complete-looking one, and a request pipelined
        behind it is refused (the app's ``departed`` check reads ``write_failed``)."""
        await self._write_lost()

    async def drop(self) -> None:
        """Close the connection now: the socket closes (a write waiting for room ends), and
        the read loop, woken by it, tells the protocol ``Closed`` as for any peer that
        left (the app gets its disconnect). Nothing here waits for the app."""
        await self.stream.aclose()

    def _stall_limit(self) -> float:
        """How long a write may make no progress once the server is terminating: half the
        graceful timeout, at most one second, so the rest of the shutdown still fits."""
        return min(1.0, self.config.graceful_timeout / 2)


class _Ended:
    """A finished connection's protocol and keep-alive timer (see
    ``FastSendTCPServer._release``): every call does nothing."""

    async def handle(self, event: Event) -> None:
        pass

    async def restart(self, task_group: Any, action: Any) -> None:
        pass

    async def stop(self) -> None:
        pass

    def close(self) -> None:
        pass


_ENDED = _Ended()


def install() -> bool:
    """Make Hypercorn's trio worker use :class:`FastSendTCPServer` (idempotent). Returns
    False, patching nothing, if Hypercorn's internals no longer look as expected."""
    return swap_class(
        _hypercorn_run, "TCPServer", TCPServer, FastSendTCPServer, "using its default socket writes"
    )


async def _receive(sock: socket.socket, drained: bool) -> bytes:
    """``SocketStream.receive_some`` for the plain socket under it, minus a system call.

    trio's ``receive_some`` always tries ``recv`` first and waits for readability only when
    that fails. A connection that just read less than it asked for has (almost always) an
    empty kernel buffer, so that first ``recv`` fails: one wasted system call and one
    ``BlockingIOError`` per message. Here a ``drained`` socket is waited on first, and the
    ``recv`` after the wake finds the data. Otherwise (the last read filled the buffer) it
    reads at once, after a checkpoint, as trio does. Errors are trio's: a socket closed
    under the wait raises ``ClosedResourceError``, an ``OSError`` from ``recv``
    ``BrokenResourceError``."""
    if not drained:
        await trio.lowlevel.checkpoint()
    while True:
        if drained:
            if sock.fileno() == -1:
                raise trio.ClosedResourceError("socket was closed")
            await trio.lowlevel.wait_readable(sock)
        try:
            return sock.recv(MAX_RECV)
        except BlockingIOError:
            drained = True
        except OSError as exc:
            if sock.fileno() == -1:
                raise trio.ClosedResourceError("socket was closed") from None
            raise trio.BrokenResourceError(str(exc)) from exc


def _stdlib_socket(stream: Any) -> socket.socket | None:
    """The plain socket under a trio ``SocketStream`` (None for TLS or anything else)."""
    sock = getattr(getattr(stream, "socket", None), "_sock", None)
    return sock if isinstance(sock, socket.socket) else None
