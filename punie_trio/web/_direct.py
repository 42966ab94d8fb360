"""Bytes written straight to the socket writer, past Hypercorn's per-message path, when
nothing in that path would change them: WebSocket text frames (:class:`DirectFrames`) and
the chunks of a streamed HTTP/1.1 response such as an SSE stream (:class:`DirectChunks`).

Why: every ``websocket.send`` goes ASGI message -> Hypercorn's ``WSStream.app_send`` ->
wsproto's ``Connection.send`` (event object, state checks, frame serialisation) -> Hypercorn's
``H11Protocol.stream_send`` -> the socket writer. Measured with py-spy while a 1,000-turn
``session/load`` replays 19,000 updates, that path is about 60% of the server's CPU; the
frame itself, for a server (never masked), is two to ten header bytes and the UTF-8 text.
An ``http.response.body`` chunk likewise crosses ``HTTPStream.app_send`` and h11 (an event
object, the state machine, the chunked writer) to become ``SIZE CRLF data CRLF``; a reload
broadcast pays that once per open stream.

:class:`DirectFrames` serialises the frames of a batch itself and hands them to
:class:`~._fast_send.FastSendTCPServer` as one write. It is used only while the bytes are
exactly what wsproto would produce: the connection is Hypercorn's HTTP/1.1 WebSocket stream
over punie-trio's socket writer, the ASGI stream is connected and not closed, wsproto's
connection is open, no extension is negotiated (permessage-deflate would compress the
payload) and no fragmented message is in progress. Otherwise (and for anything but text
frames) the caller uses Hypercorn's path, which also ignores sends after a close as before.
:class:`DirectChunks` is used only while the response has started, is not closed, has a
body (not HEAD) and h11 is sending it with chunked framing; the response's last send always
takes Hypercorn's path (it ends the message and Hypercorn's bookkeeping).

Resource handling: nothing is owned; the objects are looked up from the ASGI ``send``
callable once per connection. If Hypercorn's, h11's or wsproto's internals stop matching,
the lookup finds nothing and every message takes Hypercorn's path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import attrs
import h11
import trio
from hypercorn.events import RawData
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream
from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection
from wsproto.events import Pong as PongEvent

from ._fast_send import FastSendTCPServer
from ._frames import ClientFrameReader, Failure, Item, Pong, close_frame
from ._keepalive import KeepAliveTimer

_S = TypeVar("_S", WSStream, HTTPStream)

_ChunkedWriter: type | None
try:  # h11's writer classes are private: without this one, chunks take Hypercorn's path
    from h11._writers import ChunkedWriter as _ChunkedWriter
except ImportError:  # pragma: no cover - depends on the installed h11
    _ChunkedWriter = None


def _connection(
    send: Callable[..., Any], stream_type: type[_S]
) -> tuple[_S, H11Protocol, FastSendTCPServer] | None:
    """Follow the ASGI ``send`` Hypercorn gave the app (its stream's bound ``app_send``) to
    the stream, its HTTP/1.1 protocol and punie-trio's socket writer under them; ``None`` for
    anything else (HTTP/2, TLS, stock Hypercorn, a wrapped ``send``)."""
    stream = getattr(send, "__self__", None)
    if type(stream) is not stream_type:
        return None
    protocol = getattr(stream.send, "__self__", None)
    if type(protocol) is not H11Protocol:
        return None
    server = getattr(protocol.send, "__self__", None)
    if not isinstance(server, FastSendTCPServer):
        return None
    return stream, protocol, server


def _ws_open(stream: WSStream) -> bool:
    """Whether Hypercorn's WebSocket ``stream`` is accepted and open both ways: not closed,
    connected for the app, and wsproto's connection open (no close frame sent or read)."""
    if stream.closed or stream.state is not ASGIWebsocketState.CONNECTED:
        return False
    connection = getattr(stream, "connection", None)
    return connection is not None and connection.state is ConnectionState.OPEN


def text_frame(text: str) -> bytes:
    """One unmasked, final text frame (RFC 6455 section 5.2), as a server sends it."""
    data = text.encode()
    n = len(data)
    if n < 126:
        return bytes((0x81, n)) + data
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2, "big") + data
    return b"\x81\x7f" + n.to_bytes(8, "big") + data


