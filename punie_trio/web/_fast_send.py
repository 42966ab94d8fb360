"""A faster socket write for Hypercorn's trio worker: send without a checkpoint when it fits.

Why: every WebSocket frame (one ACP message) ends in Hypercorn's
``TCPServer.protocol_send``, which takes a lock, opens a shielded scope and awaits
``SocketStream.send_all``. That await checkpoints twice, and each checkpoint is a trip
through trio's scheduler with an ``epoll_wait``. Measured on loopback, that path caps raw
Hypercorn-trio at 14,000-34,000 frames/s; the kernel send itself is a small part of it.

:class:`FastSendTCPServer` first tries the stdlib socket's non-blocking ``send`` directly,
when no other write is in flight (the send lock is free, so nothing is queued ahead and
byte order is kept). If the kernel takes all the bytes, it returns without a checkpoint;
if the buffer is full or takes only part, the rest goes through Hypercorn's own path
(lock, shielded ``send_all``), which waits for the socket to drain. Behaviour is otherwise
unchanged: a broken or closed socket reports ``Closed`` to the protocol exactly as
Hypercorn does.

Resource handling: nothing new is owned; the subclass only changes how bytes reach the
socket. It is installed by :func:`install` (idempotent) as the class Hypercorn's
``worker_serve`` instantiates per connection, for the whole process. If Hypercorn's
internals ever stop matching (checked at install), nothing is patched and Hypercorn runs
unchanged, only slower.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import hypercorn.trio.run as _hypercorn_run
from hypercorn.events import Closed, Event, RawData
from hypercorn.trio.tcp_server import TCPServer

log = logging.getLogger(__name__)


class FastSendTCPServer(TCPServer):
    """Hypercorn's per-connection ``TCPServer``, writing without a checkpoint when it can."""

    async def protocol_send(self, event: Event) -> None:
        if type(event) is RawData and not self.send_lock.locked():
            # No write in flight (it would hold the lock), so nothing is queued ahead of us.
            sock = _stdlib_socket(self.stream)
            if sock is not None:
                data = event.data
                try:
                    sent = sock.send(data)
                except BlockingIOError:
                    sent = 0
                except OSError:  # reset, broken pipe, or closed under us
                    await self.protocol.handle(Closed())
                    return
                if sent == len(data):
                    return
                event = RawData(data=data[sent:])
        await super().protocol_send(event)


def install() -> bool:
    """Make Hypercorn's trio worker use :class:`FastSendTCPServer` (idempotent). Returns
    False, patching nothing, if Hypercorn's internals no longer look as expected."""
    current = getattr(_hypercorn_run, "TCPServer", None)
    if current is FastSendTCPServer:
        return True
    if current is not TCPServer:
        log.warning("Hypercorn internals changed; using its default socket writes")
        return False
    setattr(_hypercorn_run, "TCPServer", FastSendTCPServer)  # noqa: B010 (not re-exported)
    return True


def _stdlib_socket(stream: Any) -> socket.socket | None:
    """The plain socket under a trio ``SocketStream`` (None for TLS or anything else)."""
    sock = getattr(getattr(stream, "socket", None), "_sock", None)
    return sock if isinstance(sock, socket.socket) else None
