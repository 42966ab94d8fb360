"""WebSocket text frames written straight to the socket writer, past Hypercorn's per-message
path, when nothing in that path would change the bytes.

Why: every ``websocket.send`` goes ASGI message -> Hypercorn's ``WSStream.app_send`` ->
wsproto's ``Connection.send`` (event object, state checks, frame serialisation) -> Hypercorn's
``H11Protocol.stream_send`` -> the socket writer. Measured with py-spy while a 1,000-turn
``session/load`` replays 19,000 updates, that path is about 60% of the server's CPU; the
frame itself, for a server (never masked), is two to ten header bytes and the UTF-8 text.

:class:`DirectFrames` serialises the frames of a batch itself and hands them to
:class:`~._fast_send.FastSendTCPServer` as one write. It is used only while the bytes are
exactly what wsproto would produce: the connection is Hypercorn's HTTP/1.1 WebSocket stream
over punie-trio's socket writer, the ASGI stream is connected and not closed, wsproto's
connection is open, no extension is negotiated (permessage-deflate would compress the
payload) and no fragmented message is in progress. Otherwise (and for anything but text
frames) the caller uses Hypercorn's path, which also ignores sends after a close as before.

Resource handling: nothing is owned; the objects are looked up from the ASGI ``send``
callable once per connection. If Hypercorn's or wsproto's internals stop matching, the
lookup finds nothing and every frame takes Hypercorn's path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
from hypercorn.events import RawData
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
from wsproto.connection import ConnectionState

from ._fast_send import FastSendTCPServer
from ._keepalive import KeepAliveTimer


def text_frame(text: str) -> bytes:
    """One unmasked, final text frame (RFC 6455 section 5.2), as a server sends it."""
    data = text.encode()
    n = len(data)
    if n < 126:
        return bytes((0x81, n)) + data
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2, "big") + data
    return b"\x81\x7f" + n.to_bytes(8, "big") + data


@attrs.frozen
class DirectFrames:
    """The pieces of one Hypercorn WebSocket connection that a direct write needs."""

    stream: WSStream
    server: FastSendTCPServer

    @classmethod
    def find(cls, send: Callable[..., Any]) -> DirectFrames | None:
        """From the ASGI ``send`` Hypercorn gave the app (``WSStream.app_send``), reach the
        connection's socket writer; ``None`` for anything else (HTTP/2, TLS wrappers, stock
        Hypercorn, a wrapped ``send``)."""
        stream = getattr(send, "__self__", None)
        if type(stream) is not WSStream:
            return None
        protocol = getattr(stream.send, "__self__", None)
        if type(protocol) is not H11Protocol:
            return None
        server = getattr(protocol.send, "__self__", None)
        if not isinstance(server, FastSendTCPServer):
            return None
        return cls(stream, server)

    def usable(self) -> bool:
        """Whether a text frame written now is exactly what Hypercorn's path would write."""
        stream = self.stream
        if stream.closed or stream.state is not ASGIWebsocketState.CONNECTED:
            return False
        connection = getattr(stream, "connection", None)
        proto = getattr(connection, "_proto", None)
        return (
            connection is not None
            and connection.state is ConnectionState.OPEN
            and not getattr(proto, "extensions", True)
            and getattr(proto, "_outbound_opcode", True) is None
        )

    def retire_keepalive(self) -> None:
        """The connection is a WebSocket now: its HTTP keep-alive watcher can end."""
        timer = self.server.idle_task
        if isinstance(timer, KeepAliveTimer):
            timer.retire()

    async def send_texts(self, texts: Sequence[str]) -> None:
        """Write one text frame per item, in order, in one write (call only if
        :meth:`usable`)."""
        if len(texts) == 1:
            data = text_frame(texts[0])
        else:
            data = b"".join([text_frame(text) for text in texts])
        await self.server.protocol_send(RawData(data=data))