def chunk_frame(data: bytes) -> bytes:
    """One chunk of a chunked HTTP/1.1 body, as h11's ``ChunkedWriter`` writes it (non-empty
    ``data``: an empty chunk would end the body)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


@attrs.frozen
class DirectFrames:
    """The pieces of one Hypercorn WebSocket connection that a direct write needs."""

    stream: WSStream
    server: FastSendTCPServer

    @classmethod
    def find(cls, send: Callable[..., Any]) -> DirectFrames | None:
        """From the ASGI ``send`` Hypercorn gave the app (``WSStream.app_send``); ``None``
        for anything else (see :func:`_connection`)."""
        found = _connection(send, WSStream)
        return None if found is None else cls(found[0], found[2])

    def usable(self) -> bool:
        """Whether a text frame written now is exactly what Hypercorn's path would write."""
        stream = self.stream
        if not _ws_open(stream):
            return False
        proto = getattr(stream.connection, "_proto", None)
        return (
            not getattr(proto, "extensions", True)
            and getattr(proto, "_outbound_opcode", True) is None
        )

    def retire_keepalive(self) -> None:
        """The connection is a WebSocket now: its HTTP keep-alive watcher can end."""
        timer = self.server.idle_task
        if isinstance(timer, KeepAliveTimer):
            timer.retire()

    def send_texts_now(self, texts: Sequence[str]) -> bool | None:
        """Write one text frame per item from synchronous code (call only if
        :meth:`usable`): ``None`` if nothing may be written now, ``False`` if all was,
        ``True`` if a rest is kept for :meth:`finish_sending` (see
        ``FastSendTCPServer.write_now``)."""
        return self.server.write_now(b"".join([text_frame(text) for text in texts]))

    async def finish_sending(self) -> None:
        """Write the rest a :meth:`send_texts_now` kept (nothing if none)."""
        await self.server.flush_gathered()

    def ping_now(self) -> bool:
        """Write an empty ping frame if the connection is open and the socket free (a
        control frame may go between any two frames; see ``_heartbeat``). True if part of
        it is kept for :meth:`finish_sending` (the socket took one byte of two)."""
        if self.lost():
            return False
        return self.server.write_now(b"\x89\x00") is True

    async def drop(self, code: int | None, reason: str) -> None:
        """Close the connection now: a close frame with ``code`` first, if it can be
        written at once (a peer being dropped may have stopped reading)."""
        if code is not None and not self.lost():
            self.server.write_now(close_frame(code, reason))
        await self.server.drop()

    def lost(self) -> bool:
        """Whether a message sent now could not arrive: Hypercorn closed the stream (the
        client reset it, or broke the protocol), a socket write failed, or the connection
        is closing (a close frame went out: wsproto refuses data, and Hypercorn swallows
        its refusal). Hypercorn drops every such send silently, well before the app's
        ``receive`` hears of it. (Checked right before a send: Hypercorn's path decides
        synchronously, on entry, whether it sends.)"""
        return self.server.write_failed or not _ws_open(self.stream)

    async def send_texts(self, texts: Sequence[str]) -> None:
        """Write one text frame per item, in order, in one write (call only if
        :meth:`usable`); ``BrokenResourceError`` if the write failed."""
        if len(texts) == 1:
            data = text_frame(texts[0])
        else:
            data = b"".join([text_frame(text) for text in texts])
        server = self.server
        await server.protocol_send(RawData(data=data))
        if server.write_failed:
            raise trio.BrokenResourceError("the connection was lost while writing")


