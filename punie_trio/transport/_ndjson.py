"""Newline-delimited JSON over a Trio byte stream (stdio, pipes, sockets).

Error handling: a line longer than ``max_message_bytes`` is discarded up to its newline and
reported as :class:`MessageTooLarge`; the stream stays usable, so one bad line costs one error
answer, never the connection. A final line without a newline at EOF is still delivered.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import trio

from ._stream import HEAD_BYTES, MessageTooLarge

_CHUNK = 65536


@attrs.define(eq=False)
class NdjsonStream:
    """A :class:`MessageStream` over ``receive_stream``/``send_stream`` (they may be one object).

    Resource handling: :meth:`aclose` closes both underlying streams, idempotently.
    """

    receive_stream: trio.abc.ReceiveStream
    send_stream: trio.abc.SendStream
    max_message_bytes: int = 16 * 1024 * 1024
    _buffer: bytearray = attrs.field(factory=bytearray, init=False)
    _scanned: int = attrs.field(default=0, init=False)
    _discarding: bool = attrs.field(default=False, init=False)
    _head: bytes = attrs.field(default=b"", init=False)  # of the line being discarded
    _eof: bool = attrs.field(default=False, init=False)
    _closed: bool = attrs.field(default=False, init=False)

    async def send_message(self, text: str) -> None:
        await self.send_stream.send_all(text.encode() + b"\n")

    async def send_messages(self, texts: Sequence[str]) -> None:
        await self.send_stream.send_all(("\n".join(texts) + "\n").encode())

    async def receive_message(self) -> bytes:
        while True:
            newline = self._buffer.find(b"\n", self._scanned)
            if newline >= 0:
                line = bytes(self._buffer[:newline])
                del self._buffer[: newline + 1]
                self._scanned = 0
                if self._discarding:
                    self._discarding = False
                    raise MessageTooLarge(self.max_message_bytes, self._head)
                if line.endswith(b"\r"):  # CRLF: the CR is not part of the message
                    line = line[:-1]
                if len(line) > self.max_message_bytes:
                    raise MessageTooLarge(self.max_message_bytes, line[:HEAD_BYTES])
                if line.strip():
                    return line
                continue
            self._scanned = len(self._buffer)
            if self._scanned > self.max_message_bytes + 1:  # (+1: a CRLF line's CR)
                # Drop what we have of the oversized line (its head aside) and skip to
                # its end.
                if not self._discarding:
                    self._head = bytes(self._buffer[:HEAD_BYTES])
                self._discarding = True
                self._buffer.clear()
                self._scanned = 0
            if self._eof:
                if self._discarding:
                    # The oversized line ends at EOF: its tail goes with it (it was once
                    # read as a message of its own, and a request hidden there was run).
                    self._discarding = False
                    self._buffer.clear()
                    self._scanned = 0
                    raise MessageTooLarge(self.max_message_bytes, self._head)
                rest = bytes(self._buffer).strip()
                self._buffer.clear()
                self._scanned = 0
                if rest:
                    return rest
                raise trio.EndOfChannel
            data = await self.receive_stream.receive_some(_CHUNK)
            if not data:
                self._eof = True
            else:
                self._buffer += data

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self.send_stream.aclose()
        finally:
            if self.receive_stream is not self.send_stream:  # type: ignore[comparison-overlap]
                await self.receive_stream.aclose()


def stdio_stream(max_message_bytes: int = 16 * 1024 * 1024) -> NdjsonStream:
    """The process's stdin/stdout as an :class:`NdjsonStream` (non-blocking fd streams)."""
    import os

    # Duplicate the descriptors: FdStream puts them in non-blocking mode and closes them,
    # and neither should happen to the process's real fd 0/1 behind other code's back.
    stdin = trio.lowlevel.FdStream(os.dup(0))
    stdout = trio.lowlevel.FdStream(os.dup(1))
    return NdjsonStream(stdin, stdout, max_message_bytes)
