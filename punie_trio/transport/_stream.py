"""The one seam every transport implements: send and receive one JSON-RPC message text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import trio


class MessageTooLarge(Exception):
    """An incoming message exceeded the transport's size bound and was discarded.

    Transports that can skip the offending message (NDJSON: discard to the next newline)
    raise this and stay usable, so the peer can answer -32600 and carry on. Transports that
    cannot (WebSocket: the frame is refused, answered -32600 with a null id and closed
    with 1009, below the app: ``web._ws_refusals``) end instead.

    ``head`` holds the message's first bytes (at most :data:`HEAD_BYTES`) where the
    transport kept them, so the peer can tell whose answer or which request it was
    (:func:`punie_trio.rpc.peek_envelope`).
    """

    def __init__(self, limit: int, head: bytes = b"") -> None:
        super().__init__(f"message exceeds the {limit}-byte limit")
        self.limit = limit
        self.head = head


#: How much of an oversized message a transport keeps for :attr:`MessageTooLarge.head`.
HEAD_BYTES = 4096


class MessageStream(Protocol):
    """A bidirectional stream of JSON-RPC message texts.

    ``receive_message`` returns one message (text, or UTF-8 bytes that the codec decodes
    so invalid UTF-8 becomes a parse error) and raises :class:`trio.EndOfChannel` when
    the other side has finished cleanly (EOF, WebSocket close). ``send_message`` may raise
    :class:`trio.BrokenResourceError` or :class:`trio.ClosedResourceError` once the stream is
    gone. Only one task sends at a time (the peer's writer) and only one task receives.
    """

    async def send_message(self, text: str) -> None: ...

    async def receive_message(self) -> str | bytes: ...

    async def aclose(self) -> None: ...


class NotSent(trio.BrokenResourceError):
    """The stream is gone, and refused the message (or the batch) before writing any of
    it: unlike other send failures, the caller knows none of it went out (the peer keeps
    it for a client that re-attaches, see ``Peer.unsent``)."""


@runtime_checkable
class BatchSender(Protocol):
    """A :class:`MessageStream` that can send several messages at once, in order, cheaper
    than one by one (one system call for all of them). The peer's writer uses it when a
    backlog has built up (a streamed turn, a ``session/load`` replay)."""

    async def send_messages(self, texts: Sequence[str]) -> None: ...


@runtime_checkable
class NowSender(Protocol):
    """A :class:`MessageStream` that can write messages from synchronous code, when its
    socket takes them at once: a turn's relay writes the answer (and the turn's last
    updates) itself while the peer's writer waits, saving the writer's scheduler step on
    the way to the client."""

    def send_messages_now(self, texts: Sequence[str]) -> bool | None:
        """Write ``texts`` (one message each) now. ``None``: nothing was written, use the
        ordinary path. ``False``: all written. ``True``: the socket took part; the
        transport keeps the rest ahead of anything written later, and
        :meth:`finish_sending` must be awaited soon to write it."""
        ...

    async def finish_sending(self) -> None:
        """Write what a :meth:`send_messages_now` kept (nothing if it kept nothing)."""
        ...
