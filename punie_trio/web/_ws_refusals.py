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
Pings in a row (on a connection the direct reader does not read: ``permessage-deflate``)
are answered with one pong, to the last of them.

Resource handling: nothing is owned; like ``_deflate.install`` it patches Hypercorn for the
whole process (idempotent), and patches nothing if Hypercorn's internals do not match.
"""

from __future__ import annotations

from collections.abc import Generator

from hypercorn.protocol import ws_stream
from wsproto.connection import Connection, ConnectionState
from wsproto.events import CloseConnection, Event, Ping
from wsproto.frame_protocol import CloseReason

from ._deflate import BoundedPerMessageDeflate
from ._swap import swap_class


class _Connection(Connection):
    """wsproto's ``Connection``, turning a refused frame into a close Hypercorn answers."""

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
                if event.code == CloseReason.MESSAGE_TOO_BIG and BoundedPerMessageDeflate.limit:
                    limit = BoundedPerMessageDeflate.limit
                    event = CloseConnection(event.code, f"message over the {limit}-byte limit")
            yield event
        if ping is not None:
            yield ping

    def send(self, event: Event) -> bytes:
        if isinstance(event, CloseConnection) and event.code == 1009 and not event.reason:
            # (Hypercorn's own bound on an assembled message closes without a reason.)
            event = CloseConnection(event.code, "message over the size limit")
        return super().send(event)


def install() -> bool:
    """Answer refused frames with a close frame (idempotent). Returns False, patching
    nothing, if Hypercorn no longer builds wsproto's ``Connection`` in ``ws_stream``."""
    return swap_class(
        ws_stream, "Connection", Connection, _Connection, "refused frames get no close frame"
    )
