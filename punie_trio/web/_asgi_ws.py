"""The server side of an ASGI WebSocket as a :class:`MessageStream` (under Hypercorn).

The message size bound is applied in bytes by the direct reader (:mod:`._frames`: close
1009), or by Hypercorn (``websocket_max_message_size``, in characters) where that reader is
off; either way the close is preceded by a -32600 with a null id (:mod:`._ws_refusals`).
Binary frames are accepted and handed on as bytes, which the codec parses as UTF-8 JSON.
Outgoing text frames skip Hypercorn's per-message path when that path would not change them,
and incoming single-frame messages are decoded past wsproto (:mod:`._direct`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import trio

from ..transport import NotSent
from ._direct import DirectFrames, DirectReader
from ._fast_send import coalesced_writes, final_send

ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]

#: The longest the close frame's send may take (see :meth:`AsgiWebSocketStream.close`).
CLOSE_SEND_TIMEOUT = 5.0


@attrs.define(eq=False)
class AsgiWebSocketStream:
    receive: ASGIReceive
    send: ASGISend
    disconnected: bool = False
    closed: bool = False
    #: Found from ``send`` (make the stream once the WebSocket is accepted); None: not
    #: available, every frame takes Hypercorn's path.
    _direct: DirectFrames | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self._direct = DirectFrames.find(self.send)
        if self._direct is not None:
            # Accepted: the connection will not serve another HTTP request.
            self._direct.retire_keepalive()
            # And the client's frames are read past wsproto from now on (when it can be).
            DirectReader.install(self.send, self.receive)

    # -- heartbeat (``_heartbeat.Watched``) -------------------------------------------------

    def last_heard(self) -> float | None:
        direct = self._direct
        return None if direct is None else direct.server.last_read

    def ping_now(self) -> bool:
        return self._direct is not None and self._direct.ping_now()

    def heard_event(self) -> trio.Event | None:
        direct = self._direct
        return None if direct is None else direct.server.heard_event()

    def closing(self) -> bool:
        direct = self._direct
        return self.disconnected or self.closed or (direct is not None and direct.lost())

    async def drop(self, code: int | None, reason: str) -> None:
        if self._direct is not None:
            await self._direct.drop(code, reason)

    def _check_open(self) -> None:
        """Refuse a send that could not arrive. Hypercorn drops a message sent after the
        connection was lost without a word, and the disconnect reaches ``receive`` (which
        sets ``disconnected``) only passes later: a prompt's answer sent in between was
        taken as delivered, and a client re-attaching within grace never got it."""
        if self.disconnected or self.closed:
            raise NotSent("websocket is closed")
        direct = self._direct
        if direct is not None and direct.lost():
            raise NotSent("the connection was lost")

    def _check_written(self) -> None:
        """After a send through Hypercorn's path, which does not report a failed write."""
        direct = self._direct
        if direct is not None and direct.server.write_failed:
            raise trio.BrokenResourceError("the connection was lost while writing")

    def _direct_frames(self) -> DirectFrames | None:
        direct = self._direct
        return direct if direct is not None and direct.usable() else None

    async def receive_message(self) -> str | bytes:
        while True:
            if self.disconnected:
                raise trio.EndOfChannel
            event = await self.receive()
            kind = event["type"]
            if kind == "websocket.receive":
                text = event.get("text")
                if text is not None:
                    return str(text)
                data = event.get("bytes")
                if data is not None:
                    return bytes(data)
            elif kind == "websocket.disconnect":
                self.disconnected = True

    async def send_message(self, text: str) -> None:
        self._check_open()
        direct = self._direct_frames()
        if direct is not None:
            await direct.send_texts((text,))
            return
        await self.send({"type": "websocket.send", "text": text})
        self._check_written()

    async def send_messages(self, texts: Sequence[str]) -> None:
        """One frame each, as always, but written to the socket together (see
        :func:`~punie_trio.web._fast_send.coalesced_writes`)."""
        self._check_open()
        direct = self._direct_frames()
        if direct is not None:
            await direct.send_texts(texts)
            return
        send = self.send
        async with coalesced_writes():
            for text in texts:
                self._check_open()  # (the connection may start closing between two)
                await send({"type": "websocket.send", "text": text})
        self._check_written()

    def send_messages_now(self, texts: Sequence[str]) -> bool | None:
        """:class:`~punie_trio.transport.NowSender`: frames written at once when the
        direct path is usable and the socket is free (``None`` otherwise)."""
        if self.disconnected or self.closed:
            return None
        direct = self._direct_frames()  # (not usable once lost: the send path raises)
        return None if direct is None else direct.send_texts_now(texts)

    async def finish_sending(self) -> None:
        if self._direct is not None:
            await self._direct.finish_sending()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send the close frame once. Shielded: it ends Hypercorn's bookkeeping of the
        stream, which must not be cut off by the cancellation that usually brings us here.
        Bounded: :data:`CLOSE_SEND_TIMEOUT`, and a short time once the server shuts down
        (:func:`~._fast_send.final_send`). Over HTTP/2 the close waits for Hypercorn to
        drain the stream, which a client that grants no more flow-control window, or a
        shutdown that has cancelled Hypercorn's send task, never lets happen: unbounded,
        the close waited for good and the shutdown's watchdog ended it (status 1)."""
        if self.closed or self.disconnected:
            return
        self.closed = True
        with final_send(self.send, CLOSE_SEND_TIMEOUT):
            await self.send({"type": "websocket.close", "code": code, "reason": reason})

    async def aclose(self) -> None:
        await self.close()

    async def wait_disconnected(self, grace: float) -> None:
        """Read (and drop) what the client still sends until Hypercorn's
        ``websocket.disconnect``; after ``grace`` seconds, drop the connection and read on.

        Why: Hypercorn hands the app every event through a bounded channel and waits while
        it is full, the disconnect included. An app that returns with the channel full
        (its reader had stopped: a client that sent on while reading nothing) leaves
        Hypercorn waiting for good, holding the connection and what it buffered. After
        a close frame the client answers with its own and the disconnect comes at once;
        one that never answers is dropped, which makes it come. (Where the connection
        cannot be dropped from here, HTTP/2 or a Hypercorn without punie-trio's socket
        writer, it returns after ``grace``, as it always did at once.)"""
        with trio.move_on_after(grace):
            await self._drain()
            return
        if self._direct is None:
            return
        await self.drop(None, "")
        await self._drain()

    async def _drain(self) -> None:
        while not self.disconnected:
            if (await self.receive())["type"] == "websocket.disconnect":
                self.disconnected = True