@attrs.frozen
class DirectChunks:
    """The pieces of one Hypercorn HTTP/1.1 response that a direct body chunk needs."""

    stream: HTTPStream
    protocol: H11Protocol
    server: FastSendTCPServer

    @classmethod
    def find(cls, send: Callable[..., Any]) -> DirectChunks | None:
        """From the ASGI ``send`` Hypercorn gave the app (``HTTPStream.app_send``); ``None``
        for anything else (see :func:`_connection`)."""
        return None if (found := _connection(send, HTTPStream)) is None else cls(*found)

    def usable(self) -> bool:
        """Whether a chunk written now is exactly what Hypercorn and h11 would write."""
        stream = self.stream
        if stream.closed or stream.state is not ASGIHTTPState.RESPONSE:
            return False
        if stream.scope.get("method") == "HEAD":
            return False
        connection = getattr(self.protocol, "connection", None)
        return (
            isinstance(connection, h11.Connection)
            and connection.our_state is h11.SEND_BODY
            and _ChunkedWriter is not None
            and type(getattr(connection, "_writer", None)) is _ChunkedWriter
        )

    def send_chunk_now(self, data: bytes) -> bool | None:
        """Write ``data`` as one chunk from synchronous code (call only if :meth:`usable`):
        ``None`` if it could not be written now (write it the ordinary way), ``False`` if
        it was, ``True`` if the socket writer keeps the rest of the framed chunk ahead of
        every later write, for :meth:`finish_sending` (see ``FastSendTCPServer.
        write_now``)."""
        if not data:
            return False
        return self.server.write_now(chunk_frame(data))

    async def finish_sending(self) -> None:
        """Write the rest a :meth:`send_chunk_now` kept (nothing if none)."""
        await self.server.flush_gathered()

    async def send_chunk(self, data: bytes) -> None:
        """Write ``data`` as one chunk (call only if :meth:`usable`; nothing for b"")."""
        if data:
            await self.server.protocol_send(RawData(data=chunk_frame(data)))


