"""A WebSocket frame that wsproto refuses is answered with a close frame saying why.

Why: wsproto reports a frame it cannot accept as a ``CloseConnection`` event with the
code RFC 6455 asks for, while its connection is still open: a close frame with a
reserved code (1002) or a reason that is not UTF-8 (1007), bad compressed data (1007),
or a compressed message past the bound, which ``_deflate`` cuts short (1009). Hypercorn's
``WSStream`` answers a ``CloseConnection`` only when the peer started the close (state
``REMOTE_CLOSING``), so for these it sent nothing and dropped the TCP connection: the
client saw 1006, not why (RFC 6455 7.1.7: the endpoint SHOULD send a close frame). Browsers
and the ``websockets`` library negotiate ``permessage-deflate`` by default, so an
over-long message from them took that path.

:func:`install` has Hypercorn build its server connections from :class:`_Connection`,
which marks such a refusal as a close the peer started: Hypercorn then sends the close
frame back (same code and reason) and ends the connection, as for any peer's close.
(Frames the direct reader takes, ``_direct.py``, never reach wsproto; it sends its own.)
A 1009 that Hypercorn sends for an assembled message past its bound gets a reason too.

Every 1009 the server sends for a message over the bound goes through
:meth:`_Connection.send` (the direct reader's, ``_direct.DirectReader._fail``, too: it sends
its close through wsproto), and is preceded there by a JSON-RPC error with a null id,
-32600 naming the size (where known) and the limit, as an oversized line on stdio is
answered: the close code alone told a JSON-RPC client nothing it could match to what it
sent (JSON-RPC 2.0 section 5: an error whose request's id could not be read has a null id;
RFC 6455 lets an endpoint send data until its close frame). The connection's
:attr:`_Connection.on_oversized` (set by the app: :func:`watch_oversized`) counts it in
``punie_limits_hit_total``. A 1009 the client sent is answered with a plain close, as any
client close is. The normal message path is untouched: only a close frame is looked at.
Pings in a row (on a connection the direct reader does not read: ``permessage-deflate``)
are answered with one pong, to the last of them.

Resource handling: nothing is owned; like ``_deflate.install`` it patches Hypercorn for the
whole process (idempotent), and patches nothing if Hypercorn's internals do not match.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from hypercorn.protocol import ws_stream
from wsproto.connection import Connection, ConnectionState
from wsproto.events import CloseConnection, Event, Ping
from wsproto.frame_protocol import CloseReason

from ..rpc import INVALID_REQUEST, ErrorResponse, serialize
from ._deflate import BoundedPerMessageDeflate
from ._swap import swap_class


class _Connection(Connection):
    """wsproto's ``Connection``, turning a refused frame into a close Hypercorn answers,
    and a message over the bound into a -32600 before its 1009 close."""

    #: Called once for a message over the bound, as its 1009 goes out (per connection,
    #: set by :func:`watch_oversized`; None: not counted).
    on_oversized: Callable[[], None] | None = None
    #: This connection's bound in bytes (``--max-message-bytes``; 0: not known), named in
    #: the close reason of a 1009 (see :func:`watch_oversized`).
    limit: int = 0
    #: wsproto refused a message for its size (:meth:`events`): the 1009 Hypercorn sends
    #: in answer is ours, though the state reads as if the client had closed.
    _oversized: bool = False

    def events(self) -> Generator[Event, None, None]:
        ping: Ping | None = None
        for event in super().events():
            if isinstance(event, Ping):
                # Pings in a row get one pong, to the last (RFC 6455 5.5.3), as the direct
                # reader does: Hypercorn answers every Ping event, a write each.
                ping = event
                continue
            if ping is not None:
                yield ping
                ping = None
            if isinstance(event, CloseConnection) and self.state is ConnectionState.OPEN:
                # wsproto refused a frame (a peer's close would have moved the state):
                # answered like a peer's close, with this code and reason.
                self._state = ConnectionState.REMOTE_CLOSING
                if event.code == CloseReason.MESSAGE_TOO_BIG:
                    self._oversized = True
                    # (This connection's bound, where known: the inflater's is the
                    # largest of the process, which a message over it is over too.)
                    limit = self.limit or BoundedPerMessageDeflate.limit
                    if limit:
                        reason = f"message over the {limit}-byte limit"
                        event = CloseConnection(event.code, reason)
            yield event
        if ping is not None:
            yield ping

    def send(self, event: Event) -> bytes:
        if not isinstance(event, CloseConnection) or event.code != 1009:
            return super().send(event)
        if not event.reason:
            # (Hypercorn's own bound on an assembled message closes without a reason. It
            # counts characters: a message over it is over as many bytes too.)
            limit = f"{self.limit}-byte limit" if self.limit else "size limit"
            event = CloseConnection(event.code, f"message over the {limit}")
        if self.state is not ConnectionState.OPEN and not self._oversized:
            return super().send(event)  # (the answer to a client's own 1009)
        self._oversized = False
        # The -32600 first, as a text frame (through the extension: it is compressed on a
        # permessage-deflate connection like every other message), then the close.
        message = f"Invalid request: {event.reason}; the connection closes (1009)"
        data = self._proto.send_data(serialize(ErrorResponse(None, INVALID_REQUEST, message)))
        if self.on_oversized is not None:
            self.on_oversized()
        return bytes(data) + super().send(event)


def watch_oversized(send: Any, on_oversized: Callable[[], None]) -> bool:
    """Have ``on_oversized`` called for each message over the bound on the accepted
    WebSocket behind the ASGI ``send`` Hypercorn gave the app (its ``WSStream.app_send``,
    over HTTP/1.1 or HTTP/2). False, nothing watched, where that is not Hypercorn's
    stream over this module's connection (:func:`install` not run, or ``send`` wrapped).
    The connection's close reasons then name the stream's bound."""
    stream = getattr(send, "__self__", None)
    connection = getattr(stream, "connection", None)
    if not isinstance(connection, _Connection):
        return False
    connection.on_oversized = on_oversized
    limit = getattr(getattr(stream, "config", None), "websocket_max_message_size", None)
    if isinstance(limit, int) and not isinstance(limit, bool):
        connection.limit = limit
    return True


def install() -> bool:
    """Answer refused frames with a close frame (idempotent). Returns False, patching
    nothing, if Hypercorn no longer builds wsproto's ``Connection`` in ``ws_stream``."""
    return swap_class(
        ws_stream, "Connection", Connection, _Connection, "refused frames get no close frame"
    )