@attrs.define(eq=False)
class DirectReader:
    """A WebSocket client's messages read past wsproto (the other direction of
    :class:`DirectFrames`).

    Why: every frame a client sends crosses Hypercorn's ``H11WSConnection``, wsproto's frame
    and message decoders (a generator, ``Frame`` tuples, an incremental UTF-8 decoder, four
    ``translate`` passes to unmask) and ``WSStream``'s ``StringIO`` buffer before it reaches
    the app as a ``websocket.receive`` event. For the one-frame JSON messages of ACP,
    :class:`~._frames.ClientFrameReader` does the same in one pass. Installed by
    :meth:`install` as the connection's ``frame_reader``; the socket reader of
    :class:`~._fast_send.FastSendTCPServer` then hands it every chunk it reads.

    Messages go into the same channel Hypercorn's ``WSStream`` puts them in (so the app's
    ``receive`` and the order of everything are unchanged), and whatever the frame reader
    passes on (pings, fragments, a close, anything invalid) goes to Hypercorn's protocol as
    before, which answers pings, reassembles fragments and fails bad input (for a protocol
    error the reader sends the close frame first: see :meth:`_fail`). The reader takes over
    only at a moment when wsproto holds nothing (no partial frame, no fragmented message)
    and hands everything back for good once it meets a close frame or anything it would
    not take.

    Resource handling: nothing is owned but the frame reader's buffer (a partial frame).
    Error handling: a message that arrives after the app's side is no longer connected is
    dropped, as Hypercorn's ``WSStream`` drops input once closed.
    """

    stream: WSStream
    protocol: H11Protocol
    server: FastSendTCPServer
    put: trio.MemorySendChannel[dict[str, Any]]
    frames: ClientFrameReader
    active: bool = False

    @classmethod
    def install(cls, send: Callable[..., Any], receive: Callable[..., Any]) -> DirectReader | None:
        """Install a reader on the connection behind the accepted WebSocket's ASGI
        ``send``/``receive``; ``None`` (nothing changed) where that is not Hypercorn's
        HTTP/1.1 WebSocket over punie-trio's socket reader, or an extension is negotiated."""
        found = _connection(send, WSStream)
        if found is None:
            return None
        stream, protocol, server = found
        put = getattr(stream.app_put, "__self__", None)
        channel = getattr(receive, "__self__", None)
        if not (
            isinstance(put, trio.MemorySendChannel)
            and isinstance(channel, trio.MemoryReceiveChannel)
            and getattr(put, "_state", None) is getattr(channel, "_state", 0)
        ):
            return None
        proto = getattr(getattr(stream, "connection", None), "_proto", None)
        if proto is None or getattr(proto, "extensions", True):
            return None
        reader = cls(
            stream,
            protocol,
            server,
            put,
            ClientFrameReader(server.config.websocket_max_message_size),
        )
        server.frame_reader = reader
        return reader

    def _connected(self) -> bool:
        return _ws_open(self.stream)

    def _wsproto_idle(self) -> bool:
        """Whether wsproto and Hypercorn hold nothing of the client's stream: no bytes, no
        partial frame, no message being reassembled. Only then may the reader take over."""
        stream = self.stream
        proto = stream.connection._proto
        decoder = proto._frame_decoder
        pending = getattr(self.protocol.connection, "buffer", None)
        return (
            decoder.header is None
            and len(decoder.buffer) == 0
            and proto._message_decoder.opcode is None
            and stream.buffer.value is None
            and pending is not None
            and not pending
        )

    async def feed(self, data: bytes) -> None:
        """Everything the socket reader read (never b"": EOF takes Hypercorn's path)."""
        if not self.active:
            try:
                ready = self._connected() and self._wsproto_idle()
            except AttributeError:  # internals changed: leave the connection to Hypercorn
                ready = False
                self.server.frame_reader = None
            if not ready:
                await self.protocol_handle(data)
                return
            self.active = True
        frames = self.frames
        items = frames.feed(data)
        while True:
            if frames.done:
                self.server.frame_reader = None
            if not await self._deliver(items):
                return
            if not frames.backlog:
                return
            # One read can hold thousands of tiny frames (a ping or fragment flood): let
            # the other connections' tasks run between steps of bounded work.
            await trio.lowlevel.checkpoint()
            items = frames.feed()

    async def _deliver(self, items: list[Item]) -> bool:
        """Hand on what the frame reader made of a read; False once the connection has
        failed on a protocol error (nothing more is read from it)."""
        put = self.put
        for item in items:
            if isinstance(item, bytearray):
                await self.protocol_handle(bytes(item))
                continue
            if isinstance(item, Failure):
                await self._fail(item.code, item.reason)
                if item.code != 1009:
                    # A protocol error fails the connection (RFC 6455 7.1.7): no more of
                    # its data is processed. The bad bytes went on to wsproto, which failed
                    # on them too; but the frame reader joins fragments itself, and wsproto,
                    # which never saw a message open, took a whole frame sent inside a
                    # fragmented message for a message and the app got it (a review).
                    self.server.frame_reader = None
                    await self.server.drop()
                    return False
                continue
            if isinstance(item, Pong):
                if self._connected():  # (wsproto refuses it once a close went out)
                    await self.stream._send_wsproto_event(PongEvent(payload=item.payload))
                continue
            if not self._connected():
                continue
            event: dict[str, Any]
            if isinstance(item, str):
                event = {"type": "websocket.receive", "bytes": None, "text": item}
            else:
                event = {"type": "websocket.receive", "bytes": item[0], "text": None}
            try:
                put.send_nowait(event)
            except trio.WouldBlock:
                await put.send(event)  # the app is behind: wait, as Hypercorn does
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        return True

    async def _fail(self, code: int, reason: str) -> None:
        """Send the close frame for a failure the frame reader found (a
        :class:`~._frames.Failure`): a protocol error, ahead of the bad bytes, or a message
        over the size bound.

        Why: for a protocol error wsproto reports it too, but Hypercorn then drops the TCP
        connection without a close frame; a message over the bound the frame reader
        measures in bytes (Hypercorn counts characters). Sent through wsproto, so it knows
        the connection is closing: the app's later sends are dropped
        (:meth:`DirectFrames.usable` is false, Hypercorn ignores them), and the bad bytes
        that follow, or the client's close, end the connection.
        """
        if self._connected():
            await self.stream._send_wsproto_event(CloseConnection(code=code, reason=reason))

    async def protocol_handle(self, data: bytes) -> None:
        await self.server.protocol.handle(RawData(data=data))
